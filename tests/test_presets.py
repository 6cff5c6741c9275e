"""Presets are data: every shipped preset resolves to registered methods and schedulers with valid options."""

from __future__ import annotations

import pytest

import dit_accel
from dit_accel.caching import make_cache_config
from dit_accel.presets import get_preset, preset_names


def test_the_five_presets_exist_in_order() -> None:
    assert preset_names() == ["dense", "quality", "balanced", "fast", "turbo"]


@pytest.mark.parametrize("name", preset_names())
def test_preset_names_registered_methods_with_valid_options(name: str) -> None:
    preset = get_preset(name)
    assert preset.tag == f"{name}@{preset.version}"
    if preset.attention is not None:
        method = dit_accel.get_method(preset.attention, **dict(preset.attention_config))
        assert method.name == preset.attention
    if preset.cache is not None:
        make_cache_config(preset.cache, **dict(preset.cache_config))


def test_presets_are_read_only_and_unknown_names_list_valid_ones() -> None:
    with pytest.raises(TypeError):
        get_preset("balanced").attention_config["quality"] = 0.0  # type: ignore[index]
    with pytest.raises(ValueError, match=r"unknown preset 'warp'; valid presets: \['dense', 'quality'"):
        get_preset("warp")


def test_a_preset_tag_pins_the_shipped_version() -> None:
    shipped = get_preset("balanced")
    assert get_preset(shipped.tag) is shipped
    older = f"balanced@{shipped.version - 1}"
    with pytest.raises(ValueError, match=rf"preset '{older}' is not shipped by this dit-accel: it ships {shipped.tag}"):
        get_preset(older)
    with pytest.raises(ValueError, match=r"unknown preset 'warp@1'; valid presets"):
        get_preset("warp@1")
