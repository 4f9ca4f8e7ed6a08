"""Weak labels made in Slicer: slices of a volume marked "target present / absent", for `cldf train`.

The labels live on the volume node (attribute ``CLDF.SliceLabels``, saved with
the scene): one value per axial slice (the volume's k index, slice 0 first as
SimpleITK reads the file), 1 present, 0 absent, -1 not labelled. They are saved
as the slice-label CSV a manifest accepts (``slice,label``, every slice, -1 for
those left out of training), and a manifest is built from the scene's volumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cldf.atomic import atomic_path, write_text  # standard library only: no torch

from .nodes import checkVolumeNode, imageFromVolume

LABELS_ATTRIBUTE = "CLDF.SliceLabels"
CHANNELS_ATTRIBUTE = "CLDF.LabelChannels"  # {channel: node ID} of the inputs the labels were made with
PRESENT, ABSENT, UNLABELLED = 1, 0, -1


def sliceCount(volume) -> int:
    return volume.GetImageData().GetDimensions()[2]


def sliceLabels(volume) -> np.ndarray:
    """``(Z,)`` int labels of the volume's axial slices (-1 where none was given)."""
    z = sliceCount(volume)
    stored = volume.GetAttribute(LABELS_ATTRIBUTE)
    labels = np.array(json.loads(stored), dtype=np.int64) if stored else np.full(z, UNLABELLED, np.int64)
    if len(labels) != z:
        raise ValueError(f"'{volume.GetName()}' has {len(labels)} stored slice labels for {z} slices; "
                         "clear them (markSlices with label -1) and label again")
    return labels


def markSlices(volume, first: int, last: int, label: int) -> np.ndarray:
    """Label slices ``first..last`` (inclusive, either order) 1, 0 or -1 (clear); returns all labels."""
    if label not in (PRESENT, ABSENT, UNLABELLED):
        raise ValueError(f"a slice label is 1 (present), 0 (absent) or -1 (clear), not {label}")
    z = sliceCount(volume)
    first, last = sorted((int(first), int(last)))
    if first < 0 or last >= z:
        raise ValueError(f"slices {first}..{last} are outside '{volume.GetName()}' (slices 0..{z - 1})")
    labels = sliceLabels(volume)
    labels[first : last + 1] = label
    volume.SetAttribute(LABELS_ATTRIBUTE, json.dumps(labels.tolist()))
    return labels


def sliceIndexAt(volume, sliceNode) -> int:
    """The volume's axial slice (k index) under a slice view's centre, clipped to the volume."""
    import vtk

    center = [sliceNode.GetSliceToRAS().GetElement(i, 3) for i in range(3)] + [1.0]
    rasToIjk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(rasToIjk)
    k = rasToIjk.MultiplyPoint(center)[2]
    return int(np.clip(round(k), 0, sliceCount(volume) - 1))


def saveSliceLabels(volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the volume's labels as ``slice,label`` CSV, every slice, atomically."""
    labels = sliceLabels(volume)
    if not (labels != UNLABELLED).any():
        raise ValueError(f"no slice of '{volume.GetName()}' is labelled yet: mark slices present or absent first")
    rows = ["slice,label"] + [f"{z},{label}" for z, label in enumerate(labels)]
    return _writeText(Path(path), "\n".join(rows) + "\n", overwrite)


def writeManifest(cases: dict[str, dict], folder: str | os.PathLike, name: str = "slicer-labels",
                  overwrite: bool = False) -> Path:
    """A dataset manifest for `cldf train --data`, from the scene: ``{case id: {channel: volume node}}``.

    Each case's channels are written as ``<folder>/<case>/<channel>.nii.gz`` (the voxels and geometry in
    the scene) and its labels, taken from the first channel's volume, as ``<case>/slice_labels.csv``.
    """
    folder = Path(folder)
    if not cases:
        raise ValueError("a manifest needs at least one case")
    for caseId, channels in cases.items():  # every volume checked before anything is written
        if not channels:
            raise ValueError(f"case '{caseId}' has no channel volumes")
        for channel, volume in channels.items():
            checkVolumeNode(volume, f"{caseId}/{channel}")
    entries = []
    for caseId, channels in cases.items():
        caseDir = folder / caseId
        caseDir.mkdir(parents=True, exist_ok=True)
        first = next(iter(channels.values()))
        labelsPath = saveSliceLabels(first, caseDir / "slice_labels.csv", overwrite)
        files = {}
        for channel, volume in channels.items():
            files[channel] = f"{caseId}/{channel}.nii.gz"
            _writeImage(volume, folder / files[channel], overwrite)
        entries.append({"id": caseId, "channels": files, "slice_labels": labelsPath.relative_to(folder).as_posix()})
    manifest = json.dumps({"name": name, "cases": entries}, indent=1) + "\n"
    return _writeText(folder / "manifest.json", manifest, overwrite)


def rememberChannels(volume, channels: dict) -> None:
    """Record on the labelled volume which volumes are its case's channels (for `labelledCases`)."""
    volume.SetAttribute(CHANNELS_ATTRIBUTE, json.dumps({c: n.GetID() for c, n in channels.items()}))


def labelledCases(scene) -> dict[str, dict]:
    """``{case id: {channel: volume}}`` for every volume of the scene with slice labels (the case id is its name)."""
    cases = {}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        volume = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if volume.GetAttribute(LABELS_ATTRIBUTE) is None or not (sliceLabels(volume) != UNLABELLED).any():
            continue
        ids = json.loads(volume.GetAttribute(CHANNELS_ATTRIBUTE) or "{}")
        channels = {c: scene.GetNodeByID(i) for c, i in ids.items()} or {"image": volume}
        missing = [c for c, n in channels.items() if n is None]
        if missing:
            raise ValueError(f"the labelled volume '{volume.GetName()}' lost its channel(s) {missing}: "
                             "select the inputs again and re-mark one slice")
        cases[_caseId(volume.GetName(), cases)] = channels
    return cases


def _caseId(name: str, taken: dict) -> str:
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "case"
    caseId, n = base, 1
    while caseId in taken:
        n += 1
        caseId = f"{base}-{n}"
    return caseId


def _writeImage(volume, path: Path, overwrite: bool) -> None:
    import SimpleITK as sitk

    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another folder or allow overwriting")
    with atomic_path(path) as tmp:
        sitk.WriteImage(imageFromVolume(volume), str(tmp), True)


def _writeText(path: Path, text: str, overwrite: bool) -> Path:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder not found: {path.parent}; create it first or choose another")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    write_text(path, text)
    return path
