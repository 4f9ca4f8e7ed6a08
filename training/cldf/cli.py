"""The `cldf` command: train a bundle, segment volumes, evaluate, demo, benchmark (arguments: `cli_parser`)."""

from __future__ import annotations

import logging
import os
import shlex
import sys

from .cli_parser import build_parser, parse_inputs


class _Messages(logging.Formatter):
    """Progress as plain lines; warnings and errors start with their level, so they stand out."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def _log_to_stderr(quiet: bool, verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Messages("%(message)s"))
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, handlers=[handler])
    if verbose:  # the libraries' own debug chatter stays out even then
        for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.INFO)


def _resume_hint(args) -> str:
    """What running the interrupted command again does."""
    if args.command in ("student", "cpf-cte"):
        return f"Run the same command again to resume from <bundle>.{args.command}-checkpoints."
    if args.command == "segment" and getattr(args, "data", None) is not None:
        return "Run the same command again: the cases already written are kept and skipped."
    return "Run the same command again to start over."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(args.quiet, args.verbose)
    from .bundle import BundleError
    from .images import InputError

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
        print(f"cldf {args.command}: interrupted; nothing half-written was kept. {_resume_hint(args)}",
              file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("cldf.evaluation"):
            raise
        print(f"cldf {args.command}: error: this installation (the Slicer module's engine) has no evaluation "
              "tooling; install the `cldf` package from the project's repository to run it", file=sys.stderr)
        return 2


def cmd_train(args, argv) -> int:
    from .config import apply_overrides, preset
    from .trainer.checkpoint import sigterm_as_interrupt
    from .trainer.train import TrainRequest, checkpoint_dir, train

    cfg = apply_overrides(preset(args.preset), args.overrides)  # every --set type-checked before any work
    if args.channels is not None:
        cfg.data.channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    if not cfg.data.channels:
        raise ValueError("--channels needs at least one channel name, e.g. FLAIR,T1")
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
    from .hounsfield import describe
    from .outputs import staging_folder, write_result
    from .slice_job import provenance

    if bool(args.inputs) == (args.data is not None):
        raise ValueError("give either --input NAME=PATH (one volume) or --data MANIFEST (a cohort)")
    if args.data is not None:
        return _segment_cohort(args, argv)
    inputs = parse_inputs(args.inputs)
    extra = _extra_maps(args)
    with staging_folder(args.out, args.overwrite) as staging:  # an unwritable --out fails here, before any work
        bundle = load_bundle(args.bundle)
        series = _series(args.format, bundle, inputs)
        job = _segmenter(args, bundle, extra).start(inputs, args.decoder_seed)
        _say_validation(bundle, job.kind)
        if describe(job.intensities, windowed_only=True):
            logging.getLogger("cldf").info("intensities: %s", describe(job.intensities, windowed_only=True))
        result = job.run(progress=not args.quiet)
        result.has_maps = result.has_maps and not args.no_maps
        record = provenance(job, inputs, "cldf " + shlex.join(argv))
        paths = write_result(result, args.out, "nifti" if series else args.format, args.overwrite, record, staging,
                             series=series)
    n_pos = int(result.mask.reshape(len(result.mask), -1).any(axis=1).sum())
    print(f"{job.total} slices, {n_pos} with a mask, {int(result.mask.sum())} mask voxels ({job.kind})")
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0


def _series(fmt: str, bundle, inputs: dict):
    """The DICOM series a ``--format dicom-seg`` run writes its Segmentation of (checked before any work)."""
    from . import dicom_seg

    if fmt != dicom_seg.FORMAT:
        return None
    first = bundle.channels[0]
    if first not in inputs:
        raise ValueError(f"the bundle's first channel '{first}' is not among the inputs: give --input {first}=SERIES")
    return dicom_seg.source(inputs[first], bundle.card, first)


def _say_validation(bundle, segmenter: str) -> None:
    """The segmenter's validation score from the card, said before the run; a warning when it is low."""
    from .card import validation_score

    score = validation_score(bundle.card, segmenter)
    name = bundle.card.get("name", bundle.path.name)
    if score is None:
        logging.getLogger("cldf").warning("bundle '%s' records no validation score: how well it segments is unknown",
                                          name)
    elif score.low:
        logging.getLogger("cldf").warning(score.warning(name))
    else:
        logging.getLogger("cldf").info("bundle %s: %s", bundle.id, score.says())


