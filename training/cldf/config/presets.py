"""Named presets: the CPU recipe (the defaults), the paper's scale, and the recipe of each shipped bundle.

`cldf train --preset NAME` starts from one; ``--set`` changes single settings of it. A shipped bundle's
recipe is the preset its Makefile line names, so ``make bundles`` spells no setting itself.
"""

from __future__ import annotations

from typing import Any

from ..defaults import ABDOMEN_CT_WINDOW
from .overrides import apply_settings
from .sections import (
    AmeCamConfig,
    ClassifierConfig,
    CLDFConfig,
    DataConfig,
    DecoderConfig,
    DiffusionConfig,
    FeatureConfig,
    MapConfig,
)

# What fits a 2-core CPU: 64 x 64 slices, a 1 M-parameter CDM. Departures from the paper chosen on the
# validation split are listed in docs/departures.md and recorded in bundle.json next to these values.
CPU = CLDFConfig()

# The paper's scale (256 x 256, its networks, schedule and decoder), for a GPU.
PAPER = CLDFConfig(
    data=DataConfig(resolution=256),
    maps=MapConfig(mg_shift_period=4),
    diffusion=DiffusionConfig(
        channels=(64, 128, 256, 256),
        attention_levels=(False, False, False, True),
        num_res_blocks=2,
        num_head_channels=64,
        steps=50000,
        batch_size=16,
        lr=1e-4,
    ),
    noisy_classifier=ClassifierConfig(
        channels=(64, 128, 256, 256), attention_levels=(False, False, False, True), num_res_blocks=2,
        num_head_channels=64, steps=20000
    ),
    cam_classifier=ClassifierConfig(
        channels=(64, 128, 256, 256), attention_levels=(False, False, False, False), num_res_blocks=2,
        max_timestep=0, steps=10000,
    ),
    ame_cam=AmeCamConfig(widths=(64, 128, 256, 512), stem_stride=4, steps=10000, eval_every=500,
                         aggregator_steps=2000),  # ResNet-18 widths and stem
    features=FeatureConfig(blocks=(0, 1, 2), max_batch=2),
    # Up to 1024 seed pixels per class and slice in each batch: with every seed pixel (~10^5 per batch at 256 x 256)
    # the contrastive loss's N x N similarity matrix would not fit in any GPU's memory.
    decoder=DecoderConfig(pixels_per_class=1024),
)

# AME-CAM trained beside LayerCAM (which of the two seeds CLDF is chosen on the validation patients), with
# multiple-instance pooling and hard negatives (benchmarks/ame_cam_localisation-*.md).
_AME_CAM: dict[str, Any] = {"ame_cam.enabled": True, "ame_cam.top_fraction": 0.05, "ame_cam.hard_negatives": 0.5}
# The abdominal bundles were trained with the narrow intensity augmentation (the CPU recipe now uses the wide one).
_NARROW: dict[str, Any] = {"cam_classifier.intensity": "narrow"}
# The BTCV scans are 8-bit CT: the abdomen window in HU mapped to 0..255. CT given in HU goes through it.
_BTCV: dict[str, Any] = {"data.channels": ["CT"], "data.ct_window": list(ABDOMEN_CT_WINDOW), **_AME_CAM, **_NARROW}
# Organs with sides: the CAM classifier sees the patient's halves, never mirrored (`cldf.sides`).
_NO_FLIPS: dict[str, Any] = {"cam_classifier.flips": False}

RECIPES: dict[str, dict[str, Any]] = {
    "brain-mri-flair-t1": {"data.channels": ["FLAIR", "T1"], **_AME_CAM},
    "abdomen-ct-kidney": {**_BTCV, **_NO_FLIPS, "cam_classifier.sides": "both",
                          "cam_classifier.left_labels": [3], "cam_classifier.right_labels": [2]},
    "abdomen-ct-spleen": {**_BTCV, **_NO_FLIPS, "cam_classifier.sides": "left"},
    "abdomen-ct-liver": _BTCV,
}

PRESETS: dict[str, CLDFConfig] = {"cpu": CPU, "paper": PAPER,
                                  **{name: apply_settings(CPU, settings) for name, settings in RECIPES.items()}}


def preset(name: str) -> CLDFConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return CLDFConfig.from_dict(PRESETS[name].to_dict())
