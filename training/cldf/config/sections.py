"""Every setting of a CLDF model bundle, one dataclass per stage of the pipeline.

`CLDFConfig` groups them and is written into ``bundle.json``. The defaults are the CPU recipe (64 x 64
slices, a 1 M-parameter CDM: what `cldf train` uses without ``--preset``); the paper's scale is the
``paper`` preset (`cldf.config.presets`). A bundle records the settings it was trained and tuned with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .constraints import check_config
from .final_stages import RefineConfig, StudentConfig
from .map_sources import AmeCamConfig, CpfCteConfig


@dataclass
class DataConfig:
    """Reading volumes and cutting slices.

    Attributes:
        channels: channel names in the order the networks see them.
        resolution: square in-plane size slices are padded and resized to.
        percentiles: robust intensity range mapped to [-1, 1] per volume and channel.
        positive_fraction: a slice is positive when the target covers more than
            this fraction of it; slices with 0 < fraction <= this are ambiguous
            and dropped from training.
        body_threshold: normalised intensity above which (in any channel) a
            pixel counts as body; air carries no information.
        split_fractions: train / validation / test fractions of patients.
        orientation: the orientation code (e.g. "LPS") every volume is reoriented to
            before slicing, so that slices are cut along the same anatomical axis
            however a scan is stored; set from the first training case; "" keeps
            the stored voxel order.
        ct_window: the Hounsfield window the training scans were made with (HU clipped to it, mapped
            linearly onto 0..255); a channel given in HU goes through it first (`cldf.hounsfield`).
            None: the training scans were used as given (MR; a CT cohort trained in its own units).
    """

    channels: list[str] = field(default_factory=lambda: ["FLAIR", "T1"])
    resolution: int = 64
    percentiles: tuple[float, float] = (0.5, 99.5)
    positive_fraction: float = 0.01
    body_threshold: float = -0.8
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    orientation: str = ""
    ct_window: tuple[float, float] | None = None


@dataclass
class DiffusionConfig:
    """The class-conditional DDPM (CDM) and its noise schedule.

    Every timestep ``t`` in the other configs is an index into this schedule.
    """

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 32
    num_head_channels: int = 8
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-4


@dataclass
class ClassifierConfig:
    """A slice classifier: the UNet encoder with global average pooling.

    Used twice: the external classifier on noisy ``x_t`` (for the mean-gradient
    map) and the CAM classifier on clean slices (``max_timestep = 0``), which
    also judges slice presence at inference.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 32
    num_head_channels: int = 8
    max_timestep: int = 999  # noisy inputs at t uniform in 0..max_timestep (0: clean slices)
    augment: bool = False  # random intensity changes and shifts of up to 4 pixels
    flips: bool = True  # random left-right flips; off where the anatomy has sides (the spleen lies on the left)
    sides: str = "whole"  # CAM classifier only: "whole" slices, or the patient's "left" / "right" / "both" halves (`sides`)
    left_labels: tuple[int, ...] = ()  # with sides "both": the mask labels of the left organ (a kidney: 3) ...
    right_labels: tuple[int, ...] = ()  # ... and of the right one (2); each half then gets its own side's slice label
    intensity: str = "narrow"  # with augment: "narrow" or "wide" intensity changes (`batches.INTENSITY`)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-4


@dataclass
class MapConfig:
    """Class activation and mean-gradient maps (DESIGN steps 3 and 4).

    ``cam_method``: ``"layercam"``, ``"gradcam"`` (of the CAM classifier), ``"ame-cam"`` (`AmeCamConfig`) or
    ``"cpf-cte"`` (`CpfCteConfig`).
    """

    cam_method: str = "layercam"
    cam_layers: tuple[int, ...] = (0, 1, 2)
    gradcam_layer: int = 2
    mg_timesteps: tuple[int, ...] = tuple(range(10, 201, 10))
    # Sub-stride shifts of the noisy input, one per timestep over a period x period lattice (0: none). The
    # classifier's strided convolutions make its input gradient periodic (stripes); shifting each timestep's
    # input by another offset and shifting its gradient back averages that pattern out at no extra cost
    # (benchmarks/mg_stripes-*.md). Cards made before the setting existed load with 0 (`ADDED_LATER`).
    mg_shift_period: int = 4
    noise_seed: int = 0


