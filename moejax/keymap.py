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

from moejax.errors import CheckpointError
from moejax.layers.stack import layer_position
from moejax.parallel.mesh import param_sharding
from moejax.safetensors_io import SafetensorsCheckpoint


@dataclasses.dataclass(frozen=True)
class Rule:
    """One way to read a parameter: key template, on-disk shape, and disk -> moejax layout.

    A parameter stored as several tensors (GPT-OSS's MXFP4 experts: `<key>_blocks` and `<key>_scales`) names them
    in `parts`, (key suffix, on-disk shape) each; `to_moejax` then takes them in that order and `shape` is the
    shape it gives (the rule cannot be written back: exports use a parameter's first rule)."""

    template: str
    hf_shape: tuple[int, ...]
    to_moejax: Callable[..., np.ndarray] = lambda a: a
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    shape: tuple[int, ...] | None = None

    def keys(self, key: str) -> list[str]:
        """The checkpoint tensors one key of this rule reads."""
        return [key + suffix for suffix, _ in self.parts] if self.parts else [key]

    def read(self, ckpt: SafetensorsCheckpoint, key: str) -> np.ndarray:
        """One key's tensor(s) from the checkpoint, in moejax's layout."""
        if not self.parts:
            return self.to_moejax(ckpt.read(key, self.hf_shape))
        return self.to_moejax(*(ckpt.read(key + suffix, shape) for suffix, shape in self.parts))

    def moejax_shape(self) -> tuple[int, ...]:
        """The shape one key's tensor takes in moejax's layout."""
        if self.shape is not None:
            return self.shape
        return tuple(np.shape(self.to_moejax(np.empty(self.hf_shape, np.uint8))))


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Rules (first match wins) for top-level params and for params inside one decoder layer."""

    top: dict[tuple[str, ...], list[Rule]]
    layer: dict[tuple[str, ...], list[Rule]]
    num_experts: int
    optional_keys: frozenset[str] = frozenset()
    ignored_prefixes: tuple[str, ...] = ()


def transpose(a: np.ndarray) -> np.ndarray:
    """A Linear's weight [out, in] -> moejax's [in, out]."""
    return a.T


def decoder_rules(layer: str, d: int, n: int, k: int, h: int) -> dict[tuple[str, ...], list[Rule]]:
    """The rules transformers' Llama-style decoder layers share (the layer's key prefix `layer`, e.g.
    "model.layers.{i}."): the two norms and the attention projections with their optional biases (d hidden, n query
    heads, k key/value heads, head_dim h)."""
    a = layer + "self_attn."

    def heads(count):  # [count*h, d] -> [d, count, h]
        return lambda w: w.reshape(count, h, d).transpose(2, 0, 1)

    return {
        ("input_layernorm", "weight"): [Rule(layer + "input_layernorm.weight", (d,))],
        ("post_attention_layernorm", "weight"): [Rule(layer + "post_attention_layernorm.weight", (d,))],
        ("self_attn", "q_dnh"): [Rule(a + "q_proj.weight", (n * h, d), heads(n))],
        ("self_attn", "k_dkh"): [Rule(a + "k_proj.weight", (k * h, d), heads(k))],
        ("self_attn", "v_dkh"): [Rule(a + "v_proj.weight", (k * h, d), heads(k))],
        ("self_attn", "o_nhd"): [Rule(a + "o_proj.weight", (d, n * h),
                                      lambda w: w.reshape(d, n, h).transpose(1, 2, 0))],
        ("self_attn", "q_bias_nh"): [Rule(a + "q_proj.bias", (n * h,), lambda b: b.reshape(n, h))],
        ("self_attn", "k_bias_kh"): [Rule(a + "k_proj.bias", (k * h,), lambda b: b.reshape(k, h))],
        ("self_attn", "v_bias_kh"): [Rule(a + "v_proj.bias", (k * h,), lambda b: b.reshape(k, h))],
        ("self_attn", "o_bias_d"): [Rule(a + "o_proj.bias", (d,))],
    }


def swiglu_expert_rules(experts: str, e: int, d: int, f: int) -> dict[tuple[str, ...], list[Rule]]:
    """SwiGLU experts under key prefix `experts` (e.g. "model.layers.{i}.mlp.experts."): one tensor per expert, as
    save_pretrained writes them, or fused, as transformers >= 5 holds them (gate_up_proj [E, 2f, d] with gate
    first, down_proj [E, d, f])."""
    return {
        ("mlp", "experts", "gate_edf"): [
            Rule(experts + "{e}.gate_proj.weight", (f, d), transpose),
            Rule(experts + "gate_up_proj", (e, 2 * f, d), lambda a: a[:, :f].transpose(0, 2, 1))],
        ("mlp", "experts", "up_edf"): [
            Rule(experts + "{e}.up_proj.weight", (f, d), transpose),
            Rule(experts + "gate_up_proj", (e, 2 * f, d), lambda a: a[:, f:].transpose(0, 2, 1))],
        ("mlp", "experts", "down_efd"): [
            Rule(experts + "{e}.down_proj.weight", (d, f), transpose),
            Rule(experts + "down_proj", (e, d, f), lambda a: a.transpose(0, 2, 1))],
    }


def decoder_top(v: int, d: int, tied: bool) -> tuple[dict[tuple[str, ...], list[Rule]], frozenset[str]]:
    """The embeddings, final norm and LM head of a Llama-style model, and the keys that may be present unread (a
    tied checkpoint may still carry the identical head)."""
    top = {
        ("embed_vd",): [Rule("model.embed_tokens.weight", (v, d))],
        ("norm", "weight"): [Rule("model.norm.weight", (d,))],
        ("lm_head_dv",): [Rule("lm_head.weight", (v, d), transpose)],
    }
    return top, frozenset({"lm_head.weight"}) if tied else frozenset()


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
        if rule.keys(keys.flat[0])[0] in ckpt:
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
    parts = [np.asarray(rule.read(ckpt, k)[index[keys.ndim:]], dtype=dtype) for k in np.ravel(keys_here)]
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
        shape = (*keys.shape, *rule.moejax_shape())
        if shape != var.shape:
            raise CheckpointError(f"{ckpt.where(rule.keys(keys.flat[0])[0])}: {rule.template} gives a parameter of "
                                  f"shape {shape}, the model expects {var.shape}")
        sharding = (param_sharding(name, var, mesh) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        var.set_value(jax.make_array_from_callback(
            var.shape, sharding, lambda index, rule=rule, keys=keys, dtype=var.dtype:
            _read_slice(ckpt, rule, keys, index, dtype)))
        consumed.update(k for key in keys.flat for k in rule.keys(key))
        sources[path] = keys
    unexpected = sorted(k for k in ckpt.keys() - consumed - keymap.optional_keys
                        if not k.startswith(keymap.ignored_prefixes))
    if unexpected:
        where = sorted({ckpt.where(k).name for k in unexpected})
        raise CheckpointError(
            f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s) in {where}, e.g. {unexpected[:5]}; "
            "the checkpoint does not match its config.json")
    return sources
