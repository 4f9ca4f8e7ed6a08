"""Bad input, attacked on purpose: every case ends as a clear refusal, a documented warning or a correct result.

The inputs are generated here from real scans (or small arrays where the content does not matter);
nothing is committed. Each test asserts the exact outcome: exit code, message, what is on disk.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cldf import outputs
from cldf.bundle import BundleError, load_bundle, seal
from cldf.cli import main
from cldf.images import InputError, read_channels, read_image
from cldf.manifest import load_manifest
from cldf.weak_labels import weak_slice_labels
from conftest import oblique_direction, write_dicom_series, write_image

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permissions


def _segment(bundle, inputs, out, *extra) -> int:
    args = ["-q", "segment", "--bundle", str(bundle), "--out", str(out), "--device", "cpu"]
    for k, v in inputs.items():
        args += ["--input", f"{k}={v}"]
    return main(args + list(extra))


def _listing(folder):
    """Every file below ``folder`` with its size and modification time: a snapshot to compare."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def scan(case_paths):
    """A real FLAIR volume as a float32 array with its image, to derive bad inputs from."""
    image = sitk.ReadImage(str(case_paths["FLAIR"]))
    return sitk.GetArrayFromImage(image).astype(np.float32), image


def _like(array, image, path):
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))
    return path


# --------------------------------------------------------------------------- files that are not what they say
def test_nan_voxels_in_nifti_are_refused(scan, tmp_path):
    a, image = scan
    bad = a.copy()
    bad[3, 10, 10] = np.nan
    bad[4, 11, 12] = np.inf
    with pytest.raises(InputError, match="holds 2 NaN or infinite voxels; replace them"):
        read_image(_like(bad, image, tmp_path / "nan.nii.gz"), "FLAIR")


def test_an_all_nan_volume_is_refused_as_nan_not_as_empty(scan, tmp_path):
    a, image = scan
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(_like(np.full_like(a, np.nan), image, tmp_path / "nan.nii.gz"), "FLAIR")


def test_float64_beyond_float32_is_named_as_such(scan, tmp_path):
    a, image = scan
    big = a.astype(np.float64)
    big[0, 0, 0] = 1e300
    path = _like(big, image, tmp_path / "big.nrrd")
    with pytest.raises(InputError, match="beyond what float32 holds"):
        read_channels({"FLAIR": path}, ["FLAIR"])


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_truncated_nifti_gz_is_refused(case_paths, tmp_path, cut):
    raw = case_paths["FLAIR"].read_bytes() if case_paths["FLAIR"].name.endswith(".gz") else \
        gzip.compress(case_paths["FLAIR"].read_bytes())
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-64])
    with pytest.raises(InputError, match="truncated or corrupted"):
        read_image(bad, "FLAIR")


def test_uncompressed_nifti_cut_short_is_refused(scan, tmp_path):
    a, image = scan
    full = _like(a, image, tmp_path / "full.nii")
    bad = tmp_path / "short.nii"
    bad.write_bytes(full.read_bytes()[:-4096])
    with pytest.raises(InputError, match="truncated or corrupted"):
        read_image(bad, "FLAIR")


def test_a_text_file_named_nii_gz_gets_our_message(tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(InputError, match=r"is not an image this tool can read.*\.nii\.gz, \.nii, \.nrrd"):
        read_image(bad, "FLAIR")


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_reported_as_such(scan, tmp_path):
    path = _like(scan[0], scan[1], tmp_path / "locked.nii.gz")
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        read_image(path, "FLAIR")


def test_a_dicom_series_folder_is_read_and_an_empty_folder_explained(scan, tmp_path):
    a, image = scan
    volume = sitk.Cast(sitk.GetImageFromArray(a[:6, :64, :64]), sitk.sitkInt16)
    volume.SetSpacing((0.8, 0.8, 2.5))
    series = write_dicom_series(volume, tmp_path / "dicom", "MR")
    read = read_image(series, "FLAIR")
    assert read.GetSize() == (64, 64, 6)
    np.testing.assert_allclose(read.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="folder without a DICOM series"):
        read_image(empty, "FLAIR")


# --------------------------------------------------------------------------- grids and shapes
def test_zero_voxel_spacing_is_refused(scan, tmp_path):
    path = _like(scan[0], scan[1], tmp_path / "v.nii")
    header = bytearray(path.read_bytes())
    header[84:88] = np.float32(0.0).tobytes()  # pixdim[2]: the row spacing
    header[252:256] = np.int16(0).tobytes() * 2  # qform_code, sform_code: spacing from pixdim alone
    path.write_bytes(bytes(header))
    with pytest.raises(InputError, match="invalid voxel spacing"):
        read_channels({"FLAIR": path}, ["FLAIR"])


def test_a_one_by_one_in_plane_volume_is_refused(tmp_path):
    path = write_image(np.arange(40, dtype=np.float32).reshape(40, 1, 1), tmp_path / "line.nii.gz")
    with pytest.raises(InputError, match="too small to segment"):
        read_channels({"FLAIR": path}, ["FLAIR"])


def test_4d_and_vector_images_are_refused(scan, tmp_path):
    a = scan[0][:4, :32, :32]
    four = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(a)] * 2), str(four))
    with pytest.raises(InputError, match="is 4D .several volumes in one file"):
        read_channels({"FLAIR": four}, ["FLAIR"])
    vector = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([a, a, a], -1), isVector=True), str(vector))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_channels({"FLAIR": vector}, ["FLAIR"])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64])
