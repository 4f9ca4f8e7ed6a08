"""The CAM classifier on one side of the body: an anatomical prior for organs with a side.

Trained on whole slices with slice labels, the clean-slice classifier can learn the *level* of a
slice instead of the organ: every abdominal slice with a kidney also shows the lumbar spine, and
its CAM then lights up the spine. Organs have sides, though: the spleen lies on the patient's
left, a kidney on each side. With ``cam_classifier.sides`` the classifier sees half slices only:

- ``"left"`` / ``"right"``: the patient's left (right) half of every slice, with the slice label;
- ``"both"``: each half as its own image; the patient's right half is mirrored so that both look
  like a left half (midline first), and one classifier learns both. Each half is labelled by its
  own side's slice label when ``left_labels`` / ``right_labels`` name the mask labels of a paired
  organ (the kidneys: 3 and 2), else by the slice label;
- ``"whole"``: the whole slice (the paper).

A slice's presence is the most confident of its halves, its CAM the halves' maps put back in
place, each weighted by its presence relative to the slice's (zero on a half the classifier does
not see). Halves are cut at the centre of the slice (the padded square), in the bundle's
``data.orientation``, whose first letter (L or R) says which way the columns run; the patient is
expected near the centre of the field of view. Mirroring augmentation must then be off
(``cam_classifier.flips = false``) wherever a half has its own label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config.constraints import SIDES
from .weak_labels import side_slice_labels

if TYPE_CHECKING:
    from .config import CLDFConfig


def check_sides(sides: str, orientation: str) -> None:
    """Refuse an unknown setting, or sides on slices whose columns do not run left-right."""
    if sides not in SIDES:
        raise ValueError(f"unknown cam_classifier.sides '{sides}'; choose one of {list(SIDES)}")
    if sides != "whole" and (not orientation or orientation[0] not in "LR"):
        raise ValueError(f"cam_classifier.sides = '{sides}' needs axial slices whose columns run left-right "
                         f"(data.orientation starting with L or R, e.g. LPS), not '{orientation or 'unset'}'")


def _left_first(orientation: str) -> bool:
    """Do the columns run towards the patient's left ("L..." codes: +x points left)?"""
    return orientation[0] == "L"


def half_images(x: torch.Tensor, sides: str, orientation: str) -> torch.Tensor:
    """``(B, C, H, W)`` slices -> ``(k B, C, H, W / 2)`` half slices, midline first (left halves, then right)."""
    if sides == "whole":
        return x
    if x.shape[-1] % 2:
        raise ValueError(f"slices of odd width {x.shape[-1]} cannot be cut in halves")
    w = x.shape[-1] // 2
    upper, lower = x[..., w:], x[..., :w].flip(-1)  # both midline first
    left, right = (upper, lower) if _left_first(orientation) else (lower, upper)
    return {"left": left, "right": right, "both": torch.cat([left, right])}[sides]


def n_halves(sides: str) -> int:
    return 2 if sides == "both" else 1


def place_halves(maps: torch.Tensor, sides: str, orientation: str) -> torch.Tensor:
    """``(k B, H, W / 2)`` maps of `half_images` -> ``(B, H, W)`` maps on the whole slices (unseen halves 0)."""
    if sides == "whole":
        return maps
    k = n_halves(sides)
    b = len(maps) // k
    parts = dict(zip(["left", "right"] if sides == "both" else [sides], maps.split(b)))
    zero = torch.zeros_like(maps[:b])
    left, right = parts.get("left", zero), parts.get("right", zero)
    upper, lower = (left, right) if _left_first(orientation) else (right, left)
    return torch.cat([lower.flip(-1), upper], dim=-1)


class SidedClassifier(nn.Module):
    """A slice classifier applied to half slices: a slice's logits are those of its most confident half."""

    def __init__(self, classifier: nn.Module, sides: str, orientation: str):
        super().__init__()
        check_sides(sides, orientation)
        self.classifier, self.sides, self.orientation = classifier, sides, orientation

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_: object) -> torch.Tensor:
        k = n_halves(self.sides)
        logits = self.classifier(half_images(x, self.sides, self.orientation), timesteps.repeat(k))
        logits = logits.view(k, len(x), -1)
        best = (logits[..., 1] - logits[..., 0]).argmax(dim=0)
        return logits[best, torch.arange(len(x), device=x.device)]


class SidedCAM:
    """A CAM source (``x -> (maps, presence)``) run on half slices, its maps put back on the whole slices."""

    def __init__(self, cam: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], sides: str, orientation: str):
        check_sides(sides, orientation)
        self.cam, self.sides, self.orientation = cam, sides, orientation

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, presence = self.cam(half_images(x, self.sides, self.orientation))
        per_half = presence.view(n_halves(self.sides), len(x))
        best = per_half.amax(dim=0)
        weight = (per_half / best.clamp_min(torch.finfo(best.dtype).tiny)).flatten()  # a half judged absent adds little
        return place_halves(maps * weight[:, None, None].to(maps.dtype), self.sides, self.orientation), best


def on_sides(cam, sides: str, orientation: str):
    """``cam`` itself for ``"whole"``, else wrapped to run on half slices (`SidedCAM`)."""
    return cam if sides == "whole" else SidedCAM(cam, sides, orientation)


def sided(classifier: nn.Module, sides: str, orientation: str) -> nn.Module:
    """``classifier`` itself for ``"whole"``, else wrapped to judge half slices (`SidedClassifier`)."""
    return classifier if sides == "whole" else SidedClassifier(classifier, sides, orientation)


# --------------------------------------------------------------------------- training settings
def side_labels(cfg: CLDFConfig, manifest, case_ids: list[str], target_labels: list[int] | None):
    """The training slices' per-side labels when ``cam_classifier.left_labels`` / ``right_labels`` ask for them."""
    cc = cfg.cam_classifier
    if not cc.left_labels:
        return None
    return side_slice_labels(manifest, case_ids, target_labels, (list(cc.left_labels), list(cc.right_labels)),
                             cfg.data.positive_fraction, cfg.data.orientation)


def check_side_settings(cfg: CLDFConfig, target_labels: list[int] | None) -> None:
    """``cam_classifier.sides`` and its per-side labels fit the slices and the target (checked before any work)."""
    cc = cfg.cam_classifier
    check_sides(cc.sides, cfg.data.orientation)
    if cfg.noisy_classifier.sides != "whole":
        raise ValueError("noisy_classifier.sides must stay 'whole': the mean gradient needs the whole slice "
                         "(cam_classifier.sides is the setting for an organ with a side)")
    if cc.flips and (cc.sides in ("left", "right") or cc.left_labels or cc.right_labels):
        per_side = " with a label per side" if cc.left_labels or cc.right_labels else ""
        raise ValueError(f"cam_classifier.sides = '{cc.sides}'{per_side} needs cam_classifier.flips = false: "
                         "a mirrored slice puts the other side's half where this side's is expected")
    if not (cc.left_labels or cc.right_labels):
        return
    if cc.sides != "both" or not (cc.left_labels and cc.right_labels):
        raise ValueError("cam_classifier.left_labels and right_labels go together, with cam_classifier.sides = 'both'")
    if target_labels is None or set(cc.left_labels) | set(cc.right_labels) != set(target_labels):
        raise ValueError(f"cam_classifier.left_labels {list(cc.left_labels)} and right_labels "
                         f"{list(cc.right_labels)} must together be the target's mask labels ({target_labels})")
