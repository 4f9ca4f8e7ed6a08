"""`apply_settings`: a row of the selection table (``section.name`` -> value) applied to a bundle's config."""

from __future__ import annotations

import pytest

from cldf.config import CLDFConfig, apply_settings, preset

#: A winning row as settings selection writes it: every section it may change, values of the right kinds.
ROW = {
    "maps.cam_method": "ame-cam",
    "cluster.presence_threshold": 0.2,
    "seeds.cam_threshold": 0.5,
    "decoder.lr": 0.1,
    "decoder.momentum": 0.9,
    "cluster.k": 3,
    "cluster.within_body": True,
    "cluster.rule": "closer_than_background",
    "cluster.seeded_components": True,
}


def flat(config: CLDFConfig) -> dict:
    return {f"{section}.{name}": value for section, values in config.to_dict().items() for name, value in values.items()}


def test_a_row_changes_exactly_its_settings():
    base = preset("cpu")
    before = flat(base)
    assert all(before[key] != value for key, value in ROW.items()), "the row must change every setting it names"
    after = flat(apply_settings(base, ROW))
    assert {key for key in after if after[key] != before[key]} == set(ROW)
    assert {key: after[key] for key in ROW} == ROW


def test_the_config_given_is_left_as_it_was():
    base = preset("cpu")
    before = flat(base)
    changed = apply_settings(base, ROW)
    assert flat(base) == before
    changed.cluster.k = 5  # the copy shares no section with the original
    assert base.cluster.k == before["cluster.k"]


def test_an_empty_row_gives_an_equal_copy():
    base = preset("cpu")
    same = apply_settings(base, {})
    assert same is not base and same.cluster is not base.cluster and flat(same) == flat(base)


def test_the_chosen_settings_survive_the_bundle_card():
    """What `bundle.json` keeps (``to_dict``) reads back as the same config."""
    changed = apply_settings(preset("cpu"), ROW)
    again = CLDFConfig.from_dict(changed.to_dict())
    assert flat(again) == flat(changed)
    assert again.cluster.k == 3 and again.cluster.rule == "closer_than_background" and again.maps.cam_method == "ame-cam"


@pytest.mark.parametrize("key", sorted(ROW))
def test_each_setting_alone(key):
    changed = flat(apply_settings(preset("cpu"), {key: ROW[key]}))
    base = flat(preset("cpu"))
    assert changed[key] == ROW[key]
    assert {k: v for k, v in changed.items() if k != key} == {k: v for k, v in base.items() if k != key}