def test_every_scalar_type_is_read_as_the_same_values(scan, tmp_path, dtype):
    z = len(scan[0]) // 2
    a = np.clip(scan[0][z - 2 : z + 3, 100:140, 100:140], 0, 120).astype(dtype)
    volume, _ = read_channels({"FLAIR": write_image(a, tmp_path / "v.nrrd")}, ["FLAIR"])
    np.testing.assert_array_equal(volume[0], a.astype(np.float32))


@pytest.mark.parametrize("spacing", [(1e-3, 1e-3, 2e-3), (1e3, 1e3, 5e3)])
def test_huge_and_tiny_spacings_are_accepted(scan, tmp_path, spacing):
    volume, ref = read_channels({"FLAIR": write_image(scan[0], tmp_path / "v.nrrd", spacing=spacing)}, ["FLAIR"])
    assert volume.shape[1:] == scan[0].shape and np.allclose(ref.GetSpacing(), spacing)


def test_a_binary_mask_given_as_a_scan_is_refused(case_paths):
    with pytest.raises(InputError, match="looks like a label map or mask"):
        read_channels({"FLAIR": case_paths["mask"]}, ["FLAIR"])


def test_a_scan_in_other_units_gets_a_warning(tiny_bundle, case_paths, tmp_path, caplog):
    hounsfield = {}
    for name in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(case_paths[name]))
        hounsfield[name] = _like(sitk.GetArrayFromImage(image).astype(np.float32) * 12 - 1024, image,
                                 tmp_path / f"{name}.nii.gz")
    assert _segment(tiny_bundle, hounsfield, tmp_path / "o") == 0
    assert "unlike those of the bundle's training scans" in caplog.text
    caplog.clear()
    assert _segment(tiny_bundle, {k: case_paths[k] for k in ("FLAIR", "T1")}, tmp_path / "p") == 0
    assert "unlike" not in caplog.text


def test_one_scan_given_for_both_channels_gets_a_warning(tiny_bundle, case_paths, tmp_path, caplog):
    assert _segment(tiny_bundle, {"FLAIR": case_paths["FLAIR"], "T1": case_paths["FLAIR"]}, tmp_path / "o") == 0
    assert "channels 'FLAIR' and 'T1' hold the same image" in caplog.text


# --------------------------------------------------------------------------- orientation
def _oriented(case_paths, tmp_path, code: str, direction=None) -> dict:
    out = {}
    for name in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(case_paths[name]))
        if direction is not None:
            image.SetDirection(direction)
        out[name] = tmp_path / f"{code}-{name}.nrrd"
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(out[name]))
    return out


def _mask_in(folder, code):
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(folder / "mask.nii.gz")), code))


@pytest.mark.parametrize("code", ["RAS", "LPI", "ASL", "SRA"])
def test_the_stored_orientation_does_not_change_the_mask(tiny_bundle, case_paths, tmp_path, code):
    """Flipped in-plane, slices reversed, stored sagittally or coronally: the same mask in physical space."""
    assert _segment(tiny_bundle, _oriented(case_paths, tmp_path, "LPS"), tmp_path / "lps") == 0
    stored = _oriented(case_paths, tmp_path, code)
    assert _segment(tiny_bundle, stored, tmp_path / code) == 0
    out = sitk.ReadImage(str(tmp_path / code / "mask.nii.gz"))
    ref = sitk.ReadImage(str(stored["FLAIR"]))
    assert out.GetSize() == ref.GetSize() and np.allclose(out.GetDirection(), ref.GetDirection())
    a, b = _mask_in(tmp_path / "lps", "LPS"), _mask_in(tmp_path / code, "LPS")
    assert a.sum() > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99


