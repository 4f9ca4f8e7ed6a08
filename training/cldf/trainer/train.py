"""`cldf train`: every stage of CLDF from volumes and slice labels to a model bundle.

Stages, each checkpointed in ``<out>.checkpoints`` beside the bundle folder so an
interrupted run resumes where it stopped (the network stages at least every minute
too); the folder records what defines the run, and a re-run that differs is refused:

1. CDM: class-conditional DDPM on the training slices (epsilon prediction).
2. Noisy classifier: p(y | x_t, t) for the mean-gradient map.
3. CAM classifier: p(y | x) on clean slices, also the slice gate at inference.
   With ``ame_cam.enabled`` (or ``maps.cam_method="ame-cam"``) also AME-CAM's
   multi-exit classifier and aggregator (`train_ame`); with ``cpf_cte.enabled`` (or
   ``maps.cam_method="cpf-cte"``) the CPF-CTE ViT classifier (`train_cpf_cte`).
4. Pixel decoders: seeds from the maps of positive training slices, diffusion
   features at the seeds, supervised contrastive training, one decoder per seed,
   for each variant in `variants.VARIANTS`: CLDF, CLDF on a randomly initialised
   CDM, and the ablations with seeds from the CAM or the mean gradient alone.
5. The bundle: weights, settings, split, command, device, wall-clock; written into
   ``<out>.partial`` and moved to ``<out>`` once complete (after the student).
6. Student (``student.enabled``): the finished pipeline segments the training patients where
   their slice labels say the target is, a U-Net trains on those masks, and the validation
   patients decide whether the bundle segments with it (`train_student`).

A finished bundle is never rewritten, and its checkpoints are removed unless asked to keep them.

Slices come from the slice cache (`slicecache`) through a DataLoader (`batches`), and features
that grow with the cohort wait on disk (`tensorstore`), so memory does not grow with it. Under
torchrun the network stages run data-parallel (`distributed`). ``--time-budget`` gives each stage
a share of a wall-clock budget (`stages.BUDGET_SHARES`); each network stage is one resumable
optimisation run (`stages.fit`).

Only slice labels reach this module (`slice_set.SliceSet`); masks never do.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import atomic
from ..bundle import Bundle, decoders_state, load_bundle, save_bundle, update_card, write_safetensors
from ..config import CLDFConfig, apply_settings
from ..defaults import DEVICE
from ..device import device_name, resolve_device
from ..hounsfield import DEFAULT_CT_WINDOW, any_hounsfield
from ..images import read_images
from ..manifest import Case, check_channels, check_training_split, load_manifest, split_cases, stored_orientation
from ..models import NoiseSchedule, build_cdm
from ..plausibility import intensity_card
from ..sides import check_side_settings, side_labels
from ..terminology import known_code
from ..variants import bundle_variants
from . import distributed, run_folder
from .batches import check_intensity
from .decoders import fit_decoders, safe_open_metadata
from .run_folder import checkpoint_dir
from .select import ShareTooShort, select_settings
from .slice_set import SliceSet
from .slicecache import cached_slice_set
from .stages import BUDGET_SHARES, TrainRequest, cdm_stage, fit, fit_classifier
from .volume_select import select_postprocess

log = logging.getLogger(__name__)

NOISY_VAL_PATIENTS = 5  # settings chosen on fewer validation patients than this are noisy

def train(req: TrainRequest) -> Path:
    """Run (or resume) every stage and write the bundle into ``req.out``.

    Under torchrun (`distributed`), every process trains the data-parallel stages and process 0
    alone writes the cache, checkpoints and bundle and runs the rest.
    """
    cfg = req.config
    out = Path(os.path.abspath(req.out))
    ckdir = checkpoint_dir(out)
    run_folder.check_out(out, ckdir)
    req.ranks, device = distributed.start(resolve_device(req.device))
    try:
        return _train(req, cfg, out, ckdir, device)
    finally:
        distributed.finish(req.ranks)


def _train(req: TrainRequest, cfg: CLDFConfig, out: Path, ckdir: Path, device: torch.device) -> Path:
    manifest, splits, train_set = _prepare(req, cfg, ckdir, device)
    seconds: dict[str, float] = {}
    cdm, noisy, cam = _fit_networks(req, cfg, train_set, ckdir, device, seconds)
    if not req.ranks.main:  # the data-parallel stages are done; process 0 goes on alone
        return Path(req.out)
    from .train_ame import train_ame_stage  # AME-CAM's networks only when asked for
    from .train_cpf_cte import train_cpf_cte_stage

    ame, ame_card, cam_images = train_ame_stage(cfg, manifest, splits, train_set, req, device, ckdir)
    if ame_card:
        seconds["ame_cam"] = sum(ame_card["wall_clock_s"].values())
    cpf, cpf_card = train_cpf_cte_stage(cfg, manifest, splits, train_set, req, device, ckdir)
    if cpf_card:
        seconds["cpf_cte"] = cpf_card["wall_clock_s"]["classifier"]
    untrained_seed = req.seed + 1000
    bundle = Bundle(None, cfg, {"untrained_cdm": {"seed": untrained_seed}}, cdm, noisy, cam, {}, ame, cpf_cte=cpf)
    bundle.decoders = {v: {} for v in bundle_variants(bundle)}
    selection, note, decoders, decoder_card = _select_and_decode(bundle, train_set, manifest, splits, req, ckdir,
                                                                  device, cam_images, seconds)
    cfg = bundle.config
    card = {
        "name": req.name,
        "task": {"target": req.target_name, "color": list(req.target_color), "mask_labels": req.target_labels,
                 **({"code": code.to_card()} if (code := known_code(req.target_name)) else {})},
        "untrained_cdm": {"seed": untrained_seed},
        "training": _training_card(req, splits, device, seconds, train_set, cfg, decoder_card,
                                   {"ame_cam": ame_card, "cpf_cte": cpf_card}),
        "selection": selection if not note else {**(selection or {}), ("warning" if selection else "skipped"): note},
        **req.extra_card,
    }
    networks = {
        "cdm": cdm.state_dict(),
        "noisy_classifier": noisy.state_dict(),
        "cam_classifier": cam.state_dict(),
        "decoders": decoders_state(decoders),
        **({"ame_cam": ame.state_dict()} if ame is not None else {}),
        **({"cpf_cte": cpf.state_dict()} if cpf is not None else {}),
    }
    partial = run_folder.beside(out, "partial")
    if partial.exists():  # left by a run stopped while writing its bundle
        shutil.rmtree(partial)
    save_bundle(partial, cfg, networks, card)
    if cfg.student.enabled:  # the last stage: a U-Net on the finished pipeline's masks (`train_student`)
        _student_stage(partial, cfg, manifest, req, ckdir)
    run_folder.install(partial, out, ckdir, req.keep_checkpoints)
    return Path(req.out)


def _student_stage(partial: Path, cfg: CLDFConfig, manifest, req: TrainRequest, ckdir: Path) -> None:
    """The student on the finished bundle; a pipeline that found the target nowhere, or a time budget already
    spent, leaves the bundle without one (warned and noted in the card) rather than losing the rest of the run."""
    from .train_student import NothingToLearn, train_student

    seconds, needed = req.stage_seconds("student"), _student_minimum(ckdir)
    if seconds <= 0 or seconds < needed:
        reason = (f"the time budget ({req.time_budget_min:g} min) was spent before the student's stage" if seconds <= 0
                  else f"the student's share of the time budget ({seconds:.0f} s) is less than its first training "
                       f"case and validation patient take through the pipeline (about {needed:.0f} s)")
        log.warning("no student: %s; the bundle segments with the pipeline", reason)
        update_card(partial, student={"skipped": reason})
        return
    bundle = load_bundle(partial)
    bundle.config.student = cfg.student  # as asked, not the card's copy of it
    try:
        train_student(bundle, manifest, req, ckdir)
    except NothingToLearn as err:
        log.warning("no student: %s; the bundle segments with the pipeline", err)
        update_card(partial, student={"skipped": str(err)})


def _student_minimum(ckdir: Path) -> float:
    """What the student's stage takes at least: two volumes through the pipeline (its first pseudo-mask case and
    its first validation patient), timed on this run's post-processing selection (0 when it did not run)."""
    path = ckdir / "postprocess.json"
    volumes = [p for p in (ckdir / "postprocess-volumes").glob("*.safetensors") if ".refined." not in p.name]
    if not path.is_file() or not volumes:
        return 0.0
    return 2.0 * json.loads(path.read_text()).get("seconds", 0.0) / len(volumes)


