"""CT in Hounsfield units goes through the window the bundle's training scans were made with.

The HU scans are made here from a real BTCV case (8-bit: [-125, 275] HU -> 0..255) by the inverse window
(`conftest.in_hounsfield`: 0 and 255, which stand for everything the window clipped, become air and bone).
Values in between become whole Hounsfield units, as a scanner stores them; the window rounds them back to
the same level.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.bundle import correct_setting, load_bundle, read_card
from cldf.cases import read_case
from cldf.cli import main
from cldf.config import CLDFConfig, DataConfig
from cldf.hounsfield import DEFAULT_CT_WINDOW, is_hounsfield, to_bundle_units, window
from cldf.images import read_image
from cldf.manifest import load_manifest
from cldf.plausibility import intensity_warnings
from cldf.trainer.slice_set import load_slice_set
from cldf.trainer.train import _choose_ct_window
from conftest import REPO, in_hounsfield, write_dicom_series

LIVER = REPO / "CLDFSegmentation" / "Resources" / "Models" / "abdomen-ct-liver"
CASE = "case_24"  # a validation case of the abdominal bundles, 48 slices
HU_WINDOW = {"CT": {"units": "HU", "window": [-125.0, 275.0], "to": [0, 255]}}


@pytest.fixture(scope="module")
def btcv(btcv_root) -> dict:
    manifest = json.loads((btcv_root / "manifest.json").read_text(encoding="utf-8"))
    return {"root": btcv_root, "case": next(c for c in manifest["cases"] if c["id"] == CASE)}


@pytest.fixture(scope="module")
def scans(btcv, tmp_path_factory) -> dict:
    """The case as shipped (8-bit), in HU as NIfTI, and in HU as a CT DICOM series with a rescale intercept."""
    folder = tmp_path_factory.mktemp("hounsfield")
    stored = sitk.ReadImage(str(btcv["root"] / btcv["case"]["channels"]["CT"]))
    hu = sitk.GetImageFromArray(in_hounsfield(sitk.GetArrayFromImage(stored)))
    hu.CopyInformation(stored)
    sitk.WriteImage(hu, str(folder / "hu.nii.gz"))
    axial = sitk.DICOMOrient(hu, "LPS")  # the series' rows and columns run as DICOM's patient axes
    axial.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    dicom = write_dicom_series(axial, folder / "dicom", "CT", **{"0028_1052": "-1024", "0028_1053": "1"})
    return {"8bit": btcv["root"] / btcv["case"]["channels"]["CT"], "hu": folder / "hu.nii.gz", "dicom": dicom,
            "mask": btcv["root"] / btcv["case"]["mask"], "folder": folder}


def test_the_window_gives_back_the_training_scans_levels_exactly(scans):
    levels = sitk.GetArrayFromImage(sitk.ReadImage(str(scans["8bit"]))).astype(np.float32)
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(scans["hu"]))).astype(np.float32)
    np.testing.assert_array_equal(window(hu, DEFAULT_CT_WINDOW), levels)
    assert is_hounsfield(hu) and not is_hounsfield(levels)


def test_only_ct_in_hounsfield_units_is_windowed(scans, tumour_case):
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(scans["hu"]))).astype(np.float32)[None]
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(tumour_case["FLAIR"]))).astype(np.float32)[None]
    assert to_bundle_units(hu, ["CT"], DEFAULT_CT_WINDOW)[1] == HU_WINDOW
    for volume, ct_window in ((mr, DEFAULT_CT_WINDOW), (hu, None)):  # an MR scan; a bundle without a window
        kept, applied = to_bundle_units(volume, ["CT"], ct_window)
        assert kept is volume and applied == {"CT": {"units": "as given"}}


def test_a_ct_dicom_series_is_known_by_its_modality_and_rescale(scans):
    image = read_image(scans["dicom"], "CT")
    assert image.GetMetaData("0008|0060") == "CT" and is_hounsfield(np.zeros((2, 2, 2)), image)
    data = DataConfig(channels=["CT"], orientation="LPS", ct_window=DEFAULT_CT_WINDOW)
    from_dicom, shipped = read_case({"CT": scans["dicom"]}, data), read_case({"CT": scans["8bit"]}, data)
    np.testing.assert_array_equal(from_dicom.volume, shipped.volume)
    assert from_dicom.intensities == HU_WINDOW and shipped.intensities == {"CT": {"units": "as given"}}


def test_hounsfield_units_without_the_window_are_unlike_the_training_scans(scans):
    card = read_card(LIVER)["training"]["data_card"]["intensity"]
    hu = read_case({"CT": scans["hu"]}, DataConfig(channels=["CT"], orientation="LPS"))
    assert intensity_warnings(hu.ranges, card, ["CT"])  # what a bundle without a window says
    windowed = read_case({"CT": scans["hu"]}, load_bundle(LIVER).config.data)
    assert not intensity_warnings(windowed.ranges, card, ["CT"])


def test_cldf_segment_gives_a_ct_in_hu_the_mask_of_the_windowed_scan_and_records_the_window(scans, caplog):
    outputs = {}
    for name in ("8bit", "hu"):
        out = scans["folder"] / f"out-{name}"
        with caplog.at_level(logging.INFO, logger="cldf"):
            assert main(["-q", "segment", "--bundle", str(LIVER), "--input", f"CT={scans[name]}", "--out", str(out),
                         "--device", "cpu", "--segmenter", "student", "--refine", "none"]) == 0
        outputs[name] = out
    assert "unlike those of the bundle's training scans" not in caplog.text
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[n] / "mask.nii.gz"))) for n in ("8bit", "hu")]
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])
    records = [json.loads((outputs[n] / "cldf-result.json").read_text(encoding="utf-8")) for n in ("8bit", "hu")]
    assert records[0]["intensities"] == {"CT": {"units": "as given"}}
    assert records[1]["intensities"] == HU_WINDOW


@pytest.fixture(scope="module")
def cohorts(scans) -> dict:
    """One-case manifests of the case as shipped and in HU."""
    manifests = {}
    for name in ("8bit", "hu"):
        manifests[name] = scans["folder"] / f"{name}.json"
        manifests[name].write_text(json.dumps({"name": name, "cases": [
            {"id": CASE, "channels": {"CT": str(scans[name])}, "mask": str(scans["mask"])}]}), encoding="utf-8")
    return {name: load_manifest(path) for name, path in manifests.items()}


def test_a_cohort_in_hounsfield_units_trains_through_the_window_it_records(cohorts):
    for name, recorded in (("hu", DEFAULT_CT_WINDOW), ("8bit", None)):  # 8-bit: the recipe says its window
        config = CLDFConfig(data=DataConfig(channels=["CT"]))
        _choose_ct_window(config, cohorts[name].case(CASE))
        assert config.data.ct_window == recorded, name


def test_slices_of_a_hu_cohort_are_those_of_the_windowed_cohort(cohorts):
    sets = [load_slice_set(cohorts[n], [CASE], ["CT"], 32, (0.5, 99.5), [6], 0.01, "LPS", DEFAULT_CT_WINDOW)
            for n in ("8bit", "hu")]
    np.testing.assert_array_equal(sets[0].images.numpy(), sets[1].images.numpy())
    np.testing.assert_array_equal(sets[0].labels.numpy(), sets[1].labels.numpy())


def test_a_card_takes_its_training_scans_window_resealed_and_refuses_one_out_of_range(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    with pytest.raises(ValueError, match="data.ct_window"):
        correct_setting(copy, "data.ct_window", [275, -125], "made so")
    entry = correct_setting(copy, "data.ct_window", [-125, 275], "its scans were windowed")
    assert entry["from"] is None and entry["to"] == [-125, 275]
    assert load_bundle(copy).config.data.ct_window == (-125, 275)
    assert read_card(copy)["corrections"][-1]["seal_before"] == entry["seal_before"]
