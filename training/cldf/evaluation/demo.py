"""`cldf demo`: segment the shipped sample scan with the shipped brain bundle and write a PNG montage.

The sample is a real LGG patient of the bundle's test split (FLAIR, T1 and its
manual mask) under ``Resources/SampleData``, so the demo runs
on a fresh checkout; ``--data MANIFEST`` takes a case from another manifest. The
montage shows the slices with the most ground-truth tumour, image | ground truth
| CAM | mean gradient | CLDF mask, and the demo prints the mask's Dice against
the ground truth. Ground truth is read for display and scoring only, as in `evaluate`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import atomic, metrics
from ..bundle import Bundle, load_bundle
from ..defaults import DEVICE, TARGET_COLOR
from ..images import InputError
from ..manifest import Case, load_manifest
from ..outputs import write_result
from ..segment import Segmenter
from ..volume_result import VolumeResult
from ..weak_labels import target_mask

REPO = Path(__file__).resolve().parents[3]
SHIPPED_BUNDLE = REPO / "CLDFSegmentation" / "Resources" / "Models" / "brain-mri-flair-t1"
SAMPLE_DIR = REPO / "Resources" / "SampleData" / "TCGA_CS_6669_20020102"
MONTAGE_ROWS = 3
GAP = 4  # pixels of mid-grey between panels
COLUMNS = ("image", "ground truth", "CAM", "mean gradient", "CLDF mask")
GROUND_TRUTH_COLOR = (80, 200, 80)  # also `cldf figure`'s


def default_bundle() -> Path:
    """The shipped brain bundle; refused with the command that builds it when it is missing."""
    if not (SHIPPED_BUNDLE / "bundle.json").is_file():
        raise FileNotFoundError(
            f"the shipped brain bundle is not built yet ({SHIPPED_BUNDLE} has no bundle.json); "
            "run `make bundles` to train it, or pass --bundle DIR"
        )
    return SHIPPED_BUNDLE


def default_data(sample_dir: Path | None = None) -> Path:
    """The shipped sample's manifest (in `SAMPLE_DIR`); refused with what to do when the folder is missing."""
    manifest = (sample_dir or SAMPLE_DIR) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"the demo's sample scan is missing ({manifest} not found); restore it with "
            "`git checkout -- Resources/SampleData`, or pass --data MANIFEST "
            "(a dataset manifest whose cases have masks, e.g. ../shared/data/lgg/manifest.json)"
        )
    return manifest


def sample_case(bundle: Bundle, manifest_path: Path) -> Case:
    """The bundle's first test case in the manifest (else the manifest's first case); it must have a mask."""
    manifest = load_manifest(manifest_path)
    test = bundle.card.get("training", {}).get("split", {}).get("test") or []
    ids = {c.id for c in manifest.cases}
    case = next((manifest.case(i) for i in test if i in ids), manifest.cases[0])
    if case.mask is None:
        raise InputError(f"case '{case.id}' in {manifest_path} has no mask: the demo compares the CLDF mask with "
                         "the ground truth; pass a manifest whose cases have masks, or run `cldf segment`")
    return case


def run_demo(out: Path, bundle: Path | None = None, data: Path | None = None, progress: bool = True,
             refine: str | None = None) -> Path:
    """Segment the sample, write the results and ``montage.png`` into ``out``, print the Dice; returns the montage.

    ``refine``: None refines as the bundle says (the product as shipped); ``"none"`` skips refinement.
    """
    out = Path(out)
    b = load_bundle(bundle if bundle is not None else default_bundle())
    manifest = Path(data) if data is not None else default_data()
    case = sample_case(b, manifest)
    inputs = {c: case.channels[c] for c in b.channels if c in case.channels}
    truth = target_mask(case.mask, b.card.get("task", {}).get("mask_labels"))
    print(f"bundle {b.id}, case {case.id} from {manifest}: {', '.join(f'{k}={v}' for k, v in inputs.items())}")
    result = Segmenter(b, DEVICE, refine=refine).start(inputs).run(progress).on_input_grid()
    paths = write_result(result, out, overwrite=True, also_ours=("montage.png",))  # the demo folder is the demo's own
    print(f"{int((result.mask > 0).sum())} mask voxels on {int((result.mask.sum(axis=(1, 2)) > 0).sum())} slices")
    print(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
    print(dice_report(result.mask > 0, truth))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs[b.channels[0]]))).astype(np.float32)
    color = tuple(b.card.get("task", {}).get("color", TARGET_COLOR))
    montage = out / "montage.png"
    rgb = build_montage(image, truth, result, color, case.id, result.reference.GetDirection())
    write_png(rgb, montage)
    rows = ", ".join(str(z) for z in pick_slices(truth))
    print(f"montage ({' | '.join(COLUMNS)}; slices {rows}, those with the most ground truth, "
          f"counted from 0 as in slices.csv): {montage}")
    return montage