def _prepare(req: TrainRequest, cfg: CLDFConfig, ckdir: Path, device: torch.device):
    """Every check, the split and the training slices; the run is recorded only once all of them pass."""
    ranks = req.ranks
    _check_batches(cfg, ranks.world)
    for clf in (cfg.noisy_classifier, cfg.cam_classifier):
        check_intensity(clf.intensity)
    if device.type == "cpu" and cfg.data.resolution >= 256 and cfg.diffusion.batch_size > 4:
        log.warning("training at %d x %d on a CPU: one step of the diffusion model with a batch of %d needs tens of "
                    "GB of memory (more than 23 GB at the paper's 16); on a CPU lower it with --set "
                    "diffusion.batch_size=2 (and the classifiers' batch_size), or train on a GPU",
                    cfg.data.resolution, cfg.data.resolution, cfg.diffusion.batch_size)
    manifest = load_manifest(req.manifest)
    splits = split_cases(manifest, cfg.data.split_fractions, req.seed)
    check_training_split(splits, manifest)
    check_channels(manifest, splits["train"] + splits["val"], list(cfg.data.channels))
    if not cfg.data.orientation:  # slices are cut along the first training case's axes; every volume is reoriented
        cfg.data.orientation = stored_orientation(manifest.case(splits["train"][0]), cfg.data.channels[0])
    _choose_ct_window(cfg, manifest.case(splits["train"][0]))
    check_side_settings(cfg, req.target_labels)
    fingerprint = run_folder.run_fingerprint(req)
    run_folder.check_run(ckdir, fingerprint, splits)
    torch.manual_seed(req.seed)
    log.info("loading %d training cases", len(splits["train"]))
    with distributed.main_first(ranks):  # process 0 builds the slice cache, the others then read it
        train_set = cached_slice_set(
            manifest, splits["train"], cfg.data.channels, cfg.data.resolution, tuple(cfg.data.percentiles),
            req.target_labels, cfg.data.positive_fraction, cfg.data.orientation, progress=req.progress and ranks.main,
            ct_window=cfg.data.ct_window,
        )
    if len(torch.unique(train_set.labels)) < 2:
        raise ValueError("the training split needs both positive and negative slices")
    train_set.side_labels = side_labels(cfg, manifest, splits["train"], req.target_labels)
    if ranks.main:
        run_folder.record_run(ckdir, fingerprint, splits)  # every refusal comes before: nothing is written until here
    return manifest, splits, train_set


