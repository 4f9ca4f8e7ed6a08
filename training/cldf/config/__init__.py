"""Every setting of a bundle (`sections`), changing them by name (`overrides`), the named presets (`presets`) and
the grids selection chooses from (`grids`)."""

from .overrides import apply_overrides, apply_settings, parse_override
from .presets import CPU, PAPER, PRESETS, RECIPES, preset
from .sections import (
                       ADDED_LATER,
                       AmeCamConfig,
                       ClassifierConfig,
                       CLDFConfig,
                       ClusterConfig,
                       CpfCteConfig,
                       DataConfig,
                       DecoderConfig,
                       DiffusionConfig,
                       FeatureConfig,
                       MapConfig,
                       PostprocessConfig,
                       RefineConfig,
                       SaliencyConfig,
                       SeedConfig,
                       StudentConfig,
)

__all__ = ["ADDED_LATER", "AmeCamConfig", "CLDFConfig", "CPU", "ClassifierConfig", "ClusterConfig", "CpfCteConfig",
           "DataConfig", "DecoderConfig", "DiffusionConfig", "FeatureConfig", "MapConfig", "PAPER", "PRESETS", "PostprocessConfig",
           "RECIPES", "RefineConfig", "SaliencyConfig", "SeedConfig", "StudentConfig", "apply_overrides", "apply_settings",
           "parse_override", "preset"]
