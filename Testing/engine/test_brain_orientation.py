"""The brain bundle's card names the orientation its training arrays really had (LPS).

The LGG files it was trained on once carried an identity NIfTI affine although their arrays are in
radiological layout (columns from the patient's right to left, rows from anterior to posterior), so
the card recorded RAS. The files now carry diag(-1, -1, 1) (LPS) and the card was corrected with
`cldf card --orientation LPS`: the networks are the same, so on the corrected files the bundle must
give exactly what the old card gave on the old files, and a rebuild from the corrected files must
record LPS and see the same training arrays.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.bundle import BundleError, correct_setting, load_bundle, read_card, write_card
from cldf.cli import main
from cldf.evaluation.demo import SAMPLE_DIR
from cldf.manifest import load_manifest, stored_orientation
from cldf.segment import Segmenter
from cldf.trainer.slice_set import load_slice_set
from cldf.volume_result import VolumeResult
from conftest import train_tiny

#: The ITK direction of an identity NIfTI affine: the header the LGG files had before.
OLD_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SAMPLE = {"FLAIR": SAMPLE_DIR / "flair.nii.gz", "T1": SAMPLE_DIR / "t1.nii.gz"}
OUTPUTS = ("mask", "cam", "mean_gradient", "seeds", "presence")


@pytest.fixture(scope="module")
def old_card(brain_bundle, tmp_path_factory) -> Path:
    """The brain bundle with the card it shipped with before the correction (RAS), rebuilt from the correction."""
    folder = tmp_path_factory.mktemp("old-card") / "brain"
    shutil.copytree(brain_bundle, folder)
    card = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    (correction,) = [c for c in card.pop("corrections") if c["setting"] == "data.orientation"]
    card["config"]["data"]["orientation"] = correction["from"]
    write_card(folder / "bundle.json", card)
    # (the seal it had, `seal_before`, cannot be rebuilt since later stages added their entries: the student)
    assert correction["from"] == "RAS" and read_card(folder)["config"]["data"]["orientation"] == "RAS"
    return folder


def with_old_header(paths: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The same voxels under the header the LGG files had before the correction."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, path in paths.items():
        image = sitk.ReadImage(str(path))
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), f"{path} is not corrected"
        image.SetDirection(OLD_DIRECTION)
        out[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(out[name]))
    return out


def segment(bundle: Path, inputs: dict[str, Path], refine: str | None = None) -> VolumeResult:
    return Segmenter(load_bundle(bundle), "cpu", refine=refine).start(inputs).run(progress=False).on_input_grid()


def assert_same_outputs(a: VolumeResult, b: VolumeResult, what: str) -> None:
    for name in OUTPUTS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{what}: {name}")


# ------------------------------------------------------------------ the card
def test_the_brain_card_records_lps_with_the_correction_and_its_reason(brain_bundle):
    card = read_card(brain_bundle)
    assert card["config"]["data"]["orientation"] == "LPS"
    (correction,) = [c for c in card["corrections"] if c["setting"] == "data.orientation"]  # later: task.code
    assert (correction["setting"], correction["from"], correction["to"]) == ("data.orientation", "RAS", "LPS")
    assert "identity" in correction["because"] and correction["command"].startswith("cldf card ")


def test_a_rebuild_from_the_corrected_files_would_record_lps(lgg_manifest, brain_bundle):
    manifest = load_manifest(lgg_manifest)
    assert {stored_orientation(case, "FLAIR") for case in manifest.cases} == {"LPS"}
    card = read_card(brain_bundle)
    first = card["training"]["split"]["train"][0]  # `cldf train` takes its first training case's
    assert stored_orientation(manifest.case(first), "FLAIR") == card["config"]["data"]["orientation"]


def test_training_sees_the_same_arrays_in_the_corrected_files_as_in_the_old_ones(lgg_manifest, brain_bundle, tmp_path):
    manifest = load_manifest(lgg_manifest)
    ids = read_card(brain_bundle)["training"]["split"]["train"][:2]
    cases = []
    for case in (manifest.case(i) for i in ids):
        channels = with_old_header({k: Path(v) for k, v in case.channels.items() if k in ("FLAIR", "T1")},
                                   tmp_path / case.id)
        cases.append({"id": case.id, "mask": str(case.mask), "channels": {k: str(v) for k, v in channels.items()}})
    (tmp_path / "old.json").write_text(json.dumps({"cases": cases}), encoding="utf-8")
    old = load_manifest(tmp_path / "old.json")
    args = (["FLAIR", "T1"], 64, (0.5, 99.5), [1], 0.01)
    corrected = load_slice_set(manifest, ids, *args, "LPS")
    before = load_slice_set(old, ids, *args, "RAS")
    assert len(corrected.labels) > 20 and corrected.labels.max() == 1
    assert np.array_equal(corrected.images.numpy(), before.images.numpy())
    assert np.array_equal(corrected.labels.numpy(), before.labels.numpy())


@pytest.mark.slow
def test_training_on_the_corrected_files_makes_the_networks_the_old_files_made(small_manifest, tiny_bundle, tmp_path):
    """`make bundles` at a tiny scale: the same weights, byte for byte; only the recorded orientation differs."""
    raw = json.loads(small_manifest.read_text(encoding="utf-8"))
    for case in raw["cases"]:
        files = with_old_header({**case["channels"], "mask": case["mask"]}, tmp_path / "old" / case["id"])
        case["mask"] = str(files.pop("mask"))
        case["channels"] = {k: str(v) for k, v in files.items()}
    (tmp_path / "old.json").write_text(json.dumps(raw), encoding="utf-8")
    old = read_card(train_tiny(tmp_path / "old.json", tmp_path / "old-bundle"))
    new = read_card(tiny_bundle)
    assert (old["config"]["data"]["orientation"], new["config"]["data"]["orientation"]) == ("RAS", "LPS")
    assert old["files"] == new["files"]
    old["config"]["data"]["orientation"] = "LPS"
    assert old["config"] == new["config"]


# ------------------------------------------------------------------ the same masks
def test_the_sample_gives_exactly_what_the_old_card_gave_on_the_old_files(brain_bundle, old_card, tmp_path):
    """As shipped (with the bundle's SAM refinement): every output voxel for voxel."""
    new = segment(brain_bundle, SAMPLE)
    old = segment(old_card, with_old_header(SAMPLE, tmp_path / "old"))
    assert new.coarse_mask is not None, "the brain bundle refines its masks"
    assert new.mask.sum() > 5000, "the bundle finds the sample's tumour"
    assert_same_outputs(new, old, "sample")


def test_the_old_card_turned_the_corrected_sample_upside_down(brain_bundle, old_card):
    """What the correction fixes: the old card flips correctly labelled scans before its networks see them."""
    right = segment(brain_bundle, SAMPLE, refine="none")
    flipped = segment(old_card, SAMPLE, refine="none")
    assert not np.array_equal(right.mask, flipped.mask)
    assert not np.allclose(right.presence, flipped.presence)


@pytest.mark.slow
def test_every_test_patient_gives_exactly_what_the_old_card_gave_on_the_old_files(lgg_manifest, brain_bundle,
                                                                                   old_card, tmp_path):
    """The bundle's whole test split, unrefined: the refinement's inputs are these masks and these voxels.
    ``CLDF_TEST_SPLIT_REFINE=bundle`` compares the masks as shipped, refined (minutes more on a CPU)."""
    refine = {"none": "none", "bundle": None}[os.environ.get("CLDF_TEST_SPLIT_REFINE", "none")]
    manifest = load_manifest(lgg_manifest)
    test_ids = read_card(brain_bundle)["training"]["split"]["test"]
    assert len(test_ids) == 10
    for case in (manifest.case(i) for i in test_ids):
        inputs = {k: Path(case.channels[k]) for k in ("FLAIR", "T1")}
        new = segment(brain_bundle, inputs, refine)
        old = segment(old_card, with_old_header(inputs, tmp_path / case.id), refine)
        assert_same_outputs(new, old, case.id)


# ------------------------------------------------------------------ correcting a card
@pytest.fixture()
def tiny_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_cldf_card_corrects_the_orientation_and_keeps_weights_and_history(tiny_copy, capsys):
    before = read_card(tiny_copy)
    code = "LPS" if before["config"]["data"]["orientation"] != "LPS" else "RAS"
    assert main(["card", "--bundle", str(tiny_copy), "--orientation", code.lower(), "--because", "headers fixed"]) == 0
    after = read_card(tiny_copy)  # verified: resealed
    assert after["config"]["data"]["orientation"] == code and after["files"] == before["files"]
    assert after["seal"] != before["seal"] and after["corrections"][0]["seal_before"] == before["seal"]
    assert f"-> {code}; weights unchanged" in capsys.readouterr().out
    assert load_bundle(tiny_copy).config.data.orientation == code


@pytest.mark.parametrize("orientation, because, message", [
    ("LPX", "headers fixed", "not an orientation code"),
    ("LLS", "headers fixed", "one of each pair"),
    ("PS", "headers fixed", "three letters"),
    ("ASR", " ", "say why"),
])
def test_a_bad_correction_is_refused_and_changes_nothing(tiny_copy, orientation, because, message):
    text = (tiny_copy / "bundle.json").read_bytes()
    with pytest.raises(ValueError, match=message):
        correct_setting(tiny_copy, "data.orientation", orientation, because)
    assert (tiny_copy / "bundle.json").read_bytes() == text


def test_the_same_orientation_is_nothing_to_correct(tiny_copy, capsys):
    code = read_card(tiny_copy)["config"]["data"]["orientation"]
    assert main(["card", "--bundle", str(tiny_copy), "--orientation", code, "--because", "x"]) == 2
    assert "nothing to correct" in capsys.readouterr().err


def test_a_tampered_card_is_refused_not_resealed(tiny_copy):
    card = json.loads((tiny_copy / "bundle.json").read_text(encoding="utf-8"))
    card["config"]["data"]["resolution"] = 65
    (tiny_copy / "bundle.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(BundleError, match="edited after the bundle was made"):
        correct_setting(tiny_copy, "data.orientation", "ASR", "headers fixed")


def test_sides_need_columns_that_run_left_right(tiny_copy):
    card = json.loads((tiny_copy / "bundle.json").read_text(encoding="utf-8"))
    card["config"]["cam_classifier"]["sides"], card["config"]["cam_classifier"]["flips"] = "left", False
    write_card(tiny_copy / "bundle.json", card)
    with pytest.raises(ValueError, match="columns run left-right"):
        correct_setting(tiny_copy, "data.orientation", "PLS", "headers fixed")