def _choose_ct_window(cfg: CLDFConfig, first: Case) -> None:
    """A cohort in Hounsfield units trains through a window (recorded in the card, so inputs in HU get the same):
    ``data.ct_window`` when set, else the abdomen window."""
    if cfg.data.ct_window is not None:
        return
    if any_hounsfield(read_images({c: first.channels[c] for c in cfg.data.channels}, list(cfg.data.channels))):
        cfg.data.ct_window = DEFAULT_CT_WINDOW
        log.info("the training cases are CT in Hounsfield units: every scan goes through the window [%g, %g] HU "
                 "(data.ct_window; --set data.ct_window=[LOW,HIGH] chooses another)", *DEFAULT_CT_WINDOW)


def _fit_networks(req: TrainRequest, cfg: CLDFConfig, train_set: SliceSet, ckdir: Path, device: torch.device,
                  seconds: dict[str, float]):
    """The CDM and both classifiers (data-parallel under torchrun), frozen once trained."""
    schedule = NoiseSchedule(cfg.diffusion)
    cdm = build_cdm(cfg.diffusion, len(cfg.data.channels)).to(device)
    seconds["cdm"] = fit("cdm", cdm, cdm_stage(train_set, schedule, cfg, req.seed, device),
                         cfg.diffusion.steps, cfg.diffusion.lr, ckdir, device, req).seconds
    noisy, seconds["noisy_classifier"] = fit_classifier(
        "noisy_classifier", cfg.noisy_classifier, train_set, schedule, req.seed + 1, device, ckdir, req)
    cam, seconds["cam_classifier"] = fit_classifier(
        "cam_classifier", cfg.cam_classifier, train_set, schedule, req.seed + 2, device, ckdir, req,
        cfg.data.orientation)
    for net in (cdm, noisy, cam):
        net.eval().requires_grad_(False)
    return cdm, noisy, cam


