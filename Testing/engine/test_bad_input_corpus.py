"""A corpus of bad inputs, made here from a real scan, each through `cldf segment` as a user runs it.

Every one ends in one line on stderr that names what is wrong and says what to do, exit code 2, no traceback,
no library message, and no output folder. The unit tests of each check are in `test_bad_input.py`.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.bundle import load_bundle
from cldf.cli import main
from conftest import write_dicom_series, write_image

LIBRARY_WORDS = ("Traceback", "sitk::ERROR", "itk::", "RuntimeError", "KeyError", "Exception", "nibabel")


def _like(array: np.ndarray, image: sitk.Image, path: Path) -> Path:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))
    return path


def _with(a: np.ndarray, z: int, y: int, x: int, value: float) -> np.ndarray:
    bad = a.copy()
    bad[z, y, x] = value
    return bad


def _two_series(a: np.ndarray, folder: Path) -> Path:
    for uid, sub in (("1.2.826.0.1.3680043.2.1125.1", "a"), ("1.2.826.0.1.3680043.2.1125.2", "b")):
        series = write_dicom_series(sitk.Cast(sitk.GetImageFromArray(a[:4]), sitk.sitkInt16), folder / sub, "MR",
                                    **{"0020_000e": uid})
        for f in series.iterdir():
            f.rename(folder / f"{sub}-{f.name}")
        series.rmdir()
    return folder


def _truncated(source: Path, folder: Path) -> Path:
    raw = source.read_bytes() if source.name.endswith(".gz") else gzip.compress(source.read_bytes())
    (folder / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    return folder / "cut.nii.gz"


def _zero_spacing(a: np.ndarray, image: sitk.Image, folder: Path) -> Path:
    path = _like(a, image, folder / "v.nii")
    header = bytearray(path.read_bytes())
    header[80:84] = np.float32(0.0).tobytes()  # pixdim[1]
    path.write_bytes(bytes(header))
    return path


# kind -> (makes the FLAIR input from the scan's array, its image and a folder; what the message must say)
Maker = Callable[[np.ndarray, sitk.Image, Path], Path]
CORPUS: dict[str, tuple[Maker, str]] = {
    "2D image": (lambda a, i, f: write_image(a[0], f / "slice.nii.gz"), "is a 2D image; a 3D volume"),
    "PNG": (lambda a, i, f: _png(a, f), "is a 2D image; a 3D volume"),
    "4D image": (lambda a, i, f: _write(sitk.JoinSeries([sitk.GetImageFromArray(a)] * 2), f / "4d.nii.gz"),
                 r"is 4D \(several volumes in one file\); give each channel as its own 3D volume"),
    "vector image": (lambda a, i, f: _write(sitk.GetImageFromArray(np.stack([a] * 3, -1), isVector=True),
                                            f / "rgb.nrrd"), "has 3 components per voxel; give one scalar volume"),
    "one slice": (lambda a, i, f: write_image(a[:1], f / "one.nii.gz"), "is a single 2D slice"),
    "too small in-plane": (lambda a, i, f: write_image(a[:, :8, :8], f / "small.nii.gz"),
                           "too small to segment .* slices need at least 16 x 16"),
    "NaN voxels": (lambda a, i, f: _like(_with(a, 3, 10, 10, np.nan), i, f / "nan.nii.gz"),
                   "holds 1 NaN or infinite voxels; replace them"),
    "infinite voxels in NRRD": (lambda a, i, f: _like(_with(a, 3, 10, 10, np.inf), i, f / "inf.nrrd"),
                                "contains 1 NaN or infinite voxels; replace them"),
    "beyond float32": (lambda a, i, f: _like(_with(a.astype(np.float64), 0, 0, 0, 1e300), i, f / "big.nrrd"),
                       "beyond what float32 holds; rescale"),
    "constant": (lambda a, i, f: _like(np.full_like(a, 7), i, f / "c.nii.gz"), "is constant: every voxel is 7"),
    "empty": (lambda a, i, f: _like(np.zeros_like(a), i, f / "z.nii.gz"), "is empty: every voxel is 0"),
    "a mask given as the scan": (lambda a, i, f: _like((a > a.mean()).astype(np.uint8), i, f / "m.nii.gz"),
                                 "looks like a label map or mask .* give the scan itself"),
    "truncated file": (lambda a, i, f: _truncated(_like(a, i, f / "whole.nii.gz"), f),
                       "truncated or corrupted .*; copy or export it again"),
    "text named .nii.gz": (lambda a, i, f: _text(f / "notes.nii.gz"),
                           r"is not an image this tool can read.*give \.nii\.gz"),
    "zero spacing": (_zero_spacing, "invalid voxel spacing .* every spacing must be positive"),
    "missing file": (lambda a, i, f: f / "absent.nii.gz", "file not found"),
    "empty folder": (lambda a, i, f: _mkdir(f / "empty"), "a folder without a DICOM series"),
    "two DICOM series": (lambda a, i, f: _two_series(a, _mkdir(f / "dicom")),
                         "holds 2 DICOM series .* put the series to segment in a folder of its own"),
    "another grid than T1": (lambda a, i, f: write_image(a[:, ::2, :], f / "other.nii.gz"),
                             "different voxel grids .*; resample 'FLAIR' onto 'T1' first|"
                             "different voxel grids .*; resample 'T1' onto 'FLAIR' first"),
}


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _png(a: np.ndarray, folder: Path) -> Path:
    return _write(sitk.GetImageFromArray(np.clip(a[0] / a.max() * 255, 0, 255).astype(np.uint8)), folder / "s.png")


def _text(path: Path) -> Path:
    path.write_text("not an image", encoding="utf-8")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def scan(case_paths) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(case_paths["FLAIR"]))
    return sitk.GetArrayFromImage(image).astype(np.float32), image


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_each_bad_input_is_named_with_what_to_do_before_any_work(tiny_bundle, case_paths, scan, tmp_path, capsys,
                                                                  kind):
    assert load_bundle(tiny_bundle).config.data.orientation  # the checks come before reorienting
    make, message = CORPUS[kind]
    bad = make(*scan, tmp_path)
    out = tmp_path / "out"
    code = main(["-q", "segment", "--bundle", str(tiny_bundle), "--out", str(out), "--device", "cpu",
                 "--input", f"FLAIR={bad}", "--input", f"T1={case_paths['T1']}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert "channel 'FLAIR'" in err or "'FLAIR'" in err, err
    assert not any(word in err for word in LIBRARY_WORDS), err
    assert not out.exists()


@pytest.mark.parametrize("channels, message", [
    ({"FLAIR"}, r"missing channel\(s\) \['T1'\]: this bundle needs exactly \['FLAIR', 'T1'\]"),
    ({"FLAIR", "T1", "T2"}, r"unexpected channel\(s\) \['T2'\]"),
])
def test_channels_missing_or_unexpected_are_named(tiny_bundle, case_paths, tmp_path, capsys, channels, message):
    args = ["-q", "segment", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"), "--device", "cpu"]
    for name in sorted(channels):
        args += ["--input", f"{name}={case_paths.get(name, case_paths['T1'])}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and not any(word in err for word in LIBRARY_WORDS), err