def write_png(rgb: np.ndarray, path: Path) -> None:
    """Write an ``(H, W, 3)`` uint8 array as a PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp))


# --------------------------------------------------------------------------- Dice
def dice_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """3D Dice of the volume, mean Dice over the slices holding target (nan if none) and their number."""
    per_slice = metrics.target_slice_dice(pred, truth)
    return metrics.dice(pred, truth), float(np.mean(per_slice)) if per_slice else math.nan, len(per_slice)


def dice_report(pred: np.ndarray, truth: np.ndarray) -> str:
    """One line: the 3D Dice and the mean Dice over the slices holding target."""
    d3, mean, n = dice_scores(pred, truth)
    per_slice = f"mean over the {n} slices holding tumour {mean:.3f}" if n else "no slice holds tumour"
    return f"Dice against the ground truth: 3D {d3:.3f}, {per_slice}"


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


def slice_panels(grey: np.ndarray, truth: np.ndarray, cam: np.ndarray, mg: np.ndarray, mask: np.ndarray,
                 color: tuple[int, ...]) -> list[np.ndarray]:
    """One slice's ``(Y, X, 3)`` panels in [0, 1], in the order of `COLUMNS`."""
    return [np.repeat(grey[..., None], 3, axis=-1), overlay(grey, truth, GROUND_TRUTH_COLOR), heat(cam), heat(mg),
            overlay(grey, mask, color)]


def radiological(panel: np.ndarray, direction: tuple[float, ...]) -> np.ndarray:
    """Flip a ``(Y, X, 3)`` panel so anterior is up and the patient's right is on the left (LPS voxel order)."""
    if direction[4] < 0:
        panel = panel[::-1]
    if direction[0] < 0:
        panel = panel[:, ::-1]
    return np.ascontiguousarray(panel)


def panel_row(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, each followed by a mid-grey gap to the right and below."""
    return np.concatenate([np.pad(p, ((0, GAP), (0, GAP), (0, 0)), constant_values=0.5) for p in panels], axis=1)


def build_montage(image: np.ndarray, truth: np.ndarray, result: VolumeResult, color: tuple[int, ...],
                  case_id: str = "", direction: tuple[float, ...] | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8: a header naming `COLUMNS`, then per slice with the most ground truth a line
    (case, slice counted from 0, slice Dice) over its panels. ``direction``: shown radiologically, as `cldf figure`."""
    grey, cam, mg = to_unit(image), to_unit(result.cam), to_unit(result.mean_gradient)
    width = image.shape[2]
    blocks = [panel_row([text_strip(c, width) for c in COLUMNS])]
    for z in pick_slices(truth):
        pred = result.mask[z] > 0
        panels = slice_panels(grey[z], truth[z], cam[z], mg[z], pred, color)
        if direction is not None:
            panels = [radiological(p, direction) for p in panels]
        line = text_strip(f"{case_id}  slice {z}  Dice {metrics.dice(pred, truth[z]):.2f}", len(COLUMNS) * (width + GAP) - GAP)
        blocks += [np.pad(line, ((0, 0), (0, GAP), (0, 0)), constant_values=0.5), panel_row(panels)]
    return (np.concatenate(blocks, axis=0)[:-GAP, :-GAP] * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- text
# A 3x5 pixel font: one number per row, top to bottom; bit 4 is the left column, bit 1 the right.
FONT: dict[str, tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 3, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7), " ": (0, 0, 0, 0, 0), "_": (0, 0, 0, 0, 7), "-": (0, 0, 7, 0, 0), ".": (0, 0, 0, 0, 2),
    ":": (0, 2, 0, 2, 0), "/": (1, 1, 2, 4, 4), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "?": (7, 1, 2, 0, 2),
}


def text_bitmap(text: str, scale: int = 2) -> np.ndarray:
    """Boolean ``(5 * scale, 4 * scale * len(text))`` bitmap of ``text`` (upper case; unknown characters as ``?``)."""
    glyphs = [FONT.get(ch, FONT["?"]) for ch in text.upper()] or [FONT[" "]]
    cells = np.array([[[(row >> (2 - i)) & 1 for i in range(3)] + [0] for row in g] for g in glyphs], dtype=bool)
    return np.kron(cells.transpose(1, 0, 2).reshape(5, -1), np.ones((scale, scale), dtype=bool))


def text_strip(text: str, width: int, scale: int = 2, pad: int = 4) -> np.ndarray:
    """``(5 * scale + 2 * pad, width, 3)`` in [0, 1]: white text on black, left-aligned, cut at ``width``."""
    bits = text_bitmap(text, scale)[:, : max(width - 2 * pad, 0)]
    strip = np.zeros((bits.shape[0] + 2 * pad, width, 3), dtype=np.float32)
    strip[pad : pad + bits.shape[0], pad : pad + bits.shape[1]] = bits[..., None]
    return strip
