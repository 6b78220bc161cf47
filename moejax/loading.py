"""`from_pretrained`: a Hugging Face checkpoint directory -> a native Flax NNX model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from converters import keymap
from converters.keymap import load_params
from converters.safetensors_io import SafetensorsCheckpoint
from moejax.checkpoint import is_orbax_dir, restore_params
from moejax.config import read_config_json
from moejax.errors import ConfigError
from moejax.models import abstract_model, config_class


def load_config(path: str | Path):
    """The moejax config of a checkpoint directory (validated; see moejax.config)."""
    source = Path(path) / "config.json"
    hf = read_config_json(source)
    return config_class(hf.get("model_type"), str(source)).from_hf(hf, str(source))


def from_pretrained(path: str | Path, dtype=jnp.float32, mesh=None, **config_overrides):
    """Loads a Hugging Face checkpoint directory (config.json + safetensors), or an Orbax directory written
    by `moejax convert`, into its moejax model.

    Tensors stream one at a time from the shards into the model's parameters, cast to `dtype`;
    the model is never materialised twice. With `mesh` (a jax Mesh over moejax.parallel.mesh.MESH_AXES,
    e.g. from make_mesh("data=2,expert=4")), each parameter is created already split by the logical-axis
    rules, every device's shard reading only its slice; calls then run on the mesh, MoE blocks
    expert-parallel. `config_overrides` replace fields of the moejax config (e.g. Nemotron-H's
    dt_floor="time_step_min" or chunk_size=64).
    """
    path = Path(path)
    cfg = load_config(path)
    if config_overrides:
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise ConfigError(f"{type(cfg).__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
        cfg = dataclasses.replace(cfg, **config_overrides)
    model = abstract_model(cfg, dtype)
    if is_orbax_dir(path):
        return restore_params(model, path, mesh)
    load_params(model, keymap(cfg), SafetensorsCheckpoint(path), mesh=mesh)
    return model
