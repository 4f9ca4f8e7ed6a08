"""DICOM in, DICOM SEG out: series the tests write from real scans, segmented with ``--format dicom-seg``; the
Segmentation read back with pydicom; coded segments in cards; series that cannot take a Segmentation refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cldf.bundle import load_bundle, update_card
from cldf.cli import main
from cldf.terminology import KNOWN, SegmentCode, slicer_entry
from conftest import oblique_direction, write_dicom_series

SHIPPED = sorted(b for b in (Path(__file__).resolve().parents[2] / "CLDFSegmentation" / "Resources" / "Models").iterdir()
                 if (b / "bundle.json").is_file())


def _series(case_paths: dict, folder: Path, direction=None) -> dict[str, Path]:
    """The case's FLAIR and T1 as two DICOM series of one study (16-bit MR, as a scanner writes them)."""
    series = {}
    for k, (name, path) in enumerate((n, case_paths[n]) for n in ("FLAIR", "T1")):
        image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)
        if direction is not None:
            image.SetDirection(direction)
        series[name] = write_dicom_series(image, folder / name, "MR", **{"0020_000e": f"1.2.826.0.1.3680043.2.1125.1{k}"})
    return series


def _segment(bundle: Path, series: dict[str, Path], out: Path, *more: str) -> int:
    return main(["-q", "segment", "--bundle", str(bundle), *(f for n, p in series.items() for f in ("--input", f"{n}={p}")),
                 "--out", str(out), "--device", "cpu", "--no-maps", *more])


def _frames_by_position(seg, series_folder: Path, reference: sitk.Image) -> dict[int, np.ndarray]:
    """Each frame of a Segmentation at the slice index of the source image it references."""
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in series_folder.glob("*.dcm")}
    frames = {}
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in pydicom.dcmread(by_uid[uid], stop_before_pixels=True).ImagePositionPatient]
        frames[reference.TransformPhysicalPointToIndex(position)[2]] = seg.pixel_array[i].astype(bool)
    return frames


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_a_dicom_series_segmented_gives_a_coded_segmentation_whose_frames_are_the_nifti_mask(tiny_bundle, case_paths,
                                                                                             tmp_path, oblique):
    series = _series(case_paths, tmp_path / "dicom", oblique_direction() if oblique else None)
    out = tmp_path / "out"
    assert _segment(tiny_bundle, series, out, "--format", "dicom-seg") == 0
    assert {p.name for p in out.iterdir()} == {"mask.nii.gz", "slices.csv", "mask.seg.dcm", "cldf-result.json"}
    seg = pydicom.dcmread(out / "mask.seg.dcm")
    source = pydicom.dcmread(next(series["FLAIR"].glob("*.dcm")), stop_before_pixels=True)
    assert seg.SOPClassUID.name == "Segmentation Storage"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    segment = seg.SegmentSequence[0]
    code = KNOWN["tumour"]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == code.type.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == code.category.value
    assert segment.AnatomicRegionSequence[0].CodeValue == code.region.value
    card = json.loads((tiny_bundle / "bundle.json").read_text(encoding="utf-8"))
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert segment.SegmentAlgorithmName == algorithm.AlgorithmName == card["name"]
    assert algorithm.AlgorithmVersion == card["seal"]
    mask_image = sitk.ReadImage(str(out / "mask.nii.gz"))
    mask = sitk.GetArrayFromImage(mask_image).astype(bool)
    frames = _frames_by_position(seg, series["FLAIR"], mask_image)
    assert sorted(frames) == list(range(len(mask)))  # one frame per image of the series
    assert all(np.array_equal(frames[z], mask[z]) for z in frames) and mask.any()
    record = json.loads((out / "cldf-result.json").read_text(encoding="utf-8"))
    assert record["target"] == {"name": "tumour", "code": code.to_card()}


def test_dicom_seg_from_files_or_from_a_bundle_without_codes_is_refused_before_any_work(tiny_bundle, case_paths,
                                                                                         tmp_path, capsys):
    files = {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}
    assert _segment(tiny_bundle, files, tmp_path / "a", "--format", "dicom-seg") == 2
    assert "must be a folder holding a DICOM series" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    uncoded = tmp_path / "uncoded"
    shutil.copytree(tiny_bundle, uncoded)
    task = json.loads((uncoded / "bundle.json").read_text(encoding="utf-8"))["task"]
    update_card(uncoded, task={k: v for k, v in task.items() if k != "code"})
    series = _series(case_paths, tmp_path / "dicom")
    assert _segment(uncoded, series, tmp_path / "b", "--format", "dicom-seg") == 2
    assert "records no standard codes" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["-q", "card", "--bundle", str(uncoded), "--code", "known"]) == 0  # the card gets them, resealed
    assert load_bundle(uncoded).card["task"]["code"] == KNOWN["tumour"].to_card()
    assert _segment(uncoded, series, tmp_path / "b", "--format", "dicom-seg") == 0


def test_a_series_with_a_missing_slice_or_no_frame_of_reference_is_refused_with_what_to_do(tiny_bundle, case_paths,
                                                                                            tmp_path, capsys):
    series = _series(case_paths, tmp_path / "dicom")
    gap = tmp_path / "gap"
    shutil.copytree(series["FLAIR"], gap)
    (gap / "010.dcm").unlink()
    assert _segment(tiny_bundle, {"FLAIR": gap, "T1": series["T1"]}, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "not evenly spaced" in err and "009.dcm and 011.dcm" in err and "Traceback" not in err
    for f in series["FLAIR"].glob("*.dcm"):  # a series exported without its frame of reference
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    assert _segment(tiny_bundle, series, tmp_path / "b", "--format", "dicom-seg") == 2
    assert "lacks FrameOfReferenceUID" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_card_with_a_malformed_code_is_refused_at_load_naming_it(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    task = json.loads((copy / "bundle.json").read_text(encoding="utf-8"))["task"]
    update_card(copy, task={**task, "code": {**task["code"], "type": ["SCT", "not-a-number", "Neoplasm"]}})
    with pytest.raises(ValueError, match="task.code.type: SNOMED CT code values are digits"):
        load_bundle(copy)


@pytest.mark.parametrize("bundle", SHIPPED, ids=[b.name for b in SHIPPED])
def test_every_shipped_bundle_codes_its_target(bundle):
    card = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    code = SegmentCode.from_card(card["task"]["code"])
    assert code == KNOWN[card["task"]["target"]]
    assert f"SCT^{code.type.value}^{code.type.meaning}" in slicer_entry(code)


def test_a_cohort_with_dicom_seg_needs_every_case_as_a_series_before_the_first_case(tiny_bundle, small_manifest,
                                                                                      tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["-q", "segment", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--out", str(out),
                 "--device", "cpu", "--format", "dicom-seg"]) == 2
    err = capsys.readouterr().err
    case = json.loads(small_manifest.read_text(encoding="utf-8"))["cases"][0]["id"]
    assert "must be a folder holding a DICOM series; not so for" in err and case in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
