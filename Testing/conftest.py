"""Shared fixtures: real scans from the shared data folder and a tiny bundle trained on them in seconds."""

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


@pytest.fixture(scope="session", autouse=True)
def slice_cache(tmp_path_factory) -> Path:
    """Training's slice cache in a folder of the test session (not the user's cache)."""
    folder = tmp_path_factory.mktemp("slice-cache")
    os.environ["CLDF_CACHE"] = str(folder)
    return folder


def data_root() -> Path:
    return Path(os.environ.get("CLDF_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def lgg_manifest() -> Path:
    path = data_root() / "lgg" / "manifest.json"
    if not path.is_file():
        pytest.skip(f"real LGG data not found at {path} (set CLDF_DATA to the folder holding lgg/)")
    return path


@pytest.fixture(scope="session")
def small_manifest(lgg_manifest: Path, tmp_path_factory) -> Path:
    """Four real LGG cases with a fixed split (2 train, 1 val, 1 test), paths absolute."""
    raw = json.loads(lgg_manifest.read_text(encoding="utf-8"))
    root = lgg_manifest.parent
    cases = []
    for case, split in zip(raw["cases"][:4], ["train", "train", "val", "test"]):
        cases.append({"id": case["id"], "split": split, "mask": str(root / case["mask"]),
                      "channels": {k: str(root / v) for k, v in case["channels"].items()}})
    path = tmp_path_factory.mktemp("data") / "manifest.json"
    path.write_text(json.dumps({"name": "lgg-small", "cases": cases}))
    return path


def tiny_config():
    cfg = preset("cpu")
    cfg.data.resolution = 32
    for net in (cfg.diffusion, cfg.noisy_classifier, cfg.cam_classifier):
        net.steps = 8
        net.batch_size = 4
    cfg.decoder.epochs = 1
    cfg.decoder.pixels_per_class = 64
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


def oblique_direction() -> tuple[float, ...]:
    """A right-handed rotation (det +1) about an oblique axis."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = 0.4
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    assert np.isclose(np.linalg.det(r), 1.0)
    return tuple(r.flatten())


BRAIN_BUNDLE = REPO / "CLDFSegmentation" / "Resources" / "Models" / "brain-mri-flair-t1"
#: A test-split patient of the shipped brain bundle, with a large tumour in slices 9..18.
TUMOUR_CASE = "TCGA_CS_6669_20020102"


@pytest.fixture(scope="session")
def brain_bundle() -> Path:
    return BRAIN_BUNDLE


@pytest.fixture(scope="session")
def tumour_case(lgg_manifest: Path) -> dict[str, Path]:
    """Channel and mask files of a real LGG test patient."""
    case = next(c for c in json.loads(lgg_manifest.read_text(encoding="utf-8"))["cases"] if c["id"] == TUMOUR_CASE)
    root = lgg_manifest.parent
    return {**{k: root / v for k, v in case["channels"].items()}, "mask": root / case["mask"]}


@pytest.fixture()
def mrml_scene():
    """A fresh, real MRML scene (slicer-core) as ``slicer.mrmlScene``, with the logics the module relies on."""
    from CLDFSegmentationLib.headless import setUpScene

    scene = setUpScene()
    yield scene
    scene.Clear(True)
