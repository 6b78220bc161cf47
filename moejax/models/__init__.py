"""The architectures moejax implements, by Hugging Face model_type: the one place that maps a config to its model.

The model classes are named, not imported: an architecture's module (and JAX) loads when a model is first built, so
that importing the registry (as the command line does to parse its flags) costs nothing.
"""

from __future__ import annotations

import importlib

from moejax.config import NemotronHConfig, Qwen3MoeConfig
from moejax.errors import ConfigError

CONFIGS = {cls.model_type: cls for cls in (Qwen3MoeConfig, NemotronHConfig)}
MODELS = {"qwen3_moe": "moejax.models.qwen3_moe:Qwen3MoeForCausalLM",
          "nemotron_h": "moejax.models.nemotron_h:NemotronHForCausalLM"}
# The published shapes `moejax plan` knows by name.
PRESETS = {"qwen3-30b-a3b": Qwen3MoeConfig.qwen3_30b_a3b,
           "nemotron-3-nano-30b-a3b": NemotronHConfig.nemotron_3_nano_30b_a3b}


def config_class(model_type: str | None, source: str) -> type:
    """The config class for a config.json's model_type, or a ConfigError naming the supported ones."""
    if model_type not in CONFIGS:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; moejax implements {sorted(CONFIGS)}")
    return CONFIGS[model_type]


def model_class(cfg) -> type:
    """The model class of a config."""
    module, name = MODELS[cfg.model_type].split(":")
    return getattr(importlib.import_module(module), name)


def abstract_model(cfg, dtype=None):
    """The model of `cfg` in `dtype` (default float32) from shapes alone: every parameter a ShapeDtypeStruct, nothing
    allocated."""
    import jax.numpy as jnp
    from flax import nnx

    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0)))
