"""The paper preset is real: one optimisation step of each of its networks on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cldf.config import ADDED_LATER, RECIPES, CLDFConfig, apply_overrides, apply_settings, preset
from cldf.decoder import PixelDecoder
from cldf.features import DiffusionFeatures, gather_at_pixels
from cldf.models import NoiseSchedule, SliceClassifier, build_cdm
from cldf.trainer.train_student import CHOSEN_ON_VALIDATION


def _step(net, loss_fn):
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss = loss_fn()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_paper_preset_trains_one_step_of_every_network():
    cfg = preset("paper")
    assert cfg.data.resolution == 256 and cfg.decoder.hidden == (16, 16, 16, 16) and cfg.decoder.lr == 1.0
    torch.manual_seed(0)
    x = torch.rand(1, 2, 256, 256) * 2 - 1
    y = torch.tensor([1])
    sched = NoiseSchedule(cfg.diffusion)
    t = torch.tensor([500])
    cdm = build_cdm(cfg.diffusion, 2)
    noise = torch.randn_like(x)
    _step(cdm, lambda: F.mse_loss(cdm(sched.add_noise(x, noise, t), t, class_labels=y), noise))
    for ccfg in (cfg.noisy_classifier, cfg.cam_classifier):
        clf = SliceClassifier(ccfg, 2)
        _step(clf, lambda: F.cross_entropy(clf(x, t if ccfg.max_timestep else torch.zeros_like(t)), y))
    cdm.eval()
    feats = DiffusionFeatures(cdm, sched, cfg.features)
    block = feats(x)
    pixels = torch.arange(0, 256 * 256, 997)
    data = gather_at_pixels(block, pixels, (256, 256))
    labels = torch.tensor([1, 2] * (len(pixels) // 2) + [1] * (len(pixels) % 2))
    dcfg = cfg.decoder
    dcfg.epochs = 1
    decoder = PixelDecoder(dcfg).fit([data], [labels], progress=False)
    assert len(decoder.loss_history_) == 1


def test_config_round_trips_through_json_and_refuses_unknown_settings():
    import json

    import pytest

    cfg = preset("cpu")
    assert CLDFConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = cfg.to_dict()
    bad["decoder"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="unknown setting"):
        CLDFConfig.from_dict(bad)


def test_every_preset_keeps_its_timesteps_inside_the_schedule():
    from cldf.models import NoiseSchedule

    for name in ("cpu", "paper"):
        cfg = preset(name)
        sched = NoiseSchedule(cfg.diffusion)
        for clf in (cfg.noisy_classifier, cfg.cam_classifier):
            assert 0 <= clf.max_timestep < sched.num_train_timesteps
        sched.check(cfg.maps.mg_timesteps, "mg")
        sched.check(cfg.features.timesteps, "features")


def test_classifier_augmentation_is_seeded_and_stays_in_range():
    from cldf.trainer.batches import StepDraws, augment

    def draw(g):
        return torch.arange(6)

    x = torch.rand(6, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = augment(x, StepDraws(1, 0, draw))
    b = augment(x, StepDraws(1, 0, draw))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    halves = [augment(x[3 * r : 3 * r + 3], StepDraws(1, 0, draw, rank=r, world=2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)  # two processes draw what one does, each keeping its share


@pytest.mark.parametrize("intensity", ["narrow", "wide"])
def test_intensity_augmentation_moves_the_background_as_far_as_its_range(intensity):
    """A scan from another site may have another background level: "wide" moves it by up to 0.5 + 0.4, "narrow" by 0.3."""
    from cldf.trainer.batches import StepDraws, augment

    x = torch.full((64, 1, 16, 16), -1.0)  # air
    x[:, :, 6:10, 6:10] = 0.2  # tissue, never rolled into the corner
    moved = torch.stack([augment(x, StepDraws(s, 0, lambda g: torch.arange(64)), intensity)[:, 0, 0, 0]
                         for s in range(4)]).flatten()
    reach = float((moved + 1).max())
    assert (reach > 0.6) if intensity == "wide" else (0.0 < reach <= 0.3 + 1e-6)
    assert float(moved.min()) >= -1.0


def test_the_cpu_recipe_augments_the_cam_classifier_widely_and_the_paper_does_not():
    from cldf.config import ClassifierConfig

    assert preset("cpu").cam_classifier.intensity == "wide"
    assert ClassifierConfig().intensity == "narrow"  # the noisy classifier is not augmented
    assert preset("paper").cam_classifier.augment is False  # the paper's own recipe


def test_flips_off_keeps_each_slice_on_its_side_and_every_other_draw():
    """Abdominal organs have sides (the spleen lies on the left): ``flips=False`` never mirrors a slice."""
    from cldf.trainer.batches import StepDraws, augment, flip

    x = torch.full((32, 1, 8, 32), -1.0)
    x[..., :16] = 0.5  # a bright left half, far wider than the shifts of up to 4 pixels
    d = lambda: StepDraws(3, 0, lambda g: torch.arange(32))  # noqa: E731
    mirrored = flip(x, d())[:, 0, 0, 0] < 0
    assert 0 < int(mirrored.sum()) < 32  # with flips on, some slices are mirrored
    assert torch.equal(flip(x, d(), enabled=False), x)
    kept = augment(x, d(), flips=False)
    assert bool((kept[..., 4:12].amin((1, 2, 3)) > kept[..., 20:28].amax((1, 2, 3))).all())
    # the coin is still drawn: intensities and shifts are those of the same step with flips on
    on = augment(x, d())
    differs = torch.tensor([not torch.equal(a, b) for a, b in zip(on, kept)])
    assert torch.equal(differs, mirrored)


MODELS = Path(__file__).resolve().parents[3] / "CLDFSegmentation" / "Resources" / "Models"
# sections training fixes and selection never changes (`cldf.config.grids` chooses the others)
TRAINED = ("diffusion", "noisy_classifier", "cam_classifier", "ame_cam", "features", "saliency")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_shipped_bundle_was_trained_with_the_recipe_named_after_it(name):
    card = json.loads((MODELS / name / "bundle.json").read_text())
    shipped, recipe = CLDFConfig.from_dict(card["config"]).to_dict(), preset(name).to_dict()
    for section in TRAINED:
        assert shipped[section] == recipe[section], section
    chosen_by_student = set(CHOSEN_ON_VALIDATION)  # the student's validation (`train_student`)
    for section, chosen in (("data", {"orientation"}), ("maps", {"cam_method"}), ("student", chosen_by_student)):
        assert {k: v for k, v in shipped[section].items() if k not in chosen} == \
               {k: v for k, v in recipe[section].items() if k not in chosen}, section


def test_selection_chooses_no_setting_that_training_fixes():
    from cldf.config.grids import CLUSTER_GRID, DECODER_GRID, POSTPROCESS_GRID

    for key in [*CLUSTER_GRID, *DECODER_GRID, *POSTPROCESS_GRID]:
        assert key.split(".")[0] not in TRAINED, key


def test_the_defaults_are_the_cpu_recipe_and_old_cards_keep_what_they_were_made_with():
    assert CLDFConfig() == preset("cpu")
    old = CLDFConfig().to_dict()
    del old["maps"]["mg_shift_period"], old["cam_classifier"]["intensity"]
    loaded = CLDFConfig.from_dict(old)
    assert loaded.maps.mg_shift_period == ADDED_LATER["maps.mg_shift_period"] == 0
    assert loaded.cam_classifier.intensity == "narrow"
    assert loaded.cam_classifier.max_timestep == 0  # the section's own default, not the classifier class's


@pytest.mark.parametrize("item, message", [
    ("diffusion.steps=many", "setting diffusion.steps must be int, not 'many'"),
    ("cluster.within_body=1", "setting cluster.within_body must be bool, not 1"),
    ("decoder.learning_rate=0.1", "'decoder.learning_rate' is not a setting"),
    ("steps=3", "--set takes SECTION.NAME=VALUE"),
])
def test_overrides_are_type_checked_when_given(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(preset("cpu"), [item])


def test_overrides_and_selection_rows_change_a_copy_through_one_setter():
    base = preset("cpu")
    changed = apply_overrides(base, ["maps.mg_timesteps=[100, 200]", "seeds.cam_threshold=0.5"])
    assert changed.maps.mg_timesteps == (100, 200) and changed.seeds.cam_threshold == 0.5
    assert base == preset("cpu")
    assert apply_settings(base, {"seeds.cam_threshold": 0.5}) == apply_overrides(base, ["seeds.cam_threshold=0.5"])
