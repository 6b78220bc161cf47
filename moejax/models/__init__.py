"""The architectures moejax implements, by Hugging Face model_type."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from converters import nemotron_h as nemotron_h_keys
from converters import qwen3_moe as qwen3_moe_keys
from moejax.config import ConfigError, NemotronHConfig, Qwen3MoeConfig
from moejax.models.nemotron_h import NemotronHForCausalLM
from moejax.models.qwen3_moe import Qwen3MoeForCausalLM


@dataclasses.dataclass(frozen=True)
class Architecture:
    config_cls: type
    model_cls: type
    keymap: Callable


ARCHITECTURES = {
    "qwen3_moe": Architecture(Qwen3MoeConfig, Qwen3MoeForCausalLM, qwen3_moe_keys.keymap),
    "nemotron_h": Architecture(NemotronHConfig, NemotronHForCausalLM, nemotron_h_keys.keymap),
}


def architecture(model_type: str | None, source: str) -> Architecture:
    """The Architecture for a config.json's model_type, or a ConfigError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; moejax implements "
                          f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