def test_an_oblique_and_left_handed_direction_gives_the_same_mask(tiny_bundle, case_paths, tmp_path):
    oblique = oblique_direction()
    left = tuple((np.asarray(oblique).reshape(3, 3) @ np.diag([1.0, -1.0, 1.0])).flatten())  # det -1
    assert _segment(tiny_bundle, _oriented(case_paths, tmp_path, "LPS", oblique), tmp_path / "a") == 0
    assert _segment(tiny_bundle, _oriented(case_paths, tmp_path, "PIL", oblique), tmp_path / "b") == 0
    a, b = _mask_in(tmp_path / "a", "LPS"), _mask_in(tmp_path / "b", "LPS")
    assert a.sum() > 0 and np.array_equal(a, b)
    assert _segment(tiny_bundle, _oriented(case_paths, tmp_path, "LPS", left), tmp_path / "c") == 0


# --------------------------------------------------------------------------- bundles
@pytest.fixture
def copy(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def _edit(copy, change, reseal=False):
    path = copy / "bundle.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    change(card)
    if reseal and isinstance(card, dict):
        card["seal"] = seal(card)
    path.write_text(json.dumps(card))


@pytest.mark.parametrize("change", [  # each a change, whatever settings selection chose
    lambda c: c["config"]["cluster"].__setitem__("k", c["config"]["cluster"]["k"] + 1),
    lambda c: c["config"]["cluster"].__setitem__("presence_threshold", 0.123),
    lambda c: c["config"]["seeds"].__setitem__("cam_threshold", 0.9),
    lambda c: c["config"]["data"].__setitem__("resolution", 48),
    lambda c: c["task"].__setitem__("mask_labels", [2]),
], ids=["k", "threshold", "cam-threshold", "resolution", "task"])
def test_an_edited_setting_is_refused_as_tampering(copy, change):
    before = load_bundle(copy).id
    _edit(copy, change)
    with pytest.raises(BundleError, match="was edited after the bundle was made"):
        load_bundle(copy)
    assert before.startswith("tiny@")


def test_the_untouched_bundle_loads_and_its_id_covers_the_settings(copy):
    a = load_bundle(copy).id
    _edit(copy, lambda c: c["config"]["cluster"].__setitem__("k", c["config"]["cluster"]["k"] + 1), reseal=True)
    assert load_bundle(copy).id != a


@pytest.mark.parametrize("change,message", [
    (lambda c: c["config"]["data"].__setitem__("resolution", "64"), "setting data.resolution must be int"),
    (lambda c: c.__setitem__("files", None), "'files' must map"),
    (lambda c: c["config"].__setitem__("data", [1, 2]), "must be a mapping"),
])
def test_a_resealed_but_malformed_card_is_refused_clearly(copy, change, message):
    _edit(copy, change, reseal=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def _setting(key: str, value):
    section, name = key.split(".")
    return lambda c: c["config"][section].__setitem__(name, value)


@pytest.mark.parametrize("key,value,message", [
    ("data.resolution", 65, "data.resolution is 65; the diffusion U-Net halves it 2 times, so it must be a multiple "
                            "of 4"),
    ("data.orientation", "XYZ", "data.orientation is 'XYZ'; it must be an orientation code such as \"LPS\""),
    ("data.orientation", "LLS", "data.orientation is 'LLS'"),
    ("data.percentiles", [99, 1], "data.percentiles is .99, 1.; it must be two numbers, 0 <= low < high <= 100"),
    ("cluster.k", 1, "cluster.k is 1; it must be at least 2"),
    ("cluster.rule", "largest", "cluster.rule is 'largest'; it must be one of .'nearest', 'closer_than_background'."),
    ("cluster.presence_threshold", 1.5, "cluster.presence_threshold is 1.5; it must be in .0, 1."),
    ("maps.cam_method", "scorecam", "maps.cam_method is 'scorecam'; it must be one of .'layercam'"),
    ("maps.cam_layers", [0, 7], "maps.cam_layers names layer 7; the CAM classifier has layers 0..2"),
    ("maps.mg_timesteps", [10, 5000], "maps.mg_timesteps holds 5000; the schedule's timesteps go to 999"),
    ("postprocess.min_component_fraction", 2.0, "postprocess.min_component_fraction is 2.0; it must be in .0, 1."),
    ("refine.method", "crf", "refine.method is 'crf'; it must be one of .'none', 'sam'."),
    ("refine.channel", "T2", "refine.channel is 'T2'; it must be one of data.channels .'FLAIR', 'T1'."),
    ("student.segmenter", "nnunet", "student.segmenter is 'nnunet'; it must be one of .'cldf', 'student'."),
    ("student.threshold", 0, "student.threshold is 0; it must be in .0, 1."),
    ("diffusion.schedule", "quadratic", "diffusion.schedule is 'quadratic'; it must be one of .'linear_beta'"),
    ("decoder.hidden", [], "decoder.hidden is ..; it must be a list of one or more"),
])
def test_a_resealed_card_with_a_setting_out_of_its_allowed_set_is_refused_naming_it(copy, key, value, message):
    """The seal guards against accidents; a deliberate reseal still meets the settings' own rules."""
    _edit(copy, _setting(key, value), reseal=True)
    with pytest.raises(BundleError, match=f"unusable 'config' section: setting {message}"):
        load_bundle(copy)


def test_a_card_that_is_a_list_is_refused(copy):
    (copy / "bundle.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="not a JSON object"):
        load_bundle(copy)


def test_truncated_weights_with_a_matching_hash_are_refused(copy):
    from cldf.bundle import sha256

    path = copy / "cam_classifier.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    _edit(copy, lambda c: c["files"].__setitem__(path.name, sha256(path)), reseal=True)
    with pytest.raises(BundleError, match="not a readable weight file"):
        load_bundle(copy)


def test_weights_swapped_between_files_are_refused(copy):
    a, b = copy / "cdm.safetensors", copy / "decoders.safetensors"
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)
    _edit(copy, lambda c: c["files"].update({a.name: c["files"][b.name], b.name: c["files"][a.name]}))
    with pytest.raises(BundleError, match="was edited"):
        load_bundle(copy)
    _edit(copy, lambda c: None, reseal=True)  # even re-sealed, the architecture check names the file
    with pytest.raises(BundleError, match="does not fit"):
        load_bundle(copy)


def test_weight_files_follow_the_umask(tiny_bundle):
    mask = os.umask(0)
    os.umask(mask)
    for path in tiny_bundle.glob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------- outputs: complete or not at all
def test_out_below_a_file_or_being_a_file_is_refused_before_any_work(tiny_bundle, case_paths, tmp_path, capsys):
    inputs = {k: case_paths[k] for k in ("FLAIR", "T1")}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _segment(tiny_bundle, inputs, blocker / "out") == 2
    assert "a part of the path is a file" in capsys.readouterr().err
    assert _segment(tiny_bundle, inputs, blocker) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_folder_of_other_files_is_never_replaced(tiny_bundle, case_paths, tmp_path, capsys):
    folder = tmp_path / "patient"
    folder.mkdir()
    (folder / "flair.nii.gz").write_bytes(b"user data")
    assert _segment(tiny_bundle, {k: case_paths[k] for k in ("FLAIR", "T1")}, folder, "--overwrite") == 2
    assert "holds files that are not results" in capsys.readouterr().err
    assert (folder / "flair.nii.gz").read_bytes() == b"user data"


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused_before_any_work(tiny_bundle, case_paths, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    assert _segment(tiny_bundle, {k: case_paths[k] for k in ("FLAIR", "T1")}, parent / "out") == 2
    assert "read-only" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["full-disk", "sigint"])
def test_a_failure_while_writing_keeps_the_earlier_results_whole(tiny_bundle, case_paths, tmp_path, capsys,
                                                                 monkeypatch, failure):
    inputs = {k: case_paths[k] for k in ("FLAIR", "T1")}
    out = tmp_path / "o"
    assert _segment(tiny_bundle, inputs, out) == 0
    before = _listing(out)
    real, calls = outputs.write_volume, []

    def failing(array, reference, path):
        calls.append(path)
        if len(calls) == 3:  # two maps written, then the disk fills up (or Ctrl-C)
            path.write_bytes(b"partial")
            raise failure
        real(array, reference, path)

    monkeypatch.setattr(outputs, "write_volume", failing)
    code = _segment(tiny_bundle, inputs, out, "--overwrite")
    err = capsys.readouterr().err
    if isinstance(failure, KeyboardInterrupt):
        assert code == 130 and "interrupted; nothing half-written was kept. Run the same command again to start " \
                               "over." in err
    else:
        assert code == 2 and "no space left on the disk" in err and f"nothing was written to {out}" in err
    assert _listing(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.setattr(outputs, "write_volume", real)
    assert _segment(tiny_bundle, inputs, out, "--overwrite") == 0  # and a re-run is not refused


def test_a_second_run_that_finishes_later_does_not_mix_its_files_in(tiny_bundle, case_paths, tmp_path, capsys,
                                                                    monkeypatch):
    """Two runs into one new --out: the first to finish wins, the second says so and leaves it whole."""
    inputs = {k: case_paths[k] for k in ("FLAIR", "T1")}
    out = tmp_path / "o"
    real, other = outputs.commit, []

    def other_run_finishes_first(staging, out_dir, overwrite, also_ours=()):
        if not other:
            other.append(out_dir)
            assert _segment(tiny_bundle, inputs, out_dir, "--format", "nrrd") == 0
        return real(staging, out_dir, overwrite, also_ours)

    monkeypatch.setattr(outputs, "commit", other_run_finishes_first)
    assert _segment(tiny_bundle, inputs, out) == 2
    assert "already holds results" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cam.nrrd", "mean_gradient.nrrd", "seeds.nrrd", "mask.nrrd", "slices.csv", outputs.MARKER])


def test_results_carry_a_completion_marker_and_compact_maps(tiny_bundle, case_paths, tmp_path):
    out = tmp_path / "o"
    assert _segment(tiny_bundle, {k: case_paths[k] for k in ("FLAIR", "T1")}, out) == 0
    marker = json.loads((out / outputs.MARKER).read_text(encoding="utf-8"))
    assert marker["complete"] and marker["bundle"] == load_bundle(tiny_bundle).id and marker["map_scale"] == 255
    cam = sitk.ReadImage(str(out / "cam.nii.gz"))
    assert cam.GetPixelID() == sitk.sitkUInt8
    mask = os.umask(0)
    os.umask(mask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in out.iterdir())


# --------------------------------------------------------------------------- training manifests
def _manifest(tmp_path, cases) -> object:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"cases": cases}))
    return path