@dataclass
class SaliencyConfig:
    """CDM saliency (Hu et al. 2023; DESIGN step 9), the baseline CLDF builds on.

    Attributes:
        noise_level: Q, the schedule index the slice is noised to (400 of T = 1000 in the paper).
        steps: R, DDIM steps from Q down to the clean image.
        tau: how far the condition embedding moves from the positive class towards the negative one.
        guidance: s, scale of the noisy classifier's guidance towards "absent" (0: none).
        threshold: ``"otsu"`` or a number in [0, 1], turning the map into a mask.
    """

    noise_level: int = 400
    steps: int = 10
    tau: float = 0.95
    guidance: float = 10.0
    threshold: str | float = "otsu"


@dataclass
class SeedConfig:
    """Seed fusion (DESIGN step 5). A threshold is ``"otsu"`` or a number in [0, 1]."""

    cam_threshold: str | float = "otsu"
    mg_threshold: str | float = "otsu"
    background_per_slice: int = 5000
    background_in_body: bool = True


@dataclass
class FeatureConfig:
    """Diffusion features from the frozen CDM (DESIGN step 6)."""

    blocks: tuple[int, ...] = (0, 1)
    timesteps: tuple[int, ...] = (1, 10, 50, 100)
    class_label: int = 1
    noise_seed: int = 0
    max_batch: int = 8  # noised images per forward pass (timesteps x slices); bounds peak memory


@dataclass
class DecoderConfig:
    """The MLP pixel decoder and its supervised contrastive training (step 7)."""

    hidden: tuple[int, ...] = (16, 16, 16, 16)
    temperature: float = 0.1
    lr: float = 1.0
    momentum: float = 0.0
    epochs: int = 5
    batch_slices: int = 4
    pixels_per_class: int = 256
    seed: int = 0


@dataclass
class ClusterConfig:
    """Inference (step 8): slice gating, K-means and the foreground rule.

    Attributes:
        presence_threshold: slices whose presence probability is below it get an empty mask.
        k: K-means clusters per slice (2 in the paper).
        rule: ``"nearest"`` keeps the one cluster nearest the foreground seeds'
            mean embedding (the paper); ``"closer_than_background"`` keeps every
            cluster nearer to it than to the background seeds' mean.
        within_body: cluster only body pixels (air is never foreground).
        seeded_components: keep only connected components that hold a foreground seed.
    """

    presence_threshold: float = 0.5
    k: int = 2
    rule: str = "nearest"
    within_body: bool = False
    seeded_components: bool = False
    seed: int = 0


@dataclass
class PostprocessConfig:
    """After clustering: a mask may be empty, and the volume is one object (chosen on validation).

    Attributes:
        min_similarity: per slice, drop the mask when the cosine similarity of its mean embedding to the
            decoder's foreground prototype is below this (-1: never). K-means always returns a
            "foreground" cluster; this asks whether it looks like the target at all.
        require_seeds: per slice, drop the mask when the slice holds no foreground seed (CAM and MG agree nowhere).
        min_presence: per slice, drop the mask when the gate's presence probability is below this (0: the
            gate alone decides).
        min_component_fraction: in 3D, keep only connected components (26-connected, across slices) holding
            at least this fraction of the largest one's voxels (0: keep all; 1: the largest only).
    """

    min_similarity: float = -1.0
    require_seeds: bool = False
    min_presence: float = 0.0
    min_component_fraction: float = 0.0


