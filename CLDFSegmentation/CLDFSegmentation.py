"""CLDF Segmentation: weakly supervised segmentation (contrastive learning on diffusion features) in 3D Slicer.

A thin shell: module metadata, the module logic and the self-test. The panel
(`CLDFSegmentationLib.widget`) only binds Qt widgets to the typed parameter node
and to `CLDFSegmentationController`; every decision lives in `CLDFSegmentationLib`
(MRML, no Qt), the work in the bundled `cldf` engine, on worker threads.
"""

from __future__ import annotations

from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

import CLDFSegmentationLib
from CLDFSegmentationLib import shippedBundles
from CLDFSegmentationLib.widget import CLDFSegmentationWidget  # the panel: Slicer finds it in this module

__all__ = ["CLDFSegmentation", "CLDFSegmentationLogic", "CLDFSegmentationTest", "CLDFSegmentationWidget"]


#
# CLDFSegmentation
#
class CLDFSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLDF Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLDFSegmentation developers"]
        self.parent.helpText = """
Weakly supervised segmentation with CLDF: a model trained from slice-level labels only
("target present / absent in this slice") segments a volume. Pick a model bundle and one volume per
channel it lists, then press <b>Segment</b>: the class activation map (CAM), the mean-gradient map and
the mask appear slice by slice. Train your own bundle with <code>cldf train</code> (see the README).
"""
        self.parent.acknowledgementText = """
CLDF: Zeng et al., "Contrastive Learning with Diffusion Features for Weakly Supervised Medical Image
Segmentation", 2025. Mean-gradient maps: Wolleb et al., "Diffusion Models for Medical Anomaly Detection",
MICCAI 2022. LayerCAM: Jiang et al., IEEE TIP 2021. Supervised contrastive loss: Khosla et al., NeurIPS 2020.
Networks from MONAI.
"""
        # The shipped sample scan (a real LGG test patient, FLAIR + T1) in the Sample Data module.
        from CLDFSegmentationLib.sampledata import registerSampleData

        slicer.app.connect("startupCompleted()", registerSampleData)


#
# CLDFSegmentationLogic: the Qt-free logic plus the module's parameter node, under the name Slicer expects
#
class CLDFSegmentationLogic(CLDFSegmentationLib.CLDFSegmentationLogic, ScriptedLoadableModuleLogic):
    """`CLDFSegmentationLib.CLDFSegmentationLogic`, whose `getParameterNode` gives the typed parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)


#
# CLDFSegmentationTest
#
class CLDFSegmentationTest(ScriptedLoadableModuleTest):
    """Segments the shipped sample scan (a real test patient) with the brain bundle and checks it against its mask."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_the_sample_scan_and_export()

    def test_segment_the_sample_scan_and_export(self):
        from cldf import metrics
        from CLDFSegmentationLib import dependencies
        from CLDFSegmentationLib.sampledata import SAMPLE_DIR, SAMPLE_FILES

        missing = (["torch"] if dependencies.torchMissing() else []) + dependencies.missingRequirements()
        if missing:
            self.delayDisplay(f"CLDF Segmentation self-test skipped: install {', '.join(missing)} first "
                              "(press Segment once, or the PyTorch extension for torch)")
            return
        info = next(b for b in shippedBundles() if b.name == "brain-mri-flair-t1")
        inputs = {c: slicer.util.loadVolume(str(SAMPLE_DIR / SAMPLE_FILES[c][0])) for c in info.channels}
        truth = slicer.util.arrayFromVolume(slicer.util.loadVolume(str(SAMPLE_DIR / "mask.nii.gz"))) > 0
        job = CLDFSegmentationLogic().start(inputs, info.path, device="auto", refine="none")
        job.run()
        mask = job.engineResult.on_input_grid().mask > 0  # the engine's arrays, on the input's voxels
        score = metrics.dice(mask, truth)
        self.assertGreater(score, 0.5, f"the sample's Dice is {score:.3f}")
        reference = inputs[info.channels[0]]
        path = Path(slicer.app.temporaryPath) / "CLDFSegmentationSelfTest.nii.gz"
        CLDFSegmentationLogic.exportLabelmap(job.result.segmentation, reference, path, overwrite=True)
        self.assertTrue(path.is_file())
        path.unlink()
        self.delayDisplay(f"CLDF Segmentation self-test passed (sample Dice {score:.3f})")