def _select_and_decode(bundle: Bundle, train_set: SliceSet, manifest, splits: dict[str, list[str]], req: TrainRequest,
                       ckdir: Path, device: torch.device, cam_images, seconds: dict[str, float]):
    """Settings chosen on the validation patients (when there are enough), then the pixel decoders and the
    volume-level rules; ``bundle.config`` ends with the chosen settings."""
    selection = None
    note = _selection_note(len(splits["val"]), req.min_val_patients) if req.select else None
    if note:
        log.warning(note)
    selected = req.select and len(splits["val"]) >= req.min_val_patients
    val_ids = selection_patients(splits["val"], req.select_patients, req.seed)
    if selected:
        bundle.config = _select(bundle, train_set, manifest, val_ids, req, ckdir)
        selection = json.loads((ckdir / "selection.json").read_text())
    seconds["selection"] = selection.get("seconds", 0.0) if selection else 0.0
    t0 = time.time()
    decoders, decoder_card = _train_decoders(bundle, train_set, device, req, ckdir, cam_images)
    seconds["decoders"] = time.time() - t0
    if selected:
        bundle.decoders = decoders
        bundle.config = _select_postprocess(bundle, manifest, val_ids, req, ckdir)
        selection["postprocess"] = json.loads((ckdir / "postprocess.json").read_text())
        seconds["selection"] += selection["postprocess"]["seconds"]
    return selection, note, decoders, decoder_card


def _training_card(req: TrainRequest, splits, device: torch.device, seconds: dict[str, float], train_set: SliceSet,
                   cfg: CLDFConfig, decoder_card: dict, own_cams: dict[str, dict | None]) -> dict:
    ranks = req.ranks
    return {
        "command": req.command,
        "manifest": str(req.manifest),
        "split": splits,
        "seed": req.seed,
        "device": device_name(device),
        "wall_clock_s": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "data_card": _data_card(train_set, cfg),
        "decoders": decoder_card,
        **{name: card for name, card in own_cams.items() if card},  # AME-CAM's and CPF-CTE's, when trained
        **({"time_budget": {"minutes": req.time_budget_min, "shares": BUDGET_SHARES,
                            "stopped_at_share": req.budget_stops}} if req.time_budget_min is not None else {}),
        **({"processes": ranks.world} if ranks.active else {}),
    }


def selection_patients(val_ids: list[str], limit: int, seed: int) -> list[str]:
    """The validation patients settings are chosen on: all of them, or a seeded sample of ``limit``."""
    if limit < 1:
        raise ValueError(f"the number of selection patients must be at least 1, not {limit}")
    if len(val_ids) <= limit:
        return list(val_ids)
    return sorted(random.Random(seed).sample(sorted(val_ids), limit))


def _selection_note(n_val: int, needed: int) -> str | None:
    """The warning about too few validation patients for the settings selection, if any."""
    if n_val < needed:
        return (f"settings selection skipped: the validation split has {n_val} patient(s) and needs at least "
                f"{needed} ({NOISY_VAL_PATIENTS} or more recommended); the bundle keeps the preset's settings")
    if n_val < NOISY_VAL_PATIENTS:
        return (f"settings chosen on {n_val} validation patients only: with fewer than {NOISY_VAL_PATIENTS} "
                "the choice is noisy")
    return None


def _check_batches(cfg: CLDFConfig, world: int) -> None:
    """Each data-parallel stage's batch must split evenly over the processes (checked before anything runs)."""
    if world == 1:
        return
    sizes = {"diffusion.batch_size": cfg.diffusion.batch_size,
             "noisy_classifier.batch_size": cfg.noisy_classifier.batch_size,
             "cam_classifier.batch_size": cfg.cam_classifier.batch_size}
    uneven = [f"{k} = {v}" for k, v in sizes.items() if v % world]
    if uneven:
        raise ValueError(f"{', '.join(uneven)} cannot be split evenly over {world} processes: set a batch size "
                         f"divisible by {world} (--set ...), or run another number of processes")


def _train_decoders(bundle: Bundle, data: SliceSet, device, req: TrainRequest, ckdir: Path,
                    cam_images: torch.Tensor | None = None):
    """Every decoder variant for every seed; finished decoders are kept in the checkpoint folder."""
    path = ckdir / "decoders.safetensors"
    cfg = bundle.config
    tag = json.dumps([cfg.seeds.__dict__, cfg.features.__dict__, cfg.decoder.__dict__], sort_keys=True, default=str)
    done = load_file(str(path)) if path.is_file() and safe_open_metadata(path).get("settings") == tag else {}

    def save(state: dict[str, torch.Tensor]) -> None:
        write_safetensors(state, path, metadata={"settings": tag})

    decoders, card = fit_decoders(bundle, data, device, bundle_variants(bundle), req.decoder_seeds, done, save, ckdir,
                                  req.progress, cam_images, req.stage_seconds("decoders"))
    if "positive_slices_visited" in card:
        req.budget_stops["decoders"] = card["positive_slices_visited"]
    short = [e for e in card["epochs"].values() if e < cfg.decoder.epochs]
    if short:
        req.budget_stops["decoder_epochs"] = min(short)
    return decoders, card


