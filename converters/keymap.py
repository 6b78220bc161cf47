"""Declarative maps from moejax parameters to Hugging Face tensors, and the loader that applies them.

A `Rule` names the Hugging Face key template of one moejax parameter ("{i}" = layer index, "{e}" =
expert index), the shape each tensor has on disk, and how one tensor becomes moejax's layout. Layer
parameters are stacked over the layers their scanned unit runs, and expert tensors over experts, as
they are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from converters.safetensors_io import SafetensorsCheckpoint
from moejax.errors import CheckpointError
from moejax.layers.stack import layer_position
from moejax.parallel.mesh import param_sharding


@dataclasses.dataclass(frozen=True)
class Rule:
    """One way to read a parameter: key template, on-disk shape, and disk -> moejax layout."""

    template: str
    hf_shape: tuple[int, ...]
    to_moejax: Callable[[np.ndarray], np.ndarray] = lambda a: a


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Rules (first match wins) for top-level params and for params inside one decoder layer."""

    top: dict[tuple[str, ...], list[Rule]]
    layer: dict[tuple[str, ...], list[Rule]]
    num_experts: int
    optional_keys: frozenset[str] = frozenset()
    ignored_prefixes: tuple[str, ...] = ()


def _param_paths(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield tuple(path), var


def keys_of(template: str, layers: tuple[int, ...] | None, num_experts: int) -> np.ndarray:
    """Keys as an array shaped [layers?, experts?] (each axis present only where the template has it)."""
    per_expert = "{e}" in template
    rows = [[template.format(i=i, e=e) for e in (range(num_experts) if per_expert else [None])]
            for i in (layers if layers is not None else [None])]
    shape = ((len(layers),) if layers is not None else ()) + ((num_experts,) if per_expert else ())
    return np.array(rows, dtype=object).reshape(shape)


def _choose(rules: list[Rule], layers, keymap: KeyMap, ckpt: SafetensorsCheckpoint) -> tuple[Rule, np.ndarray]:
    for rule in rules:
        keys = keys_of(rule.template, layers, keymap.num_experts)
        if keys.flat[0] in ckpt:
            return rule, keys
    rule = rules[0]
    keys = keys_of(rule.template, layers, keymap.num_experts)
    alternatives = "" if len(rules) == 1 else f" (nor the alternative layout {[r.template for r in rules[1:]]})"
    raise CheckpointError(f"{ckpt.directory}: missing tensor {keys.flat[0]!r}{alternatives}; "
                          f"expected shape {rule.hf_shape}")


def _read_slice(ckpt: SafetensorsCheckpoint, rule: Rule, keys: np.ndarray, index: tuple[slice, ...],
                dtype) -> np.ndarray:
    """The part `index` of a parameter whose leading axes are `keys` (layers, experts): only the tensors it
    covers are read, and of each only the slice it holds is copied (cast to dtype)."""
    keys_here = keys[index[:keys.ndim]]
    parts = [np.asarray(rule.to_moejax(ckpt.read(k, rule.hf_shape))[index[keys.ndim:]], dtype=dtype)
             for k in np.ravel(keys_here)]
    return np.stack(parts).reshape(*np.shape(keys_here), *parts[0].shape) if keys.ndim else parts[0]


def load_params(model: nnx.Module, keymap: KeyMap, ckpt: SafetensorsCheckpoint, mesh=None,
                progress: Callable[[str], None] | None = None) -> dict[tuple, np.ndarray]:
    """Fills every Param of an (abstract) model from the checkpoint, each cast to the dtype the model
    declared for it; returns, per parameter path, the checkpoint keys it was read from (an array over its
    stacked leading axes: layers, experts).

    Each parameter is built shard by shard (`jax.make_array_from_callback`): with a mesh, every device's
    shard reads only the tensors it covers (its layers, its experts) and the slice of each it holds,
    so the whole model never exists in host memory. Without a mesh, the one shard is the whole array.
    Raises CheckpointError naming key, file and expected shape for a missing, misshapen or
    unexpected tensor.
    """
    consumed: set[str] = set()
    sources: dict[tuple, np.ndarray] = {}
    for path, var in _param_paths(model):
        located = layer_position(path)
        if located is None:
            rules, layers = keymap.top.get(tuple(str(p) for p in path)), None
        else:
            s, u, local = located
            rules, layers = keymap.layer.get(local), model.layers.layer_ids[s][u]
        name = ".".join(map(str, path))
        if rules is None:
            raise CheckpointError(f"{ckpt.directory}: moejax has no checkpoint rule for its parameter {name} (a model "
                                  "built from a config the key map does not cover)")
        rule, keys = _choose(rules, layers, keymap, ckpt)
        if progress:
            progress(rule.template)
        shape = (*keys.shape, *rule.to_moejax(np.empty(rule.hf_shape, np.uint8)).shape)
        if shape != var.shape:
            raise CheckpointError(f"{ckpt.where(keys.flat[0])}: {rule.template} gives a parameter of shape "
                                  f"{shape}, the model expects {var.shape}")
        sharding = (param_sharding(name, var, mesh) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        var.set_value(jax.make_array_from_callback(
            var.shape, sharding, lambda index, rule=rule, keys=keys, dtype=var.dtype:
            _read_slice(ckpt, rule, keys, index, dtype)))
        consumed.update(keys.flat)
        sources[path] = keys
    unexpected = sorted(k for k in ckpt.keys() - consumed - keymap.optional_keys
                        if not k.startswith(keymap.ignored_prefixes))
    if unexpected:
        where = sorted({ckpt.where(k).name for k in unexpected})
        raise CheckpointError(
            f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s) in {where}, e.g. {unexpected[:5]}; "
            "the checkpoint does not match its config.json")
    return sources
