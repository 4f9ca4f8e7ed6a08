"""CPF-CTE's training stage on real slices: `cldf cpf-cte` on a copy of a tiny bundle, what the bundle then holds
and gives (`cldf evaluate` rows, the segmenter, selection's candidates), resumption, refusals, and `cldf train`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import cldf.trainer.train_cpf_cte as train_cpf_cte
from cldf.bundle import BundleError, load_bundle, read_card
from cldf.cli import main
from cldf.config import CLDFConfig
from cldf.cpf_cte import CpfCte
from cldf.manifest import load_manifest
from cldf.segment import Segmenter
from cldf.trainer.run_folder import check_run, record_run, run_fingerprint
from cldf.trainer.select import cam_sources
from cldf.trainer.slice_set import load_slice_set
from cldf.trainer.stages import BUDGET_SHARES, TrainRequest
from cldf.trainer.train import train
from cldf.variants import bundle_variants
from conftest import tiny_config

TINY = ["--set", "cpf_cte.steps=8", "--set", "cpf_cte.batch_size=4", "--set", "cpf_cte.width=16",
        "--set", "cpf_cte.depth=1", "--set", "cpf_cte.heads=2"]


def _add(bundle: Path, manifest: Path, *extra: str) -> int:
    return main(["-q", "cpf-cte", "--bundle", str(bundle), "--data", str(manifest), "--device", "cpu", *TINY, *extra])


@pytest.fixture(scope="module")
def cpf_bundle(tiny_bundle: Path, small_manifest: Path, tmp_path_factory) -> Path:
    """A copy of the tiny bundle with CPF-CTE added by the command, as a user adds it."""
    copy = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("bundles") / "tiny-cpf"))
    assert _add(copy, small_manifest) == 0
    return copy


def test_the_command_adds_a_verified_network_its_decoders_and_a_card_entry(cpf_bundle, tiny_bundle):
    card = read_card(cpf_bundle)
    assert "cpf_cte.safetensors" in card["files"]
    entry = card["cpf_cte"]
    assert entry["command"].startswith("cldf -q cpf-cte --bundle") and "cpf_cte.steps=8" in entry["command"]
    assert entry["steps"] == 8 and entry["wall_clock_s"]["total"] >= entry["wall_clock_s"]["classifier"] > 0
    assert card["config"]["cpf_cte"]["enabled"] and card["config"]["cpf_cte"]["width"] == 16
    b = load_bundle(cpf_bundle)
    assert isinstance(b.cpf_cte, CpfCte) and not any(p.requires_grad for p in b.cpf_cte.parameters())
    assert "cpf-cte-seeds" in bundle_variants(b) and sorted(b.decoders["cpf-cte-seeds"]) == sorted(b.decoders["cdm"])
    original = load_bundle(tiny_bundle)
    assert {v: sorted(s) for v, s in original.decoders.items()} == \
        {v: sorted(s) for v, s in b.decoders.items() if v != "cpf-cte-seeds"}
    for k, v in original.cdm.state_dict().items():  # the rest of the bundle is untouched
        assert torch.equal(v, b.cdm.state_dict()[k])
    assert not (cpf_bundle.parent / "tiny-cpf.cpf-cte-checkpoints").exists()


def test_evaluate_gives_the_cpf_cte_rows_with_the_pointing_game(cpf_bundle, small_manifest, tmp_path):
    out = tmp_path / "report.json"
    assert main(["-q", "evaluate", "--bundle", str(cpf_bundle), "--data", str(small_manifest), "--split", "test",
                 "--device", "cpu", "--methods", "cpf-cte,cpf-cte+cl", "--out", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["methods"]
    assert list(rows) == ["cpf-cte", "cpf-cte+cl"]
    assert 0.0 <= rows["cpf-cte"]["pointing"] <= 1.0 and rows["cpf-cte"]["n_slices"] > 0
    assert 0.0 <= rows["cpf-cte+cl"]["dice"] <= 1.0 and "by_seed" in rows["cpf-cte+cl"]


def test_a_bundle_without_cpf_cte_says_how_to_add_it(tiny_bundle, small_manifest, tmp_path, capsys):
    assert main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--device", "cpu",
                 "--methods", "cpf-cte", "--out", str(tmp_path / "r.json")]) == 2
    assert "'cpf-cte': it lacks a CPF-CTE network" in capsys.readouterr().err
    assert "cpf-cte" not in cam_sources(load_bundle(tiny_bundle))


def test_cpf_cte_is_a_cam_source_with_its_own_presence_and_a_selection_candidate(cpf_bundle):
    b = load_bundle(cpf_bundle)
    assert cam_sources(b)[1:] == ["cpf-cte"]
    b.config.maps.cam_method = "cpf-cte"
    seg = Segmenter(b, "cpu", batch_size=4)
    x = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    maps = seg.slice_maps(x, torch.arange(3), gate=False)
    assert maps.cam.shape == (3, 32, 32) and torch.allclose(maps.cam.flatten(1).amax(1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(maps.presence, b.cpf_cte(x).scores[:, 1])
    torch.testing.assert_close(seg.presence(x), maps.presence)


def test_a_tampered_cpf_cte_file_is_refused(cpf_bundle, tmp_path):
    copy = shutil.copytree(cpf_bundle, tmp_path / "b")
    data = bytearray((copy / "cpf_cte.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "cpf_cte.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cpf_cte.safetensors does not match the sha256"):
        load_bundle(copy)


@pytest.mark.parametrize("setting,message", [
    ("data.resolution=64", "changes cpf_cte settings only (--set cpf_cte.KEY=VALUE), not data.resolution"),
    ("cpf_cte.patch=5", "setting cpf_cte.patch is 5; it must divide data.resolution (32)"),
    ("cpf_cte.top_k=oops", "setting cpf_cte.top_k must be int"),
])
def test_the_command_refuses_other_settings_before_any_work(tiny_bundle, small_manifest, tmp_path, capsys,
                                                            setting, message):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    before = (copy / "bundle.json").read_bytes()
    assert _add(copy, small_manifest, "--set", setting) == 2
    assert message in capsys.readouterr().err
    assert (copy / "bundle.json").read_bytes() == before and not (tmp_path / "b.cpf-cte-checkpoints").exists()


def test_a_bundle_that_has_cpf_cte_is_trained_again_only_when_asked(cpf_bundle, small_manifest, capsys):
    assert _add(cpf_bundle, small_manifest) == 2
    assert "already has a CPF-CTE network; pass --replace" in capsys.readouterr().err


@pytest.fixture(scope="module")
def train_set(small_manifest: Path):
    manifest = load_manifest(small_manifest)
    ids = [c.id for c in manifest.cases if c.split == "train"]
    return load_slice_set(manifest, ids, ["FLAIR", "T1"], 32, (0.5, 99.5), [1], 0.01)


def _fit(folder: Path, data, manifest: Path):
    cfg = CLDFConfig()
    cfg.cpf_cte.steps, cfg.cpf_cte.batch_size, cfg.cpf_cte.width, cfg.cpf_cte.heads = 6, 4, 16, 2
    req = TrainRequest(manifest=manifest, out=folder, config=cfg, checkpoint_every_s=0.0, progress=False)
    net, card = train_cpf_cte.fit_cpf_cte(cfg, data, None, 5, torch.device("cpu"), folder, req)
    return net.state_dict(), card


def test_an_interrupted_training_resumes_to_the_same_weights(train_set, small_manifest, tmp_path, monkeypatch):
    expected, card = _fit(tmp_path / "whole", train_set, small_manifest)
    original, calls = train_cpf_cte.cpf_cte_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(train_cpf_cte, "cpf_cte_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "resumed", train_set, small_manifest)
    monkeypatch.setattr(train_cpf_cte, "cpf_cte_loss", original)
    resumed, resumed_card = _fit(tmp_path / "resumed", train_set, small_manifest)
    assert resumed_card["steps"] == card["steps"] == 6
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=0, atol=0, msg=k)


def test_the_budget_gives_cpf_cte_a_share_and_the_shares_sum_to_one():
    assert BUDGET_SHARES["cpf_cte"] > 0 and sum(BUDGET_SHARES.values()) == pytest.approx(1.0)


def test_a_run_recorded_before_the_cpf_cte_settings_resumes_unless_they_changed(small_manifest, tmp_path):
    req = TrainRequest(manifest=small_manifest, out=tmp_path / "out", config=tiny_config())
    splits = {"train": ["a"], "val": [], "test": []}
    old = run_fingerprint(req)
    del old["config"]["cpf_cte"]
    record_run(tmp_path / "ck", old, splits)
    check_run(tmp_path / "ck", run_fingerprint(req), splits)  # the defaults: what that run trained with
    req.config.cpf_cte.enabled = True
    with pytest.raises(ValueError, match="setting cpf_cte.enabled: checkpoints false, this command true"):
        check_run(tmp_path / "ck", run_fingerprint(req), splits)


def test_cldf_train_trains_cpf_cte_when_enabled(small_manifest, tmp_path):
    cfg = tiny_config()
    cfg.student.enabled = False
    cfg.cpf_cte.enabled, cfg.cpf_cte.steps, cfg.cpf_cte.batch_size, cfg.cpf_cte.width = True, 4, 4, 16
    cfg.cpf_cte.depth, cfg.cpf_cte.heads = 1, 2
    out = train(TrainRequest(manifest=small_manifest, out=tmp_path / "b", config=cfg, target_labels=[1],
                             decoder_seeds=(0,), select=False, progress=False))
    card = read_card(out)
    assert "cpf_cte.safetensors" in card["files"] and card["training"]["cpf_cte"]["steps"] == 4
    clock = card["training"]["wall_clock_s"]  # four tiny steps can round to 0.0 s
    assert clock["cpf_cte"] == card["training"]["cpf_cte"]["wall_clock_s"]["classifier"] >= 0
    b = load_bundle(out)
    assert b.cpf_cte is not None and "cpf-cte-seeds" in b.decoders
