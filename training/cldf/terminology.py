"""What a bundle's segment is, in standard codes: SNOMED CT category, type and laterality, as DICOM and Slicer say it.

A card's ``task.code`` holds the codes (`SegmentCode.to_card`); the DICOM Segmentation (`dicom_seg`), the
Slicer segment's terminology entry (`slicer_entry`), ``cldf-result.json`` and ``slices.csv`` all take them from
there. Targets the project trains are known by name (`KNOWN`); any other bundle gets its codes with
``cldf card --code``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

SCHEME = re.compile(r"^[A-Z0-9][A-Z0-9\-.]{0,15}$")  # a DICOM coding scheme designator: SCT, DCM, ...
SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


PARTS = ("category", "type", "modifier", "region")


class Code(NamedTuple):
    """One coded concept: coding scheme designator, code value, code meaning (e.g. ``SCT 78961009 Spleen``)."""

    scheme: str
    value: str
    meaning: str

    def __str__(self) -> str:
        return f"{self.scheme} {self.value} {self.meaning}"


@dataclass(frozen=True)
class SegmentCode:
    """A segment's codes: DICOM's segmented property category and type, the type's modifier (laterality), and
    the anatomic region a finding lies in (a tumour's organ)."""

    category: Code
    type: Code
    modifier: Code | None = None
    region: Code | None = None

    def to_card(self) -> dict[str, list[str]]:
        return {k: list(c) for k, c in zip(PARTS, (self.category, self.type, self.modifier, self.region)) if c}

    @classmethod
    def from_card(cls, entry: Any) -> "SegmentCode":
        """The card's ``task.code``, every part checked; a ValueError names the part that is wrong."""
        if not isinstance(entry, dict) or not {"category", "type"} <= set(entry):
            raise ValueError("task.code must hold 'category' and 'type' (and may hold 'modifier' and 'region'), "
                             "each [scheme, value, meaning]")
        unknown = set(entry) - set(PARTS)
        if unknown:
            raise ValueError(f"task.code holds unknown parts: {', '.join(sorted(unknown))}")
        return cls(*(_code(entry[k], f"task.code.{k}") if k in entry else None for k in PARTS))

    def __str__(self) -> str:
        where = f", in {self.region.meaning}" if self.region else ""
        return f"{self.type}{f' ({self.modifier.meaning})' if self.modifier else ''}{where}"


def parse_code(text: str, where: str = "code") -> Code:
    """``SCHEME^VALUE^MEANING`` (the caret notation of DICOM and Slicer) -> `Code`."""
    parts = text.split("^")
    if len(parts) != 3:
        raise ValueError(f"{where}: '{text}' is not SCHEME^VALUE^MEANING, e.g. SCT^78961009^Spleen")
    return _code(parts, where)


def _code(parts: Any, where: str) -> Code:
    if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{where} must be [scheme, value, meaning], three strings, not {parts!r}")
    scheme, value, meaning = (p.strip() for p in parts)
    if not SCHEME.match(scheme):
        raise ValueError(f"{where}: '{scheme}' is not a coding scheme designator (e.g. SCT for SNOMED CT)")
    if not value or len(value) > 64 or "^" in value or "~" in value:
        raise ValueError(f"{where}: '{value}' is not a code value")
    if scheme == "SCT" and not value.isdigit():
        raise ValueError(f"{where}: SNOMED CT code values are digits, not '{value}'")
    if not meaning or len(meaning) > 64 or "^" in meaning or "~" in meaning:
        raise ValueError(f"{where}: '{meaning}' is not a code meaning (1-64 characters, no ^ or ~)")
    return Code(scheme, value, meaning)


# Categories as Slicer's anatomy list and DICOM CID 7150 name them
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
RIGHT_AND_LEFT = Code("SCT", "51440002", "Right and left")  # DICOM CID 244

# The targets of the shipped recipes, by the target names their bundles carry. The kidney bundles segment both
# kidneys as one target (the scans' left and right labels merged), so they are coded as one "Kidney" segment,
# right and left; splitting that mask at the midline would be a guess the bundle was not trained to make.
KNOWN = {
    "tumour": SegmentCode(ALTERED_STRUCTURE, Code("SCT", "108369006", "Neoplasm"), region=Code("SCT", "12738006", "Brain")),
    "kidney": SegmentCode(ANATOMICAL_STRUCTURE, Code("SCT", "64033007", "Kidney"), RIGHT_AND_LEFT),
    "spleen": SegmentCode(ANATOMICAL_STRUCTURE, Code("SCT", "78961009", "Spleen")),
    "liver": SegmentCode(ANATOMICAL_STRUCTURE, Code("SCT", "10200004", "Liver")),
}
KNOWN["tumor"] = KNOWN["tumour"]


def known_code(target_name: str) -> SegmentCode | None:
    """The codes of a target the project knows by name (None for any other: ``cldf card --code`` sets them)."""
    return KNOWN.get(target_name.strip().lower())


def slicer_entry(code: SegmentCode) -> str:
    """Slicer's terminology entry string (`vtkSegment.SetTerminology`): context~category~type~modifier~anatomy."""
    def caret(c: Code | None) -> str:
        return "^".join(c) if c else "^^"

    return "~".join([SLICER_CONTEXT, caret(code.category), caret(code.type), caret(code.modifier),
                     SLICER_ANATOMY_CONTEXT, caret(code.region), "^^"])
