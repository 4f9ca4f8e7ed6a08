"""AME-CAM: multi-exit classifier, aggregator, map contract, a real tiny training run, resumption, old bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cldf.trainer.train_ame as train_ame
from cldf.ame_cam import (
    AmeCam,
    AttentionAggregator,
    MultiExitClassifier,
    multi_exit_loss,
    region_contrastive_loss,
    upsample,
)
from cldf.bundle import BundleError, load_bundle, read_card, write_card
from cldf.config import AmeCamConfig, CLDFConfig
from cldf.evaluation.evaluate import available_methods, evaluate
from cldf.manifest import load_manifest
from cldf.maps import AmeCamMap, build_cam
from cldf.segment import Segmenter
from cldf.trainer.select import select_settings
from cldf.trainer.slice_set import load_slice_set
from cldf.trainer.train import TrainRequest, train
from cldf.variants import bundle_variants
from conftest import BRAIN_BUNDLE, tiny_config


@pytest.fixture(scope="module")
def x():
    return torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("stem_stride,sizes", [(1, [32, 16, 8, 4]), (2, [16, 8, 4, 2]), (4, [8, 4, 2, 1])])
def test_multi_exit_classifier_gives_one_logit_and_one_map_per_stage(x, stem_stride, sizes):
    torch.manual_seed(0)
    net = MultiExitClassifier(AmeCamConfig(widths=(8, 8, 16, 16), stem_stride=stem_stride), in_channels=2)
    logits, maps = net(x)
    assert logits.shape == (4, 4)
    assert [tuple(m.shape) for m in maps] == [(4, 1, s, s) for s in sizes]
    # each exit's logit is the global average of its map
    torch.testing.assert_close(logits, torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))


def test_top_fraction_pools_the_highest_pixels_and_one_means_the_global_average():
    from cldf.ame_cam import pool

    m = torch.arange(16.0).view(1, 1, 4, 4)
    assert float(pool(m, 1.0)) == 7.5 and float(pool(m, 1 / 16)) == 15.0 and float(pool(m, 0.25)) == 13.5
    with pytest.raises(ValueError, match=r"top_fraction must be in \(0, 1\], not 0"):
        MultiExitClassifier(AmeCamConfig(top_fraction=0.0), 1)


def test_multi_exit_loss_is_the_weighted_sum_of_the_exits_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.0, -4.0]])
    labels = torch.tensor([1, 0])
    per_exit = [F.binary_cross_entropy_with_logits(logits[:, k], labels.float()) for k in range(4)]
    expected = 0.25 * per_exit[0] + 0.5 * per_exit[1] + 0.75 * per_exit[2] + 1.0 * per_exit[3]
    torch.testing.assert_close(multi_exit_loss(logits, labels, (0.25, 0.5, 0.75, 1.0)), expected)
    # a deeper exit's mistake costs more than the same mistake at a shallower exit
    wrong_first = torch.tensor([[-3.0, 3.0, 3.0, 3.0]])
    wrong_last = torch.tensor([[3.0, 3.0, 3.0, -3.0]])
    y = torch.tensor([1])
    assert multi_exit_loss(wrong_last, y, (0.25, 0.5, 0.75, 1.0)) > multi_exit_loss(wrong_first, y, (0.25, 0.5, 0.75, 1.0))


@pytest.mark.parametrize("field,value,message", [("widths", (8, 8, 8), "ame_cam.widths must be 4"),
                                                 ("stem_stride", 3, "ame_cam.stem_stride must be one of"),
                                                 ("exit_weights", (1.0, 1.0), "ame_cam.exit_weights must be 4"),
                                                 ("map_exits", (1, 4), "ame_cam.map_exits must be distinct exits")])
def test_unbuildable_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiExitClassifier(AmeCamConfig(**{field: value}), 1)


def test_aggregator_weights_sum_to_one_at_every_pixel_and_fuse_between_the_exit_maps(x):
    torch.manual_seed(0)
    maps = torch.randn(4, 4, 32, 32)
    fused, weights = AttentionAggregator()(x, maps)
    assert weights.shape == (4, 4, 32, 32) and fused.shape == (4, 32, 32)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4, 32, 32))
    assert torch.all(fused >= maps.min(dim=1).values - 1e-5) and torch.all(fused <= maps.max(dim=1).values + 1e-5)


def test_ame_cam_map_is_in_unit_range_per_slice_with_a_presence_per_slice(x):
    torch.manual_seed(0)
    cam = build_cam("ame-cam", None, [0], 0, AmeCam(AmeCamConfig(widths=(8, 8, 16, 16)), 2))
    assert isinstance(cam, AmeCamMap)
    maps, presence = cam(x)
    assert maps.shape == (4, 32, 32) and presence.shape == (4,)
    assert torch.allclose(maps.flatten(1).min(1).values, torch.zeros(4))
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(4))
    assert torch.all((presence > 0) & (presence < 1))


def test_the_inference_map_averages_the_chosen_exits_with_the_fused_map(x):
    torch.manual_seed(0)
    net = AmeCam(AmeCamConfig(widths=(8, 8, 16, 16), map_exits=(1, 2)), 2).eval()
    with torch.no_grad():
        _, maps = net.classifier(x)
        a = upsample(maps, (32, 32))
        fused, _ = net.aggregator(x, a)
        expected = (a[:, 1] + a[:, 2] + fused) / 3
        cam, _ = net(x)
    lo, hi = expected.flatten(1).min(1).values, expected.flatten(1).max(1).values
    torch.testing.assert_close(cam, (expected - lo[:, None, None]) / (hi - lo)[:, None, None], atol=1e-5, rtol=1e-4)


def test_build_cam_refuses_ame_cam_without_its_networks():
    with pytest.raises(ValueError, match="no ame_cam.safetensors"):
        build_cam("ame-cam", None, [0], 0)
    with pytest.raises(ValueError, match="unknown CAM method 'no-such-cam'"):
        build_cam("no-such-cam", None, [0], 0)


def test_region_contrastive_loss_prefers_a_map_on_the_shared_object_to_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.full((6, 1, 16, 16), -0.4) + 0.1 * torch.rand(6, 1, 16, 16, generator=g)
    x[:, :, 4:9, 5:10] = 0.8  # the same bright object in every slice
    on_object = torch.zeros(6, 16, 16)
    on_object[:, 4:9, 5:10] = 1.0
    random = torch.rand(6, 16, 16, generator=g)
    assert region_contrastive_loss(x, on_object) < region_contrastive_loss(x, random)
    with pytest.raises(ValueError, match="at least 2, not 1"):
        region_contrastive_loss(x[:1], on_object[:1])


def test_hard_negatives_are_weighted_by_their_distance_to_the_patients_positive_slices():
    from cldf.trainer.slice_set import SliceSet
    from cldf.trainer.train_ame import near_positive_weights

    labels = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])  # patient 0: slices 0-4, patient 1 (no positive): 5-7
    data = SliceSet(torch.zeros(8, 1, 4, 4), labels, torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]), ["a", "b"])
    w = near_positive_weights(data, scale=1.0)
    expected = torch.exp(-torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(w[:5], expected)
    assert torch.equal(w[5:], torch.zeros(3))


def test_exit_maps_upsample_to_the_slice_size(x):
    maps = [torch.rand(4, 1, s, s) for s in (16, 8, 4, 2)]
    assert upsample(maps, (32, 32)).shape == (4, 4, 32, 32)


# --------------------------------------------------------------------------- real training
def ame_config(resolution: int = 48):
    cfg = tiny_config()
    cfg.maps.cam_method = "ame-cam"
    cfg.ame_cam.widths = (8, 8, 16, 16)
    cfg.ame_cam.steps, cfg.ame_cam.eval_every, cfg.ame_cam.batch_size = 6, 3, 4
    cfg.ame_cam.hard_negatives, cfg.ame_cam.top_fraction = 0.5, 0.1
    cfg.ame_cam.aggregator_steps, cfg.ame_cam.aggregator_batch_size = 3, 4
    cfg.ame_cam.resolution = resolution  # differs from the bundle's 32: slices cut at 48 from the volume
    return cfg


@pytest.fixture(scope="module")
def ame_bundle(small_manifest: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-ame"
    return train(TrainRequest(manifest=small_manifest, out=out, config=ame_config(), target_labels=[1],
                              decoder_seeds=(0,), name="tiny-ame", target_name="tumour", select=False, progress=False))


def test_a_tiny_real_run_writes_a_verified_ame_cam_file_with_its_card(ame_bundle):
    card = read_card(ame_bundle)
    assert "ame_cam.safetensors" in card["files"]
    ame = card["training"]["ame_cam"]
    assert ame["resolution"] == 48 and [s for s, _ in ame["auc_history"]] == [3, 6]
    assert ame["chosen_step"] in (3, 6) and ame["checkpoint"].startswith("best AUC")
    assert card["training"]["wall_clock_s"]["ame_cam"] > 0
    b = load_bundle(ame_bundle)
    assert isinstance(b.ame_cam, AmeCam) and not any(p.requires_grad for p in b.ame_cam.parameters())
    from safetensors.torch import load_file

    stored = load_file(str(ame_bundle / "ame_cam.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}  # half the file
    assert all(p.dtype == torch.float32 for p in b.ame_cam.parameters())  # used in float32


def test_a_bundle_with_ame_cam_segments_a_real_volume(ame_bundle, case_paths):
    seg = Segmenter(load_bundle(ame_bundle), "cpu", batch_size=8)
    assert seg.cam_resolution == 48
    job = seg.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]})
    assert job.cam_slices.shape[-1] == 48 and job.slices.shape[-1] == 32
    result = job.run(progress=False)
    assert result.cam.shape == result.mask.shape
    assert result.cam.min() >= 0.0 and result.cam.max() <= 1.0 and result.cam.max() > 0.0
    assert ((result.presence > 0) & (result.presence < 1)).all()


def test_slice_maps_without_slices_at_ame_resolution_still_work_and_say_so(ame_bundle, caplog):
    seg = Segmenter(load_bundle(ame_bundle), "cpu")
    x = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with caplog.at_level("WARNING"):
        maps = seg.slice_maps(x, torch.arange(3), gate=False)
    assert maps.cam.shape == (3, 32, 32) and "resizing the bundle's slices" in caplog.text
    assert torch.allclose(maps.cam.flatten(1).amax(1), torch.ones(3))
    given = seg.slice_maps(x, torch.arange(3), gate=False,
                           x_cam=torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False))
    torch.testing.assert_close(given.cam, maps.cam)


def test_a_tampered_ame_cam_file_is_refused(ame_bundle, tmp_path):
    copy = shutil.copytree(ame_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".checkpoints"))
    data = bytearray((copy / "ame_cam.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "ame_cam.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="ame_cam.safetensors does not match the sha256"):
        load_bundle(copy)
    (copy / "ame_cam.safetensors").unlink()
    with pytest.raises(BundleError, match="bundle file missing: .*ame_cam.safetensors"):
        load_bundle(copy)


@pytest.fixture
def without_ame(tmp_path) -> Path:
    """The shipped brain bundle as one made before AME-CAM: no AME-CAM file, default AME-CAM settings, resealed."""
    copy = tmp_path / "brain"
    shutil.copytree(BRAIN_BUNDLE, copy)
    (copy / "ame_cam.safetensors").unlink()
    card = json.loads((copy / "bundle.json").read_text(encoding="utf-8"))
    del card["files"]["ame_cam.safetensors"]
    card["config"]["ame_cam"] = CLDFConfig().to_dict()["ame_cam"]
    write_card(copy / "bundle.json", card)
    return copy


def test_a_bundle_without_the_ame_file_still_loads_and_refuses_ame_cam_clearly(without_ame):
    card = json.loads((without_ame / "bundle.json").read_text(encoding="utf-8"))
    assert "ame_cam.safetensors" not in card["files"]
    b = load_bundle(without_ame)
    assert b.ame_cam is None and b.config.ame_cam == AmeCamConfig()
    b.config.maps.cam_method = "ame-cam"
    with pytest.raises(ValueError, match="no ame_cam.safetensors"):
        Segmenter(b, "cpu")


@pytest.fixture(scope="module")
def sets(small_manifest: Path):
    manifest = load_manifest(small_manifest)
    train_ids = [c.id for c in manifest.cases if c.split == "train"]
    val_ids = [c.id for c in manifest.cases if c.split == "val"]
    return tuple(load_slice_set(manifest, ids, ["FLAIR", "T1"], 32, (0.5, 99.5), [1], 0.01) for ids in (train_ids, val_ids))


def _run(tmp: Path, sets, manifest: Path):
    cfg = ame_config(resolution=0)
    req = TrainRequest(manifest=manifest, out=tmp, config=cfg, checkpoint_every_s=0.0, progress=False)
    net, card = train_ame.fit_ame_cam(cfg, sets[0], sets[1], 7, torch.device("cpu"), tmp, req)
    return net.state_dict(), card


@pytest.mark.parametrize("loss_name,stop_at", [("multi_exit_loss", 5), ("region_contrastive_loss", 2)])
def test_an_interrupted_stage_resumes_to_the_same_weights(sets, small_manifest, tmp_path, monkeypatch, loss_name, stop_at):
    expected, card = _run(tmp_path / "uninterrupted", sets, small_manifest)
    original = getattr(train_ame, loss_name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_ame, loss_name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", sets, small_manifest)
    monkeypatch.setattr(train_ame, loss_name, original)
    resumed, resumed_card = _run(tmp_path / "resumed", sets, small_manifest)
    assert resumed_card["auc_history"] == card["auc_history"]
    assert expected.keys() == resumed.keys()
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=0, atol=0, msg=k)


def test_the_paper_preset_is_resnet18_sized_and_trains_one_step_at_256():
    from cldf.config import preset

    cfg = preset("paper").ame_cam
    assert cfg.widths == (64, 128, 256, 512) and cfg.stem_stride == 4
    torch.manual_seed(0)
    net = AmeCam(cfg, 2)
    encoder = sum(p.numel() for p in net.classifier.encoder.parameters())
    assert 11.0e6 < encoder < 11.5e6  # ResNet-18's convolutions (11.2 M without its fc layer)
    x, y = torch.rand(2, 2, 256, 256) * 2 - 1, torch.tensor([1, 0])
    logits, maps = net.classifier(x)
    assert [m.shape[-1] for m in maps] == [64, 32, 16, 8]
    before = net.classifier.exits[3].weight.detach().clone()
    opt = torch.optim.AdamW(net.classifier.parameters(), lr=1e-4)
    multi_exit_loss(logits, y, cfg.exit_weights).backward()
    opt.step()
    assert not torch.equal(before, net.classifier.exits[3].weight)


def test_ame_cam_decoders_are_trained_beside_layercams_but_never_twice_the_cldf_recipe(ame_bundle):
    b = load_bundle(ame_bundle)
    # CLDF itself takes AME-CAM + MG seeds here: no separate "ame-cam-fused" decoders
    assert set(b.decoders) == {"cdm", "untrained", "cam-seeds", "mg-seeds", "encoder", "ame-cam-seeds"}
    b.config.maps.cam_method = "layercam"
    assert "ame-cam-fused" in bundle_variants(b) and "ame-cam-seeds" in bundle_variants(b)


def test_selection_weighs_each_cam_source_with_its_own_gate(ame_bundle, sets, small_manifest):
    b = load_bundle(ame_bundle)
    b.config.maps.cam_method = "layercam"
    manifest = load_manifest(small_manifest)
    val_ids = [c.id for c in manifest.cases if c.split == "val"]
    config, rows, gates = select_settings(b, sets[0], manifest, val_ids, [1], (0,), "cpu", progress=False)
    assert {r["settings"]["maps.cam_method"] for r in rows} == {"layercam", "ame-cam"}
    assert len(rows) == 2 * 2 * 2 * 3 * 2 * 2 * 2
    assert [r["val_dice"] for r in rows] == sorted((r["val_dice"] for r in rows), reverse=True)
    assert config.maps.cam_method == rows[0]["settings"]["maps.cam_method"]
    for method in ("layercam", "ame-cam"):
        table = [g for g in gates if g["cam_method"] == method]
        best = max(table, key=lambda g: g["balanced_accuracy"])["presence_threshold"]
        assert {r["settings"]["cluster.presence_threshold"] for r in rows if r["settings"]["maps.cam_method"] == method} == {best}


def test_evaluate_gives_the_ame_cam_rows(ame_bundle, small_manifest, without_ame):
    b = load_bundle(ame_bundle)
    manifest = load_manifest(small_manifest)
    test_ids = [c.id for c in manifest.cases if c.split == "test"]
    assert "ame-cam+mg+cl" not in available_methods(b)  # that is CLDF itself here
    methods = ("ame-cam", "layercam", "ame-cam+cl", "layercam+cl", "cldf")
    report = evaluate(b, manifest, test_ids, [1], "cpu", methods=methods, progress=False)
    assert list(report["methods"]) == list(methods)
    assert 0.0 <= report["methods"]["ame-cam"]["pointing"] <= 1.0
    assert report["methods"]["ame-cam"]["dice"] != report["methods"]["layercam"]["dice"]
    assert report["methods"]["ame-cam+cl"]["dice"] != report["methods"]["layercam+cl"]["dice"]
    with pytest.raises(ValueError, match="'ame-cam': it lacks AME-CAM networks"):
        evaluate(load_bundle(without_ame), manifest, test_ids, [1], "cpu", methods=("ame-cam",), progress=False)
