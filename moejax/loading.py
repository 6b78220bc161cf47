"""`from_pretrained`: a Hugging Face checkpoint directory -> a native Flax NNX model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoint import is_orbax_dir, restore_params
from moejax.config import read_config_json
from moejax.errors import CheckpointError, ConfigError
from moejax.keymap import load_params
from moejax.models import abstract_model, config_class, keymap
from moejax.parallel.mesh import as_moejax_mesh, make_mesh
from moejax.safetensors_io import SafetensorsCheckpoint


def token_ids(value, where: str) -> list[int]:
    """A config's token id field (one id, a list of them, or null) as a list."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{where}: token ids must be non-negative integers, got {value!r}")
    return values


def generation_defaults(path: str | Path) -> list[int]:
    """The end-of-sequence ids transformers' `generate` stops at for this checkpoint: generation_config.json's
    eos_token_id when it has one, else config.json's (what transformers derives a generation config from)."""
    path = Path(path)
    generation = path / "generation_config.json"
    if generation.is_file():
        declared = read_config_json(generation)
        if declared.get("eos_token_id") is not None:
            return token_ids(declared["eos_token_id"], str(generation))
    return token_ids(read_config_json(path / "config.json").get("eos_token_id"), str(path / "config.json"))


def load_config(path: str | Path):
    """The moejax config of a checkpoint directory (validated; see moejax.config)."""
    source = Path(path) / "config.json"
    hf = read_config_json(source)
    return config_class(hf.get("model_type"), str(source)).from_hf(hf, str(source))


def from_pretrained(path: str | Path, dtype=jnp.float32, mesh=None, allow_nonfinite: bool = False,
                    **config_overrides):
    """Loads a Hugging Face checkpoint directory (config.json + safetensors), or an Orbax directory written
    by `moejax convert`, into its moejax model.

    Tensors stream one at a time from the shards into the model's parameters, cast to `dtype`;
    the model is never materialised twice. With `mesh` (any jax Mesh whose axis names are among data, fsdp, expert
    and tensor, in any order, Explicit or Auto, e.g. jax.make_mesh((2, 4), ("data", "expert")) or moejax's
    make_mesh("data=2,expert=4")), each parameter is created already split by the logical-axis
    rules, every device's shard reading only its slice; calls then run on the mesh, MoE blocks
    expert-parallel. A tensor holding NaN or infinite values is an error naming it, unless allow_nonfinite.
    `config_overrides` replace fields of the moejax config (e.g. Nemotron-H's dt_floor="time_step_min" or
    chunk_size=64).
    """
    path = Path(path)
    mesh = as_moejax_mesh(make_mesh(mesh) if isinstance(mesh, str) else mesh)
    cfg = load_config(path)
    if config_overrides:
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise ConfigError(f"{type(cfg).__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
        cfg = dataclasses.replace(cfg, **config_overrides)
    model = abstract_model(cfg, dtype)
    if is_orbax_dir(path):
        restore_params(model, path, mesh)
        sources = None
    else:
        checkpoint = SafetensorsCheckpoint(path)
        sources = load_params(model, keymap(cfg), checkpoint, mesh=mesh)
    if not allow_nonfinite:
        check_finite(model, path, sources, None if sources is None else checkpoint)
    return model


@jax.jit
def _nonfinite_flags(leaves: list[jax.Array]) -> jax.Array:
    """Per array, whether its float32 sum is not finite: true for every array holding a NaN or an infinity (and,
    rarely, for one whose finite values overflow the sum, which the count below then clears)."""
    return jnp.stack([~jnp.isfinite(jnp.sum(x, dtype=jnp.float32)) for x in leaves])


def check_finite(model, path: Path, sources: dict | None = None, checkpoint: SafetensorsCheckpoint | None = None):
    """A CheckpointError naming the first tensor holding NaN or infinite values, if any. One jitted reduction over
    the loaded parameters, on their devices (~35 GB/s on a CPU, far more on an accelerator); only a flagged
    parameter is examined further, to name the checkpoint tensor (per layer and expert) that holds them."""
    flat = [(key, var) for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if jnp.issubdtype(var.dtype, jnp.floating)]
    flags = np.asarray(_nonfinite_flags([var[...] for _, var in flat]))
    for (key, var), flagged in zip(flat, flags, strict=True):
        if not flagged:
            continue
        keys = None if sources is None else sources.get(tuple(key))
        lead = () if keys is None else keys.shape
        bad = np.asarray(jnp.sum(~jnp.isfinite(var[...]).reshape(*lead, -1), axis=-1))
        if not bad.any():
            continue  # a large but finite sum
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = (f"{checkpoint.where(keys[first])}: tensor {str(keys[first])!r}" if keys is not None
                 else f"{path}: parameter {'.'.join(map(str, key))}")
        raise CheckpointError(f"{where} holds {int(bad[first])} NaN or infinite value(s) (as {var.dtype}); the "
                              "checkpoint is broken. To load it anyway (e.g. to study it), pass allow_nonfinite=True, "
                              "or --allow-nonfinite on the command line")
