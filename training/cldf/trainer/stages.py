"""One network's training: the request of a `cldf train` run, a stage's batches and loss, the resumable loop.

Every network stage of `train`, `train_ame` and `train_cpf_cte` is a `Stage` (which slices a step draws, and its
loss) run by `fit`: AdamW, checkpointed in the run's checkpoint folder at least every minute and
at the end, resumed from there, stopped at a step boundary by Ctrl-C or by its share of what is left of
``--time-budget`` (`BUDGET_SHARES`). Only slice labels reach this module; masks never do.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import ClassifierConfig, CLDFConfig
from ..defaults import DEVICE, TARGET_COLOR, TARGET_NAME
from ..device import autocast
from ..models import NoiseSchedule, SliceClassifier
from ..sides import half_images, n_halves
from ..weak_labels import AMBIGUOUS
from . import distributed
from .batches import Draw, StepDraws, augment, flip, step_loader
from .checkpoint import StopAtStepBoundary, load_checkpoint, save_checkpoint
from .distributed import SINGLE, Ranks, any_rank, wrap
from .slice_set import SliceSet

log = logging.getLogger(__name__)

# Each stage's share of ``--time-budget``, in proportion to what it takes on the paper's preset, in the order the
# stages run ("postprocess": the volume-level rules chosen after the decoders).
BUDGET_SHARES = {"cdm": 0.40, "noisy_classifier": 0.15, "cam_classifier": 0.08, "ame_classifier": 0.08,
                 "ame_aggregator": 0.02, "cpf_cte": 0.02, "selection": 0.06, "decoders": 0.1, "postprocess": 0.04,
                 "student": 0.05}
SELECT_PATIENTS = 24  # selection's cost and memory stop growing with the cohort here
MIN_VAL_PATIENTS = 2  # settings selection needs this many validation patients


@dataclass
class TrainRequest:
    manifest: Path
    out: Path
    config: CLDFConfig
    target_labels: list[int] | None = None
    device: str = DEVICE
    seed: int = 0
    decoder_seeds: tuple[int, ...] = (0, 1, 2)
    name: str = "bundle"
    target_name: str = TARGET_NAME
    target_color: tuple[int, int, int] = TARGET_COLOR
    command: str = ""
    checkpoint_every_s: float = 60.0
    select: bool = True
    select_refine: bool = True  # weigh LiteMedSAM refinement on the validation volumes (minutes on a CPU)
    min_val_patients: int = MIN_VAL_PATIENTS  # settings selection is skipped (with a warning) below this
    keep_checkpoints: bool = False
    progress: bool = True
    extra_card: dict = field(default_factory=dict)
    time_budget_min: float | None = None  # wall-clock for this run, split over its stages (`BUDGET_SHARES`)
    budget_stages: tuple[str, ...] | None = None  # the stages the budget is split over (None: those the config trains)
    started: float = field(default_factory=time.monotonic)  # the budget's clock starts with the run
    budget_stops: dict[str, float] = field(default_factory=dict)  # filled in: steps of the stages stopped at their share
    select_patients: int = SELECT_PATIENTS  # settings are chosen on at most this many validation patients
    workers: int | None = None  # DataLoader worker processes (default: 4 on CUDA, none on the CPU)
    ranks: Ranks = SINGLE  # set by `train` under torchrun

    def stage_seconds(self, stage: str) -> float:
        """The seconds a stage may run from now on (unlimited without a time budget): its share of what is left of
        the budget, among the stages still to run, so that what a stage leaves over (or overruns, and whatever runs
        between the stages) goes to (or comes from) the later ones and the run ends with its budget."""
        if self.time_budget_min is None:
            return float("inf")
        left = self.time_budget_min * 60.0 - (time.monotonic() - self.started)
        stages = self._budgeted()
        later = stages[stages.index(stage):] if stage in stages else (stage,)
        return max(0.0, left) * BUDGET_SHARES[stage] / sum(BUDGET_SHARES[s] for s in later)

    def _budgeted(self) -> tuple[str, ...]:
        if self.budget_stages is not None:
            return self.budget_stages
        c = self.config
        ame = c.ame_cam.enabled or c.maps.cam_method == "ame-cam"
        cpf = c.cpf_cte.enabled or c.maps.cam_method == "cpf-cte"
        runs = {"ame_classifier": ame, "ame_aggregator": ame, "cpf_cte": cpf, "selection": self.select,
                "postprocess": self.select, "student": c.student.enabled}
        return tuple(s for s in BUDGET_SHARES if runs.get(s, True))


@dataclass
class Stage:
    """A network stage's batches and loss; ``loss(net, images, labels, draws)`` sees this process's share.

    ``parallel=False``: one process trains on each batch whole, because the loss couples a batch's slices or
    because the stage runs after the data-parallel ones, in process 0 alone.
    """

    data: SliceSet
    draw: Draw
    seed: int
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, StepDraws], torch.Tensor]
    parallel: bool = True


@dataclass
class Fitted:
    seconds: float
    steps: int  # steps done: fewer than asked when the stage stopped at its share of ``--time-budget``


def cdm_stage(data: SliceSet, schedule: NoiseSchedule, cfg: CLDFConfig, seed: int, device) -> Stage:
    def draw(g: torch.Generator) -> torch.Tensor:
        return torch.randint(len(data), (cfg.diffusion.batch_size,), generator=g)

    def loss(net, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        x0 = flip(x, d)
        noise = d.randn(*x0.shape[1:])
        t = d.randint(0, schedule.num_train_timesteps)
        xt = schedule.add_noise(x0, noise, t)
        with autocast(device):
            pred = net(xt.to(device), t.to(device), class_labels=y.to(device))
        return F.mse_loss(pred.float(), noise.to(device))

    return Stage(data, draw, seed, loss)


def fit_classifier(name: str, cfg: ClassifierConfig, data: SliceSet, schedule: NoiseSchedule, seed: int,
                   device: torch.device, ckdir: Path, req: TrainRequest,
                   orientation: str = "") -> tuple[SliceClassifier, float]:
    """Train (or resume) one slice classifier on slice labels; returns it and its training seconds.

    ``orientation``: the slices' orientation code, which ``cfg.sides`` other than "whole" need (`sides`).
    """
    net = SliceClassifier(cfg, data.images.shape[1]).to(device)
    stage = classifier_stage(data, schedule, cfg, seed, device, orientation)
    fitted = fit(name, net, stage, cfg.steps, cfg.lr, ckdir, device, req)
    return net, fitted.seconds


def classifier_stage(data: SliceSet, schedule: NoiseSchedule, cfg: ClassifierConfig, seed: int, device,
                      orientation: str = "") -> Stage:
    if not 0 <= cfg.max_timestep < schedule.num_train_timesteps:
        raise ValueError(f"classifier max_timestep {cfg.max_timestep} is outside the schedule's "
                         f"0..{schedule.num_train_timesteps - 1}")
    pos = (data.labels == 1).nonzero()[:, 0]
    neg = (data.labels == 0).nonzero()[:, 0]

    def draw(g: torch.Generator) -> torch.Tensor:
        half = cfg.batch_size // 2
        return torch.cat([pos[torch.randint(len(pos), (half,), generator=g)],
                          neg[torch.randint(len(neg), (cfg.batch_size - half,), generator=g)]])

    per_side = cfg.sides == "both" and data.side_labels is not None
    if per_side:  # each half its own side's slice label: (slice, left, right) travel together
        data = dataclasses.replace(data, labels=torch.cat([data.labels[:, None], data.side_labels], dim=1))

    def loss(net, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        x0 = augment(x, d, cfg.intensity, cfg.flips) if cfg.augment else flip(x, d, cfg.flips)
        k = n_halves(cfg.sides)
        if cfg.sides != "whole":  # half slices (left halves, then right), each with its slice's or its side's label
            x0, y = half_images(x0, cfg.sides, orientation), (y[:, 1:].T.flatten() if per_side else y.repeat(k))
        t = d.randint(0, cfg.max_timestep + 1).repeat(k)
        xt = schedule.add_noise(x0, d.randn(*x0.shape[1:]).repeat(k, 1, 1, 1), t) if cfg.max_timestep > 0 else x0
        with autocast(device):
            logits = net(xt.to(device), t.to(device))
        return F.cross_entropy(logits.float(), y.to(device), ignore_index=AMBIGUOUS)  # a side's ambiguous half

    return Stage(data, draw, seed, loss)


def _budget_total(bar: tqdm, done: int, steps: int, rate: float, seconds_left: float) -> None:
    """Under a time budget the bar runs to the step the budget is expected to stop at, so its ETA means it."""
    bar.total = min(steps, done + max(1, int(rate * max(0.0, seconds_left))))


def fit(name: str, model: torch.nn.Module, stage: Stage, steps: int, lr: float,
        ckdir: Path, device: torch.device, req: TrainRequest, seconds: float | None = None) -> Fitted:
    """AdamW for ``steps`` steps, resuming from and saving to ``ckdir/name`` (process 0 saves).

    Stops early, at a step boundary, once the stage has used ``seconds`` from now (default: its share of what is
    left of ``req.time_budget_min``, `TrainRequest.stage_seconds`).
    """
    ranks = req.ranks if stage.parallel else SINGLE
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    meta = load_checkpoint(ckdir / name, model, opt) or {"step": 0, "seconds": 0.0, "loss": []}
    model.to(device)
    limit = meta["seconds"] + (req.stage_seconds(name) if seconds is None else seconds)
    spent = meta["step"] > 0 and meta["seconds"] >= limit  # a stage always takes its first step
    if meta["step"] < steps and spent:
        req.budget_stops[name] = meta["step"]
    if meta["step"] >= steps or spent:
        return Fitted(float(meta["seconds"]), meta["step"])
    if meta["step"]:
        log.info("%s: continuing from the checkpoint at step %d of %d", name, meta["step"], steps)
    model.train()
    net = wrap(model, ranks, device)
    batches = step_loader(stage.data, stage.draw, stage.seed, meta["step"], steps, device, ranks.rank, ranks.world,
                          req.workers)
    bar = tqdm(initial=meta["step"], total=steps, desc=name, unit="step", disable=not (req.progress and req.ranks.main))
    t_start, t_saved, running = time.time(), time.time(), []
    first, t_first = meta["step"], time.time()
    with StopAtStepBoundary() as stop:  # Ctrl-C, SIGTERM (or Cancel in Slicer) end the step in progress, save, stop
        for step, (x, y) in zip(range(meta["step"], steps), batches):
            loss = stage.loss(net, x, y, StepDraws(stage.seed, step, stage.draw, ranks.rank, ranks.world))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(loss.item())
            bar.update()
            if len(running) == 50:
                meta["loss"].append([step + 1, sum(running) / len(running)])
                bar.set_postfix(loss=f"{meta['loss'][-1][1]:.4f}")
                running = []
            if limit < float("inf"):
                _budget_total(bar, step + 1, steps, (step + 1 - first) / (time.time() - t_first),
                              limit - meta["seconds"] - (time.time() - t_start))
            over = step + 1 < steps and meta["seconds"] + time.time() - t_start >= limit  # (the last step ends it anyway)
            halt = any_rank(stop.requested or over, ranks, device)  # every process stops at the same step
            if halt or time.time() - t_saved > req.checkpoint_every_s or step + 1 == steps:
                meta["step"] = step + 1
                meta["seconds"] += time.time() - t_start
                t_start = t_saved = time.time()
                if ranks.main:
                    save_checkpoint(ckdir / name, model, opt, meta)
            if halt and not over:
                raise KeyboardInterrupt
            if halt:
                req.budget_stops[name] = meta["step"]
                log.info("%s: stopped at step %d of %d, its share of the time budget used", name, meta["step"], steps)
                break
    bar.close()
    distributed.barrier(ranks)  # the checkpoint is saved before any process reads it again
    return Fitted(float(meta["seconds"]), meta["step"])
