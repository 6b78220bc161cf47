"""The architectures moejax implements, by Hugging Face model_type: the one place that names them.

Each architecture is one module, moejax/models/<model_type>.py, holding all of it: `Config` (read from config.json
and written back), `keymap(cfg)` (its Hugging Face tensor names), `Model` (its modules and forward), `PRESETS` (the
published shapes `moejax plan` knows) and `tiny_reference_config(**overrides)` (the tiny transformers config the
tests build). Adding one is a module and a line here (docs/adding-a-model.md).

The modules are named, not imported: an architecture (and JAX) loads when it is first asked for, so that importing
the registry (as the command line does to parse its flags) costs nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moejax.errors import ConfigError

ARCHITECTURES = {
    "qwen3_moe": "moejax.models.qwen3_moe",
    "nemotron_h": "moejax.models.nemotron_h",
    "olmoe": "moejax.models.olmoe",
    "gpt_oss": "moejax.models.gpt_oss",
}


def architecture(model_type: str | None, source: str = "config.json") -> ModuleType:
    """The module of a config.json's model_type, or a ConfigError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; moejax implements "
                          f"{sorted(ARCHITECTURES)}")
    return importlib.import_module(ARCHITECTURES[model_type])


def config_class(model_type: str | None, source: str = "config.json") -> type:
    """The config class for a config.json's model_type, or a ConfigError naming the supported ones."""
    return architecture(model_type, source).Config


def model_class(cfg) -> type:
    """The model class of a config."""
    return architecture(cfg.model_type).Model


def keymap(cfg):
    """The Hugging Face key map (moejax.keymap.KeyMap) of a config's architecture."""
    return architecture(cfg.model_type).keymap(cfg)


def presets() -> dict:
    """The published shapes `moejax plan` knows, by name: name -> a function returning the config."""
    return {name: make for model_type in ARCHITECTURES for name, make in architecture(model_type).PRESETS.items()}


def tiny_reference_config(model_type: str, **overrides):
    """The tiny transformers config of an architecture that the tests and benchmarks build (overrides replace its
    fields)."""
    return architecture(model_type).tiny_reference_config(**overrides)


def abstract_model(cfg, dtype=None):
    """The model of `cfg` in `dtype` (default float32) from shapes alone: every parameter a ShapeDtypeStruct, nothing
    allocated."""
    import jax.numpy as jnp
    from flax import nnx

    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0)))