def test_manifest_problems_are_named(case_paths, tmp_path):
    flair = str(case_paths["FLAIR"])
    with pytest.raises(InputError, match="case #0 .* needs an 'id'"):
        load_manifest(_manifest(tmp_path, ["not a mapping"]))
    with pytest.raises(InputError, match="appears twice"):
        load_manifest(_manifest(tmp_path, [{"id": "a", "channels": {"FLAIR": flair}}] * 2))
    m = load_manifest(_manifest(tmp_path, [{"id": "a", "channels": {"FLAIR": flair}, "mask": "missing.nii.gz"}]))
    with pytest.raises(FileNotFoundError, match="file not found"):
        weak_slice_labels(m.cases[0], [1], 0.01)
    (tmp_path / "mask.nii.gz").write_text("not an image")
    m = load_manifest(_manifest(tmp_path, [{"id": "a", "channels": {"FLAIR": flair}, "mask": "mask.nii.gz"}]))
    with pytest.raises(InputError, match="not an image this tool can read"):
        weak_slice_labels(m.cases[0], [1], 0.01)


@pytest.mark.parametrize("rows,message", [
    ("slice,label\n0,1\n1,2\n", "labels are 1 .present., 0 .absent. or -1"),
    ("slice,label\n-1,1\n0,0\n", "slice indices start at 0"),
    ("slice,label\n0,yes\n", "integer slice index"),
])
def test_bad_slice_label_csvs_are_refused(case_paths, tmp_path, rows, message):
    (tmp_path / "labels.csv").write_text(rows)
    m = load_manifest(_manifest(tmp_path, [{"id": "a", "channels": {"FLAIR": str(case_paths["FLAIR"])},
                                            "slice_labels": "labels.csv"}]))
    with pytest.raises(InputError, match=message):
        weak_slice_labels(m.cases[0], None, 0.01)
