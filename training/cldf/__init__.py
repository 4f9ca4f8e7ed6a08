"""CLDF: weakly supervised segmentation with contrastive learning on diffusion features.

Zeng et al. 2025 ("Contrastive Learning with Diffusion Features for weakly
supervised medical image segmentation"). Train from volumes and slice-level
labels (`cldf.trainer.train`), segment new volumes (`cldf.segment`), score methods
against ground truth (`cldf.evaluation.evaluate`). Neither Slicer nor Qt is imported here.
"""

__version__ = "0.1.0"
