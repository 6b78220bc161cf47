"""Hugging Face <-> moejax weights: streaming safetensors reads and writes, and per-architecture key maps."""

from __future__ import annotations

from converters import nemotron_h, qwen3_moe
from converters.keymap import KeyMap

_KEYMAPS = {"qwen3_moe": qwen3_moe.keymap, "nemotron_h": nemotron_h.keymap}


def keymap(cfg) -> KeyMap:
    """The key map of a model config's architecture."""
    return _KEYMAPS[cfg.model_type](cfg)
