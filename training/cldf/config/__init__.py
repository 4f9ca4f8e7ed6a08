"""Every setting of a bundle (`sections`, with `map_sources` and `final_stages`), changing them by name (`overrides`), the named presets (`presets`) and
the grids selection chooses from (`grids`)."""

from .final_stages import RefineConfig, StudentConfig
from .map_sources import AmeCamConfig, CpfCteConfig
from .overrides import apply_overrides, apply_settings, parse_override
from .presets import CPU, PAPER, PRESETS, RECIPES, preset
from .sections import (
                       ADDED_LATER,
                       ClassifierConfig,
                       CLDFConfig,
                       ClusterConfig,
                       DataConfig,
                       DecoderConfig,
                       DiffusionConfig,
                       FeatureConfig,
                       MapConfig,
                       PostprocessConfig,
                       SaliencyConfig,
                       SeedConfig,
)

__all__ = ["ADDED_LATER", "AmeCamConfig", "CLDFConfig", "CPU", "ClassifierConfig", "ClusterConfig", "CpfCteConfig",
           "DataConfig", "DecoderConfig", "DiffusionConfig", "FeatureConfig", "MapConfig", "PAPER", "PRESETS", "PostprocessConfig",
           "RECIPES", "RefineConfig", "SaliencyConfig", "SeedConfig", "StudentConfig", "apply_overrides", "apply_settings",
           "parse_override", "preset"]
