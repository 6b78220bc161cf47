"""The architectures moejax implements, by Hugging Face model_type: the one place that maps a config to its model."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import NemotronHConfig, Qwen3MoeConfig
from moejax.errors import ConfigError
from moejax.models.nemotron_h import NemotronHForCausalLM
from moejax.models.qwen3_moe import Qwen3MoeForCausalLM

CONFIGS = {cls.model_type: cls for cls in (Qwen3MoeConfig, NemotronHConfig)}
MODELS = {Qwen3MoeConfig: Qwen3MoeForCausalLM, NemotronHConfig: NemotronHForCausalLM}


def config_class(model_type: str | None, source: str) -> type:
    """The config class for a config.json's model_type, or a ConfigError naming the supported ones."""
    if model_type not in CONFIGS:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; moejax implements {sorted(CONFIGS)}")
    return CONFIGS[model_type]


def model_class(cfg) -> type:
    """The model class of a config."""
    return MODELS[type(cfg)]


def abstract_model(cfg, dtype=jnp.float32):
    """The model of `cfg` in `dtype` from shapes alone: every parameter a ShapeDtypeStruct, nothing allocated."""
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
