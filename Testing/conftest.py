"""Shared fixtures: real scans and a tiny bundle trained on them in seconds.

The scans come from the shared data folder (``../shared/data``, or ``CLDF_DATA``) when it is there; on a bare
checkout from the patient that ships as sample data (``Resources/SampleData``, with its manual mask), from
which a four-case cohort is derived (`sample_cohort`). Only the tests that need the whole LGG set skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.config import preset
from cldf.trainer.train import TrainRequest, train

REPO = Path(__file__).resolve().parents[1]
BRAIN_BUNDLE = REPO / "CLDFSegmentation" / "Resources" / "Models" / "brain-mri-flair-t1"
#: A test-split patient of the shipped brain bundle, with a large tumour in slices 9..18; it ships as sample data.
TUMOUR_CASE = "TCGA_CS_6669_20020102"
SAMPLE_DIR = REPO / "Resources" / "SampleData" / TUMOUR_CASE


@pytest.fixture(scope="session", autouse=True)
def slice_cache(tmp_path_factory) -> Path:
    """Training's slice cache in a folder of the test session (not the user's cache)."""
    folder = tmp_path_factory.mktemp("slice-cache")
    os.environ["CLDF_CACHE"] = str(folder)
    return folder


def data_root() -> Path:
    return Path(os.environ.get("CLDF_DATA", REPO.parent / "shared" / "data"))


def lgg_data() -> Path | None:
    """The whole LGG set's manifest, None when the shared data folder is not there."""
    path = data_root() / "lgg" / "manifest.json"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def lgg_manifest() -> Path:
    """The whole LGG set (40 patients); tests that need more than the sample patient skip without it."""
    path = data_root() / "lgg" / "manifest.json"
    if not path.is_file():
        pytest.skip(f"the whole LGG set is not found at {path} (set CLDF_DATA to the folder holding lgg/); "
                    "this test needs more patients than the shipped sample")
    return path


SMALL_SPLITS = ["train", "train", "val", "test"]


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    """Four real LGG cases with a fixed split (2 train, 1 val, 1 test), paths absolute.

    From the shared data when it is there, else `sample_cohort` (the shipped patient and three cases made from it).
    """
    folder = tmp_path_factory.mktemp("data")
    full = lgg_data()
    if full is None:
        return sample_cohort(folder)
    raw = json.loads(full.read_text(encoding="utf-8"))
    root = full.parent
    cases = []
    for case, split in zip(raw["cases"][:4], SMALL_SPLITS):
        cases.append({"id": case["id"], "split": split, "mask": str(root / case["mask"]),
                      "channels": {k: str(root / v) for k, v in case["channels"].items()}})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"name": "lgg-small", "cases": cases}))
    return path


#: How `sample_cohort` makes three more cases of the sample patient: a left-right mirror (the tumour in the
#: other hemisphere), and two overlapping slabs of slices, one of them mirrored too. Each keeps slices with
#: tumour and slices without, the header of the sample (slabs: the origin moves with the first slice).
SAMPLE_DERIVED = {"mirrored": (True, slice(None)), "upper": (False, slice(4, None)), "lower-mirrored": (True, slice(0, 18))}


def sample_cohort(folder: Path) -> Path:
    """A manifest of four cases from the shipped sample patient, split like `small_manifest`'s (the sample: test).

    Mirrors and slabs of one scan are not new patients: enough for the mechanics that need a training,
    a validation and a test split (resuming, selection, cohorts), not for judging how well a bundle generalises.
    """
    sample = json.loads((SAMPLE_DIR / "manifest.json").read_text(encoding="utf-8"))["cases"][0]
    files = {**sample["channels"], "mask": sample["mask"]}
    cases = []
    for name, (mirror, slab) in SAMPLE_DERIVED.items():
        written = {}
        for key, file in files.items():
            image = sitk.ReadImage(str(SAMPLE_DIR / file))
            voxels = sitk.GetArrayFromImage(image)
            mirrored = sitk.GetImageFromArray(np.ascontiguousarray(voxels[:, :, ::-1] if mirror else voxels))
            mirrored.CopyInformation(image)  # the same header: the anatomy itself is mirrored
            written[key] = str(folder / name / file)
            (folder / name).mkdir(exist_ok=True)
            sitk.WriteImage(mirrored[:, :, slab], written[key])
        mask = written.pop("mask")
        cases.append({"id": f"{sample['id']}-{name}", "channels": written, "mask": mask})
    cases.append({"id": sample["id"], "mask": str(SAMPLE_DIR / sample["mask"]),
                  "channels": {k: str(SAMPLE_DIR / v) for k, v in sample["channels"].items()}})
    for case, split in zip(cases, SMALL_SPLITS):
        case["split"] = split
    path = folder / "manifest.json"
    path.write_text(json.dumps({"name": "lgg-sample-cohort", "cases": cases}))
    return path


# A student stage of seconds, for every test that trains one (through `train` or the command line's `--set`).
# (fewer steps or a smaller rate leave a speckled mask, and SAM then prompts each of its thousands of specks)
TINY_STUDENT_SETTINGS = {"student.resolution": 32, "student.channels": [8, 16], "student.steps": 40,
                         "student.lr": 0.01, "student.batch_size": 4}
