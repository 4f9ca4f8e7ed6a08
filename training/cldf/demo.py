"""`cldf demo`: segment one sample with the shipped brain bundle and write a PNG montage.

Uses a test case of the LGG data when it is present, else a generated phantom,
so the demo always runs, also on a fresh checkout without the data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, load_bundle
from .data import load_manifest
from .outputs import write_result
from .phantom import make_phantom
from .segment import Segmenter, VolumeResult

REPO = Path(__file__).resolve().parents[2]
SHIPPED_BUNDLE = REPO / "CLDFSegmentation" / "Resources" / "Models" / "brain-mri-flair-t1"
MONTAGE_ROWS = 3
GAP = 4  # pixels of mid-grey between panels


def default_bundle() -> Path:
    """The shipped brain bundle; refused with the command that builds it when it is missing."""
    if not (SHIPPED_BUNDLE / "bundle.json").is_file():
        raise FileNotFoundError(
            f"the shipped brain bundle is not built yet ({SHIPPED_BUNDLE} has no bundle.json); "
            "run `make bundles` to train it, or pass --bundle DIR"
        )
    return SHIPPED_BUNDLE


def default_data() -> Path:
    """``$CLDF_DATA/lgg/manifest.json``, else the LGG manifest in ``../shared/data`` beside the repository."""
    root = Path(os.environ["CLDF_DATA"]) if os.environ.get("CLDF_DATA") else REPO.parent / "shared" / "data"
    return root / "lgg" / "manifest.json"


def sample_case(bundle: Bundle, manifest_path: Path) -> tuple[str, dict[str, Path]]:
    """The bundle's first test case (else the manifest's first case): its id and the bundle's channels."""
    manifest = load_manifest(manifest_path)
    test = bundle.card.get("training", {}).get("split", {}).get("test") or []
    ids = {c.id for c in manifest.cases}
    case = manifest.case(test[0]) if test and test[0] in ids else manifest.cases[0]
    return case.id, {k: v for k, v in case.channels.items() if k in bundle.channels}


def demo_inputs(bundle: Bundle, data: Path, out: Path) -> tuple[str, dict[str, Path]]:
    """Real data when present, else a phantom written to ``out/phantom`` (with a clear notice)."""
    if data.is_file():
        return sample_case(bundle, data)
    print(f"real data not found at {data}: using a generated phantom instead (set CLDF_DATA or pass --data)")
    paths = make_phantom(out / "phantom")
    missing = [c for c in bundle.channels if c not in paths]
    if missing:
        raise ValueError(f"the phantom has channels {sorted(paths)} but this bundle needs {bundle.channels}")
    return "phantom", {c: paths[c] for c in bundle.channels}


def run_demo(out: Path, bundle: Path | None = None, data: Path | None = None, progress: bool = True) -> Path:
    """Segment a sample, write the results and ``montage.png`` into ``out``; returns the montage's path."""
    out = Path(out)
    b = load_bundle(bundle if bundle is not None else default_bundle())
    case_id, inputs = demo_inputs(b, Path(data) if data is not None else default_data(), out)
    print(f"bundle {b.id}, case {case_id}: {', '.join(f'{k}={v}' for k, v in inputs.items())}")
    result = Segmenter(b, "auto").start(inputs).run(progress)
    paths = write_result(result, out, overwrite=True)  # the demo folder is the demo's own
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs[b.channels[0]]))).astype(np.float32)
    color = tuple(b.card.get("task", {}).get("color", (230, 80, 60)))
    montage = out / "montage.png"
    sitk.WriteImage(sitk.GetImageFromArray(build_montage(image, result, color), isVector=True), str(montage))
    print(f"{int((result.mask > 0).sum())} mask voxels on {int((result.mask.sum(axis=(1, 2)) > 0).sum())} slices")
    print(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
    print(f"montage (image | CAM | mean gradient | mask): {montage}")
    return montage


# --------------------------------------------------------------------------- montage
def pick_slices(mask: np.ndarray, n: int = MONTAGE_ROWS) -> list[int]:
    """The ``n`` slices with the largest mask area (ties: nearest the middle); around the middle if empty."""
    z = len(mask)
    area = (mask.reshape(z, -1) > 0).sum(axis=1).astype(np.int64)
    order = sorted(range(z), key=lambda i: (-area[i], abs(i - (z - 1) / 2)))
    return sorted(order[:n])


def to_unit(a: np.ndarray) -> np.ndarray:
    """Min-max over the whole volume to [0, 1]; a constant volume becomes 0."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float32)


def heat(u: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1]: black -> red -> yellow -> white."""
    u = np.clip(u, 0.0, 1.0)
    return np.stack([np.clip(3 * u, 0, 1), np.clip(3 * u - 1, 0, 1), np.clip(3 * u - 2, 0, 1)], axis=-1)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that have a 4-neighbour outside it."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def overlay(grey: np.ndarray, mask: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """Grey image with the mask tinted and outlined in the segment's colour."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    c = np.asarray(color[:3], dtype=np.float32) / 255.0
    m = mask.astype(bool)
    rgb[m] = 0.6 * rgb[m] + 0.4 * c
    rgb[outline(m)] = c
    return rgb


def build_montage(image: np.ndarray, result: VolumeResult, color: tuple[int, ...]) -> np.ndarray:
    """``(rows * (Y + gap), 4 * (X + gap), 3)`` uint8: image | CAM | mean gradient | mask, one row per slice."""
    grey, cam, mg = to_unit(image), to_unit(result.cam), to_unit(result.mean_gradient)
    rows = []
    for z in pick_slices(result.mask):
        panels = [np.repeat(grey[z][..., None], 3, axis=-1), heat(cam[z]), heat(mg[z]),
                  overlay(grey[z], result.mask[z], color)]
        padded = [np.pad(p, ((0, GAP), (0, GAP), (0, 0)), constant_values=0.5) for p in panels]
        rows.append(np.concatenate(padded, axis=1))
    return (np.concatenate(rows, axis=0)[:-GAP, :-GAP] * 255).round().astype(np.uint8)
