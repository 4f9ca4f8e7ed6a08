"""What a segmentation run returns: the outputs on the bundle's grid, and the same outputs on the input's own grid."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from .orientation import orientation_of, slice_order
from .orientation import reorient as _reorient


@dataclass
class SliceCache:
    """What the last, cheap step of inference needs per slice, on the bundle's grid."""

    embeddings: np.ndarray  # (Z, E, R, R) float32 pixel embeddings of the run's decoder
    seeds: np.ndarray  # (Z, R, R) uint8: 1 foreground, 2 background, before the gate
    body: np.ndarray  # (Z, R, R) bool
    presence: np.ndarray  # (Z,) the gate's probabilities
    kmeans: dict = field(default_factory=dict)  # K-means results by (slice, k, within_body), as they are made


@dataclass
class VolumeResult:
    """Outputs on the input's voxel grid, ``(Z, Y, X)`` arrays, plus the reference image for geometry."""

    reference: sitk.Image
    cam: np.ndarray
    mean_gradient: np.ndarray
    seeds: np.ndarray
    mask: np.ndarray
    presence: np.ndarray
    similarity: np.ndarray | None = None  # (Z,) the mask's similarity to the foreground prototype; nan where empty
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    coarse_mask: np.ndarray | None = None  # with refinement: the mask before it (resized from the bundle's grid)
    cache: SliceCache | None = None  # with ``keep_cache``: for re-deciding the masks (`Redecider`)
    input_reference: sitk.Image | None = None  # the input as stored, when it was reoriented to the bundle's orientation
    mask_voxels: np.ndarray | None = None  # (Z,) per slice of `presence` (set by `on_input_grid`)
    has_maps: bool = True  # False: cam, mean_gradient and seeds were not computed (a student run without maps)

    def on_input_grid(self) -> "VolumeResult":
        """The outputs in the input's own voxel order (they are computed in the bundle's orientation).

        Per-slice values (presence, similarity) follow the input's slices when its slice axis is the
        bundle's; otherwise they stay in the bundle's slice order.
        """
        src = self.input_reference
        areas = self.mask.reshape(len(self.mask), -1).sum(axis=1)
        if src is None or orientation_of(src) == orientation_of(self.reference):
            return replace(self, input_reference=None, mask_voxels=areas)
        code = orientation_of(src)

        def back(a: np.ndarray | None) -> np.ndarray | None:
            if a is None:
                return None
            image = sitk.GetImageFromArray(a)
            image.CopyInformation(self.reference)
            return sitk.GetArrayFromImage(_reorient(image, code))

        order = slice_order(self.reference, code)
        per_slice = (lambda v: v) if order is None else (lambda v: None if v is None else v[order])
        return replace(self, reference=src, input_reference=None, cam=back(self.cam),
                       mean_gradient=back(self.mean_gradient), seeds=back(self.seeds), mask=back(self.mask),
                       presence=per_slice(self.presence), similarity=per_slice(self.similarity),
                       mask_voxels=per_slice(areas),
                       extra={k: back(v) for k, v in self.extra.items()}, coarse_mask=back(self.coarse_mask), cache=None)