@dataclass
class CLDFConfig:
    """Every setting of a bundle, grouped by stage."""

    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    noisy_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # clean slices, augmented; the "wide" intensity range was chosen on the brain bundle's validation patients,
    # most of them from a site nearly absent from its training split (docs/departures.md)
    cam_classifier: ClassifierConfig = field(
        default_factory=lambda: ClassifierConfig(max_timestep=0, steps=1000, augment=True, intensity="wide")
    )
    ame_cam: AmeCamConfig = field(default_factory=AmeCamConfig)
    cpf_cte: CpfCteConfig = field(default_factory=CpfCteConfig)
    maps: MapConfig = field(default_factory=MapConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLDFConfig":
        """Rebuild from ``to_dict`` output; unknown keys are refused by name.

        A setting the mapping lacks takes the default, or, for settings added after bundles were first
        shipped, the value those bundles were made with (`ADDED_LATER`).
        """
        defaults, kwargs = cls(), {}
        for f in dataclasses.fields(cls):
            sub = d.get(f.name, {})
            if not isinstance(sub, dict):
                raise ValueError(f"section '{f.name}' of the config must be a mapping, not {type(sub).__name__}")
            base = getattr(defaults, f.name)
            names = {g.name: g for g in dataclasses.fields(base)}
            unknown = set(sub) - set(names)
            if unknown:
                raise ValueError(f"unknown setting(s) {sorted(unknown)} in section '{f.name}' of the config")
            for k, v in sub.items():
                _check_type(f"{f.name}.{k}", v, names[k])
            older = {k.split(".")[1]: v for k, v in ADDED_LATER.items() if k.split(".")[0] == f.name}
            given = {**older, **{k: _restore(v, names[k]) for k, v in sub.items()}} if sub else {}
            kwargs[f.name] = dataclasses.replace(base, **given)
        config = cls(**kwargs)
        check_config(config)  # ranges, allowed sets and agreements: a hand-edited card stops here
        return config

    def get(self, key: str) -> Any:
        """A setting by its ``section.name`` key."""
        section, name = _split_key(key, self)
        return getattr(getattr(self, section), name)

    def set(self, key: str, value: Any) -> None:
        """Change one setting by its ``section.name`` key, type-checked (JSON lists become tuples where typed so)."""
        section, name = _split_key(key, self)
        f = {g.name: g for g in dataclasses.fields(getattr(self, section))}[name]
        _check_type(key, value, f)
        setattr(getattr(self, section), name, _restore(list(value) if isinstance(value, tuple) else value, f))


# Settings added after bundles were first shipped: a card that lacks one was made with this value.
ADDED_LATER: dict[str, Any] = {
    "maps.mg_shift_period": 0,
    "cam_classifier.intensity": "narrow",
    "noisy_classifier.intensity": "narrow",
}


def _split_key(key: str, config: CLDFConfig) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)) \
            or name not in {f.name for f in dataclasses.fields(getattr(config, section))}:
        raise ValueError(f"'{key}' is not a setting; settings are SECTION.NAME as in bundle.json's 'config' "
                         f"(sections: {', '.join(f.name for f in dataclasses.fields(config))})")
    return section, name


def _check_type(name: str, value: Any, f: dataclasses.Field) -> None:
    """A setting keeps the kind its annotation gives: a number stays a number, a list a list, a switch a switch."""
    words = set(str(f.type).replace("|", " ").replace("[", " ").replace(",", " ").split())
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "tuple": (list, tuple),
             "list": (list, tuple), "None": (type(None),)}
    allowed = tuple(t for w in words & set(kinds) for t in kinds[w])
    if not allowed or "Any" in words:
        return
    is_bool = isinstance(value, bool)
    if not isinstance(value, allowed) or (is_bool and "bool" not in words):
        raise ValueError(f"setting {name} must be {str(f.type)}, not {value!r}")


def _restore(value: Any, f: dataclasses.Field) -> Any:
    """JSON turns tuples into lists: give tuple-typed fields their tuples back."""
    if isinstance(value, list) and "tuple" in str(f.type):
        return tuple(value)
    return value
