"""The mask as a DICOM Segmentation (highdicom): one binary segment, coded, on the frames of the series it was made from.

`source` reads and checks the series' headers before any work (the input must be a DICOM series, the bundle must
record its target's codes); `write` turns the run's mask on the series' grid into a Segmentation Storage object
that references every image of the series, with the bundle's name and seal as the algorithm's identification.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .card import segment_code
from .images import InputError
from .terminology import Code, SegmentCode

FILE_NAME = "mask.seg.dcm"
FORMAT = "dicom-seg"  # `cldf segment --format`: the volumes as NIfTI, and the mask as a DICOM Segmentation too


@dataclass(frozen=True)
class SeriesSource:
    """The DICOM series a mask is written onto, and what the Segmentation says about its segment."""

    folder: Path
    files: tuple[Path, ...]
    code: SegmentCode
    label: str
    algorithm: str  # the bundle's name
    version: str  # the bundle's seal


def source(series: str | Path, card: dict, channel: str) -> SeriesSource:
    """Check, before any work, that ``series`` is a DICOM series a Segmentation can reference and that the bundle
    codes its target; ``channel`` names the input in messages."""
    import pydicom

    folder = Path(series)
    code = check(card, {channel: folder})
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise InputError(f"channel '{channel}': {folder} must hold exactly one DICOM series, not {len(ids)}")
    files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                           "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in first]
    if missing:
        raise InputError(f"channel '{channel}': the DICOM series in {folder} lacks {', '.join(missing)}, which a "
                         "DICOM Segmentation referencing it needs; export the series from the PACS or scanner again")
    task = card.get("task") or {}
    return SeriesSource(folder, files, code, str(task.get("target", "target")), str(card.get("name", "bundle")),
                        str(card.get("seal", "")))


def check(card: dict, series: dict[str, Path]) -> SegmentCode:
    """Refuse, before any work, a bundle without standard codes or an input (case id or channel -> path) that is
    not a DICOM series folder; returns the bundle's codes."""
    code = segment_code(card)
    if code is None:
        raise InputError(f"bundle '{card.get('name', 'bundle')}' records no standard codes for its target, which a "
                         "DICOM Segmentation needs: add them with `cldf card --bundle BUNDLE --code ...`")
    files = [f"{name} ({path})" for name, path in series.items() if not Path(path).is_dir()]
    if files:
        raise InputError(f"--format {FORMAT} writes a DICOM Segmentation of the series it segments, so the bundle's "
                         f"first channel must be a folder holding a DICOM series; not so for "
                         f"{', '.join(files[:5])}{' and more' if len(files) > 5 else ''}")
    return code


def write(mask: np.ndarray, reference: sitk.Image, src: SeriesSource, path: Path) -> None:
    """Write ``mask`` (``(Z, Y, X)`` on ``reference``, the grid the series was read on) as a Segmentation of
    ``src``'s series to ``path``: one frame per image of the series, each placed by its own position."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from . import __version__

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in src.files]
    frames = np.stack([_frame(mask, reference, ds) for ds in datasets])
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=src.label[:64],
        segmented_property_category=_concept(src.code.category), segmented_property_type=_concept(src.code.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=src.algorithm[:64], version=src.version[:64], family=codes.cid7162.ArtificialIntelligence),
        anatomic_regions=[_concept(src.code.region)] if src.code.region else None,
        primary_anatomic_structures=None)
    if src.code.modifier:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(src.code.modifier)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="CLDFSegmentation",
        manufacturer_model_name=src.algorithm[:64], software_versions=f"cldf {__version__}", device_serial_number="none",
        series_description=f"CLDF {src.label}"[:64], omit_empty_frames=False)
    seg.save_as(path)


def _frame(mask: np.ndarray, reference: sitk.Image, ds) -> np.ndarray:
    """The mask's slice at a DICOM image's position (rows x columns, as the image's own pixels)."""
    z = reference.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
    if not 0 <= z < len(mask) or mask.shape[1:] != (int(ds.Rows), int(ds.Columns)):
        raise InputError(f"the image {ds.SOPInstanceUID} of the series does not lie on the grid the series was read "
                         "on; the series cannot take a DICOM Segmentation")
    return mask[z].astype(bool)


def _concept(code: Code):
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
