"""The student: a 2D U-Net trained on the pipeline's own masks of the training patients (`trainer.train_student`),
which segments a volume in one forward pass per slice.

The CAM and mean-gradient maps are computed only when asked for (``maps=True``, by the bundle's CLDF networks),
so that the overlays the Slicer module shows stay available. LiteMedSAM refinement and the whole-volume rule
apply as they do to CLDF's masks.
"""

from __future__ import annotations

import numpy as np
import torch

from . import cases
from .bundle import Bundle
from .config import StudentConfig
from .config.constraints import SEGMENTERS
from .defaults import BATCH_SIZE, DEVICE
from .device import autocast, resolve_device
from .postprocess import keep_main_components
from .slice_job import SliceJob, VolumeSegmenter, bundle_refiner
from .slices import from_slices, to_slices
from .volume_result import VolumeResult


def student_slices(normalised: np.ndarray, cfg: StudentConfig) -> torch.Tensor:
    """``(C, Z, Y, X)`` normalised volume -> ``(Z, C * (2 context + 1), R, R)``: each slice with its neighbours
    (the volume's first and last slices repeat beyond its ends)."""
    x = to_slices(normalised, cfg.resolution)
    if cfg.context == 0:
        return x
    k = cfg.context
    index = (torch.arange(len(x))[:, None] + torch.arange(-k, k + 1)[None]).clamp_(0, len(x) - 1)
    return x[index].flatten(1, 2).contiguous()


