"""The module's typed parameter node on a real ``vtkMRMLScriptedModuleNode`` (slicer-core): types, ranges, choices,
node references, defaults, and a scene saved and loaded again."""

from __future__ import annotations

from pathlib import Path

import pytest
import slicer

from CLDFSegmentationLib.parameters import CLDFSegmentationParameterNode, moduleParameterNode


def test_defaults_are_written_on_the_node_once_and_read_back_typed(mrml_scene):
    p = moduleParameterNode(mrml_scene)
    node = p.parameterNode
    assert node.GetAttribute("ModuleName") == "CLDFSegmentation" and node.GetParameter("device") == "auto"
    assert (p.device, p.overlayOpacity, p.showMask, p.showSeeds, p.shownMap) == ("auto", 0.6, True, False, "cam")
    assert p.trainManifest == Path() and p.inputVolume(0) is None and p.outputs() is None
    p.device = "cpu"
    assert moduleParameterNode(mrml_scene).device == "cpu", "the same singleton node, its value kept"


@pytest.mark.parametrize("field, value, error, message", [
    ("overlayOpacity", 1.5, ValueError, r"overlayOpacity must be within \[0.0, 1.0\], not 1.5"),
    ("clusterK", 17, ValueError, r"clusterK must be within \[2, 16\], not 17"),
    ("device", "gpu", ValueError, r"device must be one of \('auto', 'cpu', 'cuda'\), not 'gpu'"),
    ("clusterRule", "farthest", ValueError, "clusterRule must be one of"),
    ("showMask", "yes", TypeError, "showMask must be a bool"),
    ("trainManifest", "manifest.json", TypeError, "trainManifest must be a Path"),
    ("inputVolume0", "FLAIR", TypeError, "inputVolume0 must be a vtkMRMLScalarVolumeNode"),
])
def test_a_value_of_the_wrong_type_or_out_of_range_is_refused_and_the_node_keeps_its_value(mrml_scene, field, value,
                                                                                            error, message):
    p = moduleParameterNode(mrml_scene)
    before = p.getValue(field)
    with pytest.raises(error, match=message):
        p.setValue(field, value)
    assert p.getValue(field) == before


def test_node_references_follow_the_nodes_and_outputs_that_left_the_scene_are_forgotten(mrml_scene):
    p = moduleParameterNode(mrml_scene)
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FLAIR")
    p.setInputVolume(1, volume)
    assert p.inputVolume(1) is volume and p.inputVolumes(("T1", "FLAIR")) is None
    p.setInputVolume(0, volume)
    assert p.inputVolumes(("T1", "FLAIR")) == {"T1": volume, "FLAIR": volume}
    with pytest.raises(ValueError, match="input index must be in 0..3"):
        p.setInputVolume(4, volume)
    outputs = {name: mrml_scene.AddNewNodeByClass(cls) for name, cls in (
        ("camVolume", "vtkMRMLScalarVolumeNode"), ("meanGradientVolume", "vtkMRMLScalarVolumeNode"),
        ("segmentation", "vtkMRMLSegmentationNode"), ("seedsVolume", "vtkMRMLLabelMapVolumeNode"),
        ("table", "vtkMRMLTableNode"), ("chart", "vtkMRMLPlotChartNode"))}
    p.setOutputs(type("Result", (), {**outputs, "segmentId": "tumour"})(), volume)
    assert p.outputs() == {**outputs, "runInput": volume, "segmentId": "tumour"}
    mrml_scene.RemoveNode(outputs["chart"])
    assert p.outputs() is None


def test_the_typed_values_come_back_from_a_saved_scene(mrml_scene, tmp_path):
    p = moduleParameterNode(mrml_scene)
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FLAIR")
    p.setInputVolume(0, volume)
    p.overlayOpacity, p.showMask, p.clusterK, p.trainManifest = 0.25, False, 5, tmp_path / "manifest.json"
    path = tmp_path / "scene.mrml"
    mrml_scene.SetURL(str(path))
    assert mrml_scene.Commit()
    again = slicer.vtkMRMLScene()
    again.SetURL(str(path))
    assert again.Connect()
    q = CLDFSegmentationParameterNode(again.GetSingletonNode("CLDFSegmentation", "vtkMRMLScriptedModuleNode"))
    assert (q.overlayOpacity, q.showMask, q.clusterK, q.trainManifest) == (0.25, False, 5, tmp_path / "manifest.json")
    assert q.inputVolume(0).GetName() == "FLAIR" and q.inputVolume(0).GetScene() is again
    again.Clear(True)
