"""Bundles: round trip, hashes verified, clear refusals, no pickle."""

from __future__ import annotations

import json
import shutil

import pytest

from cldf.bundle import BundleError, load_bundle, read_card


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".checkpoints"))


def test_card_lists_channels_hashes_split_and_settings(tiny_bundle):
    card = read_card(tiny_bundle)
    assert card["channels"] == ["FLAIR", "T1"]
    assert set(card["files"]) == {"cdm.safetensors", "noisy_classifier.safetensors", "cam_classifier.safetensors",
                                  "decoders.safetensors", "student.safetensors"}
    assert all(len(h) == 64 for h in card["files"].values())
    assert card["training"]["split"]["test"] and card["config"]["diffusion"]["num_train_timesteps"] == 1000
    assert card["training"]["wall_clock_s"]["total"] > 0 and card["training"]["device"].startswith("cpu")


def test_departures_are_chosen_on_validation_and_recorded(tiny_bundle):
    card = read_card(tiny_bundle)
    sel = card["selection"]
    assert sel["validation_cases"] == card["training"]["split"]["val"]
    assert len(sel["table"]) == 2 * 2 * 3 * 2 * 2 * 2
    dices = [row["val_dice"] for row in sel["table"]]
    assert dices == sorted(dices, reverse=True) and sel["chosen"] == sel["table"][0]["settings"]
    for key, value in sel["chosen"].items():
        section, name = key.split(".")
        assert card["config"][section][name] == value


def test_loads_every_network_and_decoder_seed(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert sorted(b.decoders) == ["cam-seeds", "cdm", "encoder", "mg-seeds", "untrained"]
    assert all(sorted(by_seed) == [0, 1] for by_seed in b.decoders.values())
    assert b.id.startswith("tiny@")


def test_refuses_a_tampered_weight_file(copy):
    data = bytearray((copy / "cam_classifier.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "cam_classifier.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cam_classifier.safetensors does not match the sha256"):
        load_bundle(copy)


def test_refuses_a_missing_file(copy):
    (copy / "decoders.safetensors").unlink()
    with pytest.raises(BundleError, match="bundle file missing: .*decoders.safetensors"):
        load_bundle(copy)


def test_refuses_an_unknown_format_version(copy):
    card = json.loads((copy / "bundle.json").read_text(encoding="utf-8"))
    card["format_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="format version 99; this cldf reads version 2"):
        load_bundle(copy)


def test_refuses_a_corrupted_card(copy):
    (copy / "bundle.json").write_text('{"format_version": 2, "files": ')
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(copy)


def test_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "nowhere")


def test_no_pickle_anywhere_in_the_package():
    import re
    from pathlib import Path

    import cldf

    for path in Path(cldf.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text, path
        # the one torch.load, of LiteMedSAM's pinned weights (cldf.refine), runs no pickled code
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (path, call)