TINY_STUDENT = tuple(a for k, v in TINY_STUDENT_SETTINGS.items() for a in ("--set", f"{k}={json.dumps(v, separators=(',', ':'))}"))


def tiny_config():
    cfg = preset("cpu")
    cfg.data.resolution = 32
    for net in (cfg.diffusion, cfg.noisy_classifier, cfg.cam_classifier):
        net.steps = 8
        net.batch_size = 4
    cfg.decoder.epochs = 1
    cfg.decoder.pixels_per_class = 64
    for key, value in TINY_STUDENT_SETTINGS.items():
        cfg.set(key, value)
    return cfg


def train_tiny(manifest: Path, out: Path) -> Path:
    """A real (tiny) training run on real scans: every stage, a few optimisation steps each."""
    return train(TrainRequest(manifest=manifest, out=out, config=tiny_config(), target_labels=[1],
                              decoder_seeds=(0, 1), name="tiny", target_name="tumour", progress=False,
                              select_refine=False, min_val_patients=1))  # selection on the one validation case


@pytest.fixture(scope="session")
def tiny_bundle(small_manifest: Path, tmp_path_factory) -> Path:
    """`train_tiny` on four real LGG cases."""
    return train_tiny(small_manifest, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def case_paths(small_manifest: Path) -> dict[str, Path]:
    case = json.loads(small_manifest.read_text(encoding="utf-8"))["cases"][3]
    return {"FLAIR": Path(case["channels"]["FLAIR"]), "T1": Path(case["channels"]["T1"]), "mask": Path(case["mask"])}


def write_image(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(volume: sitk.Image, folder: Path, modality: str, **tags: str) -> Path:
    """``volume`` as a DICOM series, one file per slice along its third axis, placed and oriented as ``volume``
    (one study, one frame of reference, as a scanner writes them).

    ``tags``: more DICOM tags by keyword-free ``gggg_eeee`` names, e.g. ``{"0028_1052": "-1024"}`` (GDCM writes the
    stored values so that the series reads back as ``volume``'s values).
    """
    folder.mkdir(parents=True, exist_ok=True)
    sx, sy, sz = volume.GetSpacing()
    d = volume.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.GetDepth()):
        s = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in {"0020|000d": "1.2.826.0.1.3680043.2.1125.3", "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
                           "0020|0052": "1.2.826.0.1.3680043.2.1125.2", "0010|0020": "CLDF-TEST",
                           "0020|0013": str(z + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                           "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                           "0028|0030": f"{sy}\\{sx}", "0018|0050": str(sz), "0008|0060": modality,
                           **{k.replace("_", "|"): v for k, v in tags.items()}}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(s)
    return folder


def in_hounsfield(levels: np.ndarray) -> np.ndarray:
    """8-bit abdomen-window CT levels ([-125, 275] HU -> 0..255, as the BTCV scans) -> whole Hounsfield units.

    0 stands for anything at or below -125 HU and 255 for anything at or above 275 HU: they become -1000 HU (air)
    and +1000 HU (bone), which the window clips back to exactly 0 and 255.
    """
    hu = np.rint(-125.0 + levels.astype(np.float64) * 400.0 / 255.0)
    return np.where(levels == 0, -1000, np.where(levels == 255, 1000, hu)).astype(np.int16)


@pytest.fixture(scope="session")
def btcv_root() -> Path:
    root = data_root() / "btcv"
    if not (root / "manifest.json").is_file():
        pytest.skip(f"real BTCV data not found at {root} (set CLDF_DATA to the folder holding btcv/)")
    return root


def oblique_direction() -> tuple[float, ...]:
    """A right-handed rotation (det +1) about an oblique axis."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = 0.4
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    assert np.isclose(np.linalg.det(r), 1.0)
    return tuple(r.flatten())


@pytest.fixture(scope="session")
def brain_bundle() -> Path:
    return BRAIN_BUNDLE


@pytest.fixture(scope="session")
def tumour_case() -> dict[str, Path]:
    """Channel and mask files of a real LGG test patient: `TUMOUR_CASE` from the shared data, else the shipped sample
    (the same files, renamed; `test_demo` checks that), which has FLAIR and T1 only."""
    full = lgg_data()
    if full is None:
        case = json.loads((SAMPLE_DIR / "manifest.json").read_text(encoding="utf-8"))["cases"][0]
        root = SAMPLE_DIR
    else:
        case = next(c for c in json.loads(full.read_text(encoding="utf-8"))["cases"] if c["id"] == TUMOUR_CASE)
        root = full.parent
    return {**{k: root / v for k, v in case["channels"].items()}, "mask": root / case["mask"]}


@pytest.fixture()
def mrml_scene():
    """A fresh, real MRML scene (slicer-core) as ``slicer.mrmlScene``, with the logics the module relies on."""
    from CLDFSegmentationLib.headless import setUpScene

    scene = setUpScene()
    yield scene
    scene.Clear(True)
