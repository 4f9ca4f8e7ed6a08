"""Settings of the stages after the pixel decoder: LiteMedSAM refinement and the student (`CLDFConfig` groups them with the others in `sections`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RefineConfig:
    """Full-resolution refinement of the final mask with a medical SAM (S2C's idea; `cldf.refine`).

    Attributes:
        method: ``"none"`` keeps the mask as resized from the bundle's grid; ``"sam"`` prompts
            LiteMedSAM with one box per connected component on each slice, on the scan's own grid.
        channel: the bundle channel SAM sees (None: the bundle's first channel).
        margin_mm: each box is widened by this much on every side (mm, with the in-plane spacing).
        max_grow_mm: SAM's mask of a component is kept only within this distance of the
            component (mm), so it cannot run away; None: no limit.

    The defaults of ``margin_mm`` and ``max_grow_mm`` gave the best mean slice Dice over the brain
    and liver bundles' validation patients in ``benchmarks/refine_validation.py`` (a tie with no
    growth limit; the bounded one is kept). 10 mm is the grid's largest margin.
    """

    method: str = "none"
    channel: str | None = None
    margin_mm: float = 10.0
    max_grow_mm: float | None = 10.0


@dataclass
class StudentConfig:
    """The student: a 2D U-Net trained on the pipeline's masks of the training patients (`cldf.student`).

    Attributes:
        enabled: `cldf train` trains it (and validation decides whether the bundle segments with it).
        segmenter: what ``cldf segment`` uses unless told: ``"cldf"`` (maps, features, clustering) or
            ``"student"`` (one forward pass per slice); chosen on the validation patients.
        resolution: square slice size the student sees (the pseudo-masks are made on the scan's grid, so the
            student may see finer slices than the CLDF networks).
        context: neighbouring slices on each side given as extra channels (0: 2D; 1: 2.5D, three slices).
        channels: the U-Net's widths, one per level.
        steps, batch_size, lr: AdamW steps, slices per step, learning rate.
        threshold: probability above which a pixel is target.
        refine: ``"sam"``: LiteMedSAM sharpens the student's masks on the scan's grid, as ``refine.method`` does
            the pipeline's; ``"none"``: it does not. Chosen on the validation patients.
        min_component_fraction: the student's whole-volume rule (`postprocess.keep_main_components`), chosen on
            the validation patients like the pipeline's.
        seed: initialisation, batches and augmentation.
    """

    enabled: bool = True
    segmenter: str = "cldf"
    resolution: int = 128
    context: int = 0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    threshold: float = 0.5
    refine: str = "none"
    min_component_fraction: float = 0.0
    seed: int = 0