def probabilities(net: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(B, R, R)`` target probabilities of a batch of student slices."""
    with torch.inference_mode(), autocast(device):
        return torch.sigmoid(net(x.to(device)).float())[:, 0].cpu()


def probability_volume(bundle: Bundle, case: cases.CaseVolume, device: torch.device,
                       batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The student's ``(Z, Y, X)`` target probabilities of a whole case on its grid (its mask: above
    ``student.threshold``, before refinement and the whole-volume rule)."""
    x = student_slices(case.normalised, bundle.config.student)
    p = torch.cat([probabilities(bundle.student, b, device) for b in x.split(batch_size)])
    return from_slices(p, case.volume.shape[2:])


def raw_mask(bundle: Bundle, case: cases.CaseVolume, device: torch.device, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The student's ``(Z, Y, X)`` mask of a whole case on its grid, before refinement and the whole-volume rule."""
    return probability_volume(bundle, case, device, batch_size) > bundle.config.student.threshold


class StudentSegmenter(VolumeSegmenter):
    """A bundle's student on a device.

    Args:
        bundle: a loaded bundle that has a student (`cldf student` adds one to a bundle made without).
        device, batch_size: as for `segment.Segmenter`.
        maps: also compute the CAM and mean-gradient maps (the CLDF networks' cost, for the overlays).
        refine: ``"sam"``, ``"none"`` or None (the bundle's ``student.refine``).
    """

    def __init__(self, bundle: Bundle, device: str = DEVICE, batch_size: int = BATCH_SIZE, maps: bool = False,
                 refine: str | None = None):
        if bundle.student is None:
            raise ValueError(f"the bundle {bundle.id} has no student network; add one with "
                             f"`cldf student --bundle {bundle.path} --data <manifest>` or segment with cldf")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.bundle, self.cfg, self.batch_size = bundle, bundle.config, batch_size
        self.refiner, self.refine_channel = bundle_refiner(bundle, refine or bundle.config.student.refine, batch_size)
        self.maps = None
        if maps:
            from .segment import Segmenter

            self.maps = Segmenter(bundle, device, batch_size, refine="none")
        self.to(resolve_device(device))

    def to(self, device: torch.device) -> "StudentSegmenter":
        self.device = device
        self.bundle.student.to(device).eval()
        if self.maps is not None:
            self.maps.to(device)
        if self.refiner is not None:
            self.refiner.to(device)
        return self

    def _job(self, case: cases.CaseVolume, decoder_seed: int, keep_cache: bool) -> "StudentJob":
        return StudentJob(self, case)


class StudentJob(SliceJob):
    """One volume through the student, one batch of slices per `step()`.

    ``result.presence`` is each slice's highest pixel probability; ``cam``, ``mean_gradient`` and ``seeds`` stay
    zero unless the segmenter computes the maps.
    """

    kind = "student"

    def __init__(self, segmenter: StudentSegmenter, case: cases.CaseVolume):
        super().__init__(case, segmenter.bundle)
        self.segmenter = segmenter
        self.slices = student_slices(case.normalised, segmenter.cfg.student)
        self.map_slices = case.slices(segmenter.cfg.data.resolution) if segmenter.maps is not None else None
        self.refine_image = case.normalised[segmenter.refine_channel] if segmenter.refiner is not None else None
        reference = case.reference
        self.spacing = case.in_plane_spacing
        self.shape = case.volume.shape[1:]
        self.result = VolumeResult(
            reference, cam=np.zeros(self.shape, np.float32), mean_gradient=np.zeros(self.shape, np.float32),
            seeds=np.zeros(self.shape, np.uint8), mask=np.zeros(self.shape, np.uint8),
            presence=np.zeros(self.total, np.float32),
            coarse_mask=np.zeros(self.shape, np.uint8) if segmenter.refiner is not None else None,
            has_maps=segmenter.maps is not None)

    def _run(self, start: int, stop: int) -> None:
        seg, r, hw = self.segmenter, self.result, self.shape[1:]
        p = probabilities(seg.bundle.student, self.slices[start:stop], seg.device)
        r.presence[start:stop] = p.flatten(1).amax(dim=1).numpy()
        r.mask[start:stop] = from_slices(p, hw) > seg.cfg.student.threshold
        if seg.maps is not None:
            maps = seg.maps.slice_maps(self.map_slices[start:stop].to(seg.device), torch.arange(start, stop))
            r.cam[start:stop] = from_slices(maps.cam, hw)
            r.mean_gradient[start:stop] = from_slices(maps.mean_gradient, hw)
            r.seeds[start:stop] = from_slices(maps.seeds, hw, mode="nearest")
        if seg.refiner is not None:
            r.coarse_mask[start:stop] = r.mask[start:stop]
            r.mask[start:stop] = seg.refiner.refine(self.refine_image[start:stop], r.mask[start:stop], self.spacing)

    def _finish(self) -> None:
        rule = self.segmenter.cfg.student.min_component_fraction
        self.result.mask = keep_main_components(self.result.mask, rule)
        if self.result.coarse_mask is not None:
            self.result.coarse_mask = keep_main_components(self.result.coarse_mask, rule)


def make_segmenter(bundle: Bundle, segmenter: str | None = None, device: str = DEVICE, batch_size: int = BATCH_SIZE,
                   extra_maps: tuple[str, ...] = (), overlays: bool = True, refine: str | None = None) -> VolumeSegmenter:
    """The bundle's segmenter (``student.segmenter``, chosen on its validation patients) or the one named.

    ``extra_maps``: CLDF's extra maps (`segment.EXTRA_MAPS`). ``overlays``: a student also computes the CAM and
    mean-gradient maps (CLDF computes them anyway: its masks are made from them).
    """
    name = segmenter or bundle.config.student.segmenter
    if name not in SEGMENTERS:
        raise ValueError(f"segmenter must be one of {', '.join(SEGMENTERS)}, not '{name}'")
    if name == "student":
        if extra_maps:
            raise ValueError(f"extra maps ({', '.join(extra_maps)}) come with the cldf segmenter, not the student")
        return StudentSegmenter(bundle, device, batch_size, maps=overlays, refine=refine)
    from .segment import Segmenter

    return Segmenter(bundle, device, batch_size, maps=extra_maps, refine=refine)