def _extra_maps(args) -> tuple[str, ...]:
    from .segment import EXTRA_MAPS

    extra = tuple(m.strip() for m in args.maps.split(",") if m.strip())
    bad = [m for m in extra if m not in EXTRA_MAPS]
    if bad:
        raise ValueError(f"--maps takes a comma-separated list of {', '.join(EXTRA_MAPS)}, not {', '.join(bad)}")
    if extra and args.no_maps:
        raise ValueError("--maps asks for extra maps and --no-maps for none: give one of them")
    return extra


def _segmenter_name(args, bundle) -> str:
    return bundle.config.student.segmenter if args.segmenter == "bundle" else args.segmenter


def _segmenter(args, bundle, extra: tuple[str, ...] = ()):
    """The segmenter the options ask for: a student computes the CAM and mean-gradient maps unless --no-maps."""
    from .student import make_segmenter

    refine = None if args.refine == "bundle" else args.refine
    return make_segmenter(bundle, _segmenter_name(args, bundle), args.device, args.batch_size, extra_maps=extra,
                          overlays=not args.no_maps, refine=refine)


def _segment_cohort(args, argv) -> int:
    from .bundle import load_bundle
    from .cohort import Part, segment_cohort
    from .manifest import load_manifest

    if args.maps:
        raise ValueError("--maps is for one volume (--input); a cohort run writes the standard outputs")
    part = Part.parse(args.part)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out} is a file, not a folder; choose another --out")
    manifest = load_manifest(args.data)
    bundle = load_bundle(args.bundle)
    segmenter = _segmenter(args, bundle)
    done = segment_cohort(segmenter, manifest, args.out, args.format, args.overwrite, part, not args.quiet,
                          "cldf " + shlex.join(argv), write_maps=not args.no_maps)
    print(f"part {part.index}/{part.count}: {len(done['written'])} case(s) written, {len(done['skipped'])} already "
          f"complete, {len(done['failed'])} failed; summary in {args.out / 'summary.csv'}")
    if done["failed"]:
        print(f"cldf segment: error: case(s) {', '.join(done['failed'])} could not be segmented (see above); "
              "fix them and run the same command again", file=sys.stderr)
        return 2
    return 0


def cmd_evaluate(args, argv) -> int:
    from .bundle import BundleError, load_bundle
    from .evaluation.evaluate import available_methods, case_ids_for_split, evaluate, markdown_table, write_report
    from .manifest import load_manifest

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
        metrics = {**bundle.card.get("metrics", {}), args.split: _merged_metrics(
            bundle.card.get("metrics", {}).get(args.split), "cldf " + shlex.join(argv), cases, report["protocol"],
            summary, per_case)}
        update_card(args.bundle, metrics=metrics)
    print(f"{args.split} split, {len(cases)} cases (positive slices: target > "
          f"{bundle.config.data.positive_fraction:.0%} of the slice)\n")
    print(markdown_table(report))
    print(f"\nreport written to {args.out}")
    return 0


def _merged_metrics(recorded: dict | None, command: str, cases: list[str], protocol: str, methods: dict,
                    per_case: dict) -> dict:
    """A split's recorded metrics with these methods' rows added or replaced: rows of methods not evaluated
    again stay (with the command that made them) while the cases are the same; other cases replace them all."""
    if not recorded or recorded.get("cases") != cases:
        return {"command": command, "cases": cases, "protocol": protocol, "methods": methods, "per_case": per_case}
    commands = {**recorded.get("commands", {m: recorded.get("command") for m in recorded["methods"]}),
                **{m: command for m in methods}}
    return {"command": command, "commands": commands, "cases": cases, "protocol": protocol,
            "methods": {**recorded["methods"], **methods},
            "per_case": {cid: {**recorded.get("per_case", {}).get(cid, {}), **rows} for cid, rows in per_case.items()}}


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
    from .trainer.decoders import add_decoders

    added = add_decoders(args.bundle, args.data, args.device, "cldf " + shlex.join(argv), progress=not args.quiet)
    print(f"added decoder variants {', '.join(added)} to {args.bundle}" if added
          else f"{args.bundle} already has every decoder variant; nothing to do")
    return 0


def cmd_student(args, argv) -> int:
    from .config import parse_override
    from .trainer.train_student import add_student

    settings = dict(parse_override(o) for o in args.set)
    card = add_student(args.bundle, args.data, args.device, settings, "cldf " + shlex.join(argv),
                       progress=not args.quiet, keep_checkpoints=args.keep_checkpoints, time_budget_min=args.time_budget,
                       choose_only=args.choose)
    best = card["table"][0] if card["table"] else None
    print(("student weighed again" if args.choose else
           f"student trained on {card['training_slices']} slices ({card['slices_with_pseudo_mask']} with a pseudo-mask)")
          + f"; the bundle segments with {card['chosen']['student.segmenter']}"
          + (f" (validation: 3D Dice {best['dice_3d']:.3f}, any-target slice Dice {best['target_slice_dice']:.3f})"
             if best else " (no validation patients to weigh the student on)")
          + f"; written into {args.bundle}")
    return 0


