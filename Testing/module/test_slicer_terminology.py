"""Every shipped bundle's segment carries its standard codes as Slicer's terminology entry, on real MRML, and keeps
them through a save and load of the segmentation file."""

from __future__ import annotations

from pathlib import Path

import pytest
import slicer

from cldf.card import card_summary
from cldf.terminology import slicer_entry
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.segmentations import addToScene, newSegmentation

MODELS = Path(__file__).resolve().parents[2] / "CLDFSegmentation" / "Resources" / "Models"
SHIPPED = sorted(b for b in MODELS.iterdir() if (b / "bundle.json").is_file())


@pytest.mark.parametrize("bundle", SHIPPED, ids=[b.name for b in SHIPPED])
def test_the_segment_of_every_shipped_bundle_carries_its_terminology_entry(mrml_scene, tumour_case, bundle, tmp_path):
    card = card_summary(bundle)
    assert card.code is not None, f"{bundle.name} records no standard codes"
    reference = loadVolume(tumour_case["FLAIR"], "reference")
    node, segmentId = newSegmentation(reference, f"reference {card.target}", card.target, card.color,
                                      slicer_entry(card.code))
    addToScene(node, reference)
    entry = node.GetSegmentation().GetSegment(segmentId).GetTerminology()
    assert entry == slicer_entry(card.code)
    assert f"SCT^{card.code.type.value}^{card.code.type.meaning}" in entry
    path = tmp_path / "segmentation.seg.nrrd"  # Slicer's own file keeps the entry
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    loaded = slicer.vtkMRMLSegmentationNode()
    slicer.mrmlScene.AddNode(loaded)
    assert storage.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetSegment(segmentation.GetNthSegmentID(0)).GetTerminology() == entry