def _select(bundle: Bundle, train_set: SliceSet, manifest, val_ids: list[str], req: TrainRequest, ckdir: Path) -> CLDFConfig:
    """Settings chosen on the validation split (cached in the checkpoint folder)."""
    path = ckdir / "selection.json"
    if path.is_file():
        return apply_settings(bundle.config, json.loads(path.read_text())["chosen"])
    t0 = time.time()
    try:
        config, rows, gate_rows = select_settings(bundle, train_set, manifest, val_ids, req.target_labels,
                                                  req.decoder_seeds, req.device, req.progress,
                                                  partial=ckdir / "selection.partial.json",
                                                  seconds=req.stage_seconds("selection"))
    except ShareTooShort as e:
        log.warning("settings selection skipped: %s; the preset's settings are kept", e)
        req.budget_stops["selection"] = 0
        atomic.write_json(path, {"seconds": round(time.time() - t0, 1), "validation_cases": val_ids,
                                 "skipped": f"{e}; the preset's settings were kept", "chosen": {}, "table": []})
        return bundle.config
    doc = {"seconds": round(time.time() - t0, 1), "validation_cases": val_ids,
           "metric": "positive-slice Dice on the validation split, mean over decoder seeds",
           "chosen": rows[0]["settings"], "gate": gate_rows, "table": rows}
    atomic.write_json(path, doc)
    return config


def _select_postprocess(bundle: Bundle, manifest, val_ids: list[str], req: TrainRequest, ckdir: Path) -> CLDFConfig:
    """The post-processing rule chosen on whole validation volumes (cached in the checkpoint folder)."""
    path = ckdir / "postprocess.json"
    if not path.is_file():
        atomic.write_json(path, postprocess_selection(bundle, manifest, val_ids, req.target_labels, req.decoder_seeds,
                                                req.device, req.progress, req.select_refine,
                                                cache=ckdir / "postprocess-volumes",
                                                seconds=req.stage_seconds("postprocess")))
    return apply_settings(bundle.config, json.loads(path.read_text())["chosen"])


def postprocess_selection(bundle: Bundle, manifest, val_ids: list[str], target_labels, decoder_seeds, device: str,
                          progress: bool = True, refine: bool = True, cache: Path | None = None,
                          seconds: float = float("inf")) -> dict:
    """`volume_select.select_postprocess` with its wall-clock, as recorded under ``selection.postprocess``."""
    t0 = time.time()
    chosen, rows, refine_rows = select_postprocess(bundle, manifest, val_ids, target_labels, tuple(decoder_seeds),
                                                   device, progress, refine, cache, seconds)
    return {"seconds": round(time.time() - t0, 1), "validation_cases": val_ids,
            "metric": "per-case 3D Dice on the validation split (false positives on slices without target count), "
                      "mean over decoder seeds",
            "chosen": chosen, "table": rows, **({"refine": refine_rows} if refine_rows else {})}


def tune(bundle_dir: Path, manifest_path: Path, device: str = DEVICE, command: str = "", progress: bool = True,
         refine: bool = True) -> dict:
    """Choose a bundle's post-processing rule (and, with ``refine``, SAM refinement on or off) on its recorded
    validation split and write it into bundle.json.

    For bundles made before the rule existed; `cldf train` chooses it itself. Weights are not touched.
    """
    bundle = load_bundle(bundle_dir)
    card = bundle.card
    val_ids = card.get("training", {}).get("split", {}).get("val")
    if not val_ids:
        raise ValueError(f"{bundle_dir}/bundle.json records no validation split; nothing to choose the rule on")
    doc = postprocess_selection(bundle, load_manifest(manifest_path), val_ids, card.get("task", {}).get("mask_labels"),
                                tuple(sorted(bundle.decoders["cdm"])), device, progress, refine)
    doc["command"] = command
    config = apply_settings(bundle.config, doc["chosen"])
    update_card(bundle_dir, config=config.to_dict(), selection={**(card.get("selection") or {}), "postprocess": doc})
    return doc


# --------------------------------------------------------------------------- card
def _data_card(data: SliceSet, cfg: CLDFConfig) -> dict:
    return {
        "training_slices": len(data),
        "positive_slices": int((data.labels == 1).sum()),
        "negative_slices": int((data.labels == 0).sum()),
        "slice_label_rule": (
            f"positive when the target covers more than {cfg.data.positive_fraction:.1%} of the slice, "
            "negative when absent; slices in between are dropped from training"
        ),
        **({"intensity": intensity_card(data.ranges, list(cfg.data.channels))} if data.ranges is not None else {}),
    }