def cmd_cpf_cte(args, argv) -> int:
    from .config import parse_override
    from .trainer.train_cpf_cte import add_cpf_cte

    settings = dict(parse_override(o) for o in args.set)
    card = add_cpf_cte(args.bundle, args.data, args.device, settings, "cldf " + shlex.join(argv),
                       progress=not args.quiet, keep_checkpoints=args.keep_checkpoints, replace=args.replace)
    auc = f", validation AUC {card['validation_auc']:.3f}" if "validation_auc" in card else ""
    print(f"CPF-CTE trained for {card['steps']} steps{auc}, and its decoders (cpf-cte-seeds) for "
          f"{len(card['decoders']['final_loss'])} seed(s), in {card['wall_clock_s']['total']:.0f} s; "
          f"written into {args.bundle}")
    return 0


def cmd_tune(args, argv) -> int:
    from .trainer.train import tune

    doc = tune(args.bundle, args.data, args.device, "cldf " + shlex.join(argv), progress=not args.quiet,
               refine=not args.no_refine)
    best = (doc.get("refine") or doc["table"])[0]
    print(f"chosen on {len(doc['validation_cases'])} validation cases: {doc['chosen']} "
          f"(3D Dice {best['val_dice_3d']:.3f}, any-target slice Dice {best['val_any_target_slice_dice']:.3f}); "
          f"written into {args.bundle / 'bundle.json'}")
    return 0


def cmd_card(args, argv) -> int:
    from .bundle import correct_setting, read_card, set_segment_code
    from .card import segment_code

    asked = {"data.orientation": args.orientation, "data.ct_window": args.ct_window}
    for key, value in ((k, v) for k, v in asked.items() if v is not None):
        entry = correct_setting(args.bundle, key, value, args.because, "cldf " + shlex.join(argv))
        print(f"{args.bundle}: {key} {entry['from'] or 'unset'} -> {entry['to']}; weights unchanged, resealed")
    if args.code:
        code = _code_argument(args.code, read_card(args.bundle))
        set_segment_code(args.bundle, code, "cldf " + shlex.join(argv))
        print(f"{args.bundle}: the target is coded {code}; weights unchanged, resealed")
    card = read_card(args.bundle)
    code = segment_code(card)
    data = card["config"]["data"]
    window = data.get("ct_window")
    print(f"bundle {card.get('name', 'bundle')}@{card['seal'][:12]}: channels {', '.join(card['channels'])}; "
          f"slices of {data['resolution']} x {data['resolution']}, cut after reorienting every scan to "
          f"{data.get('orientation') or 'none (the stored voxel order)'}; "
          + (f"CT in HU goes through the window [{window[0]:g}, {window[1]:g}] -> 0..255" if window else
             "intensities used as given"))
    print(f"target: {card.get('task', {}).get('target', 'target')}, "
          + (f"coded {code}" if code else "without standard codes (add them with `cldf card --code`)"))
    for c in card.get("corrections", []):
        print(f"corrected {c['date']}: {c['setting']} {c['from'] or 'unset'} -> {c['to']} ({c['because']})")
    return 0


def _code_argument(words: list[str], card: dict):
    from .terminology import SegmentCode, known_code, parse_code

    if words == ["known"]:
        target = str(card.get("task", {}).get("target", ""))
        code = known_code(target)
        if code is None:
            raise ValueError(f"no codes are known for the target '{target}': give CATEGORY TYPE [MODIFIER], each "
                             "SCHEME^VALUE^MEANING (SNOMED CT codes: DICOM PS3.16, CID 7150 and 7151)")
        return code
    if len(words) not in (2, 3):
        raise ValueError("--code takes 'known' or CATEGORY TYPE [MODIFIER], each SCHEME^VALUE^MEANING")
    return SegmentCode(*(parse_code(w, f"--code {part}") for w, part in zip(words, ("category", "type", "modifier"))))


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
            "figure": cmd_figure, "ablate": cmd_ablate, "cpf-cte": cmd_cpf_cte, "tune": cmd_tune, "student": cmd_student, "card": cmd_card, "demo": cmd_demo,
            "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
