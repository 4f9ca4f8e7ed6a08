"""What each setting may be: ranges, allowed sets and the settings that must agree with each other.

`check_config` runs wherever a config is made from outside the code: a bundle's card (sealed or resealed),
``--set`` and the presets. Its message names the setting, its value and what it may be, so a card edited by
hand fails here, not deep inside a network. The allowed sets are the one home of the names the engine's
modules accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..defaults import CLUSTER_RULES, SEGMENTER_CHOICES

SIDES = ("whole", "left", "right", "both")  # cam_classifier.sides (`cldf.sides`)
INTENSITIES = ("narrow", "wide")  # the classifiers' intensity augmentation (`cldf.trainer.batches`)
STEM_STRIDES = (1, 2, 4)  # ame_cam.stem_stride
REFINE_METHODS = ("none", "sam")  # refine.method and student.refine
CAM_METHODS = ("layercam", "gradcam", "ame-cam", "cpf-cte")  # maps.cam_method
SEGMENTERS = tuple(s for s in SEGMENTER_CHOICES if s != "bundle")  # student.segmenter
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")  # MONAI's DDPM schedules
AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    says: str  # what the value may be


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"at least {low}")


def between(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Rule:
    def ok(v) -> bool:
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return Rule(ok, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


def one_of(*values) -> Rule:
    return Rule(lambda v: v in values, f"one of {list(values)}")


def each(rule: Rule, may_be_empty: bool = False) -> Rule:
    return Rule(lambda v: (may_be_empty or len(v) > 0) and all(rule.ok(x) for x in v),
                f"a list{'' if may_be_empty else ' of one or more'}, each {rule.says}")


def threshold_rule() -> Rule:
    return Rule(lambda v: v == "otsu" or (not isinstance(v, str) and 0 <= v <= 1), '"otsu" or a number in [0, 1]')


def _orientation_ok(code: str) -> bool:
    return code == "" or (len(code) == 3 and all(sum(c in axis for c in code) == 1 for axis in AXES))


def _ct_window_ok(v: Any) -> bool:
    return v is None or (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                         and -2000 <= v[0] < v[1] <= 4000)


POSITIVE, COUNT, FRACTION = at_least(1), at_least(0), between(0, 1)
RATE = between(0, 10, open_low=True)
NETWORK = {"channels": each(POSITIVE), "num_res_blocks": POSITIVE, "norm_num_groups": POSITIVE,
           "num_head_channels": POSITIVE}
TRAINING = {"steps": POSITIVE, "batch_size": POSITIVE, "lr": RATE}
CLASSIFIER = {**NETWORK, **TRAINING, "max_timestep": COUNT, "sides": one_of(*SIDES),
              "intensity": one_of(*INTENSITIES), "left_labels": each(POSITIVE, True),
              "right_labels": each(POSITIVE, True)}

RULES: dict[str, dict[str, Rule]] = {
    "data": {"channels": Rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and all(isinstance(c, str) and c
                                                                                       for c in v),
                              "one or more distinct channel names"),
             "resolution": at_least(16), "positive_fraction": between(0, 1, open_high=True),
             "percentiles": Rule(lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 100, "two numbers, 0 <= low < high <= 100"),
             "body_threshold": between(-1, 1),
             "split_fractions": Rule(lambda v: len(v) == 3 and min(v) >= 0 and abs(sum(v) - 1) < 1e-6,
                                     "three fractions (train, validation, test) summing to 1"),
             "orientation": Rule(_orientation_ok, 'an orientation code such as "LPS" or "RAS" (or "")'),
             "ct_window": Rule(_ct_window_ok, "null or two Hounsfield values, -2000 <= low < high <= 4000")},
    "diffusion": {**NETWORK, **TRAINING, "num_train_timesteps": at_least(2), "schedule": one_of(*SCHEDULES),
                  "beta_start": between(0, 1, True, True), "beta_end": between(0, 1, True, True)},
    "noisy_classifier": CLASSIFIER,
    "cam_classifier": CLASSIFIER,
    "ame_cam": {**TRAINING, "widths": each(POSITIVE), "stem_stride": one_of(*STEM_STRIDES),
                "exit_weights": each(at_least(0)), "top_fraction": between(0, 1, open_low=True),
                "hard_negatives": FRACTION, "eval_every": POSITIVE, "aggregator_steps": POSITIVE,
                "aggregator_batch_size": POSITIVE, "aggregator_lr": RATE, "rank_alpha": FRACTION,
                "resolution": COUNT, "map_exits": each(COUNT)},
    "cpf_cte": {**TRAINING, "patch": POSITIVE, "width": POSITIVE, "depth": POSITIVE, "heads": POSITIVE,
                "mlp_ratio": POSITIVE, "attention_radius": COUNT, "top_k": POSITIVE},
    "maps": {"cam_method": one_of(*CAM_METHODS), "cam_layers": each(COUNT), "gradcam_layer": COUNT,
             "mg_timesteps": each(COUNT), "mg_shift_period": COUNT},
    "saliency": {"noise_level": COUNT, "steps": POSITIVE, "tau": FRACTION, "guidance": at_least(0),
                 "threshold": threshold_rule()},
    "seeds": {"cam_threshold": threshold_rule(), "mg_threshold": threshold_rule(), "background_per_slice": COUNT},
    "features": {"blocks": each(COUNT), "timesteps": each(COUNT), "max_batch": POSITIVE},
    "decoder": {"hidden": each(POSITIVE), "temperature": between(0, 100, open_low=True), "lr": RATE,
                "momentum": FRACTION, "epochs": POSITIVE, "batch_slices": POSITIVE, "pixels_per_class": POSITIVE},
    "cluster": {"presence_threshold": FRACTION, "k": at_least(2), "rule": one_of(*CLUSTER_RULES)},
    "postprocess": {"min_similarity": between(-1, 1), "min_presence": FRACTION, "min_component_fraction": FRACTION},
    "refine": {"method": one_of(*REFINE_METHODS), "margin_mm": at_least(0), "max_grow_mm": at_least(0)},
    "student": {"segmenter": one_of(*SEGMENTERS), "resolution": at_least(16), "context": COUNT,
                "channels": each(POSITIVE), **TRAINING, "threshold": between(0, 1, True, True),
                "refine": one_of(*REFINE_METHODS), "min_component_fraction": FRACTION},
}


def check_config(config: Any) -> None:
    """Every setting of a `CLDFConfig` (which calls this: no import back) within its rule, then the settings that
    must agree; a `ValueError` names the first one wrong."""
    for section, rules in RULES.items():
        for name, rule in rules.items():
            value = getattr(getattr(config, section), name)
            if not rule.ok(value):
                raise ValueError(f"setting {section}.{name} is {value!r}; it must be {rule.says}")
    for problem in _disagreements(config):
        raise ValueError(problem)


def _divisible(key: str, value: int, levels: int, what: str) -> str | None:
    step = 2 ** (levels - 1)
    if value % step:
        return f"setting {key} is {value}; {what} halves it {levels - 1} times, so it must be a multiple of {step}"
    return None


def _disagreements(c: Any) -> list[str]:
    """The settings that depend on others (network depths, timesteps, layers, channels)."""
    t_max = c.diffusion.num_train_timesteps - 1
    found = [
        _divisible("data.resolution", c.data.resolution, len(c.diffusion.channels), "the diffusion U-Net"),
        _divisible("student.resolution", c.student.resolution, len(c.student.channels), "the student U-Net"),
        None if c.data.resolution % c.cpf_cte.patch == 0 else
        f"setting cpf_cte.patch is {c.cpf_cte.patch}; it must divide data.resolution ({c.data.resolution})",
        None if c.cpf_cte.width % c.cpf_cte.heads == 0 else
        f"setting cpf_cte.heads is {c.cpf_cte.heads}; it must divide cpf_cte.width ({c.cpf_cte.width})",
        None if c.refine.channel is None or c.refine.channel in c.data.channels else
        f"setting refine.channel is {c.refine.channel!r}; it must be one of data.channels {list(c.data.channels)}",
        None if len(c.ame_cam.exit_weights) == len(c.ame_cam.widths) else
        f"setting ame_cam.exit_weights has {len(c.ame_cam.exit_weights)} values; ame_cam.widths has "
        f"{len(c.ame_cam.widths)} levels, one weight each",
    ]
    for section in ("diffusion", "noisy_classifier", "cam_classifier"):
        net = getattr(c, section)
        if len(net.attention_levels) != len(net.channels):
            found.append(f"setting {section}.attention_levels has {len(net.attention_levels)} values; "
                         f"{section}.channels has {len(net.channels)} levels, one each")
        if any(ch % net.norm_num_groups for ch in net.channels):
            found.append(f"setting {section}.norm_num_groups is {net.norm_num_groups}; it must divide every one "
                         f"of {section}.channels {list(net.channels)}")
    for section in ("noisy_classifier", "cam_classifier"):
        found.append(_divisible("data.resolution", c.data.resolution, len(getattr(c, section).channels),
                                f"the {section.replace('_', ' ')}"))
        if getattr(c, section).max_timestep > t_max:
            found.append(f"setting {section}.max_timestep is {getattr(c, section).max_timestep}; the schedule's "
                         f"timesteps go to {t_max}")
    for key, steps in (("maps.mg_timesteps", c.maps.mg_timesteps), ("features.timesteps", c.features.timesteps)):
        if max(steps, default=0) > t_max:
            found.append(f"setting {key} holds {max(steps)}; the schedule's timesteps go to {t_max}")
    levels = len(c.cam_classifier.channels)
    for key, layers in (("maps.cam_layers", c.maps.cam_layers), ("maps.gradcam_layer", (c.maps.gradcam_layer,))):
        if max(layers) >= levels:
            found.append(f"setting {key} names layer {max(layers)}; the CAM classifier has layers 0..{levels - 1}")
    if max(c.ame_cam.map_exits) >= len(c.ame_cam.widths):
        found.append(f"setting ame_cam.map_exits names exit {max(c.ame_cam.map_exits)}; AME-CAM has exits "
                     f"0..{len(c.ame_cam.widths) - 1}")
    return [f for f in found if f]
