"""Deliberate errors in a moejax model, to measure what `moejax parity` catches (benchmarks/parity_floor.py and the
parity tests inject them on the moejax side; the reference is left as it is).

A fault is data: a kind and a magnitude. `inject` applies it to a copy of a model (the original keeps its
parameters and settings) and proves that it took effect: the parameters it changes differ from before, and the
model's logits on probe tokens differ from the original's. Otherwise it raises FaultMissed (a scaling that rounds
away in bfloat16 weights, a window longer than the probe), so an injection never misses its target silently.

Magnitudes, by how a kind applies one:
- scale: the parameters times (1 + m);
- factor: an epsilon times m;
- shift: the parameters plus m (A_log, whose exponential is A; dt_bias, inside the softplus);
- window: a sliding window of m tokens on every attention layer.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers.attention import Attention
from moejax.layers.mamba2 import Mamba2Mixer
from moejax.layers.moe import Experts, Router
from moejax.layers.norms import RMSNorm
from moejax.layers.stack import layer_position

# kind -> (what it changes, how a magnitude applies)
KINDS = {
    "experts_all": ("every routed expert's down projection, every MoE layer", "scale"),
    "experts_layer": ("every routed expert's down projection in the middle MoE layer", "scale"),
    "expert_rare": ("one rarely chosen expert's down projection (the least chosen with any tokens, in the middle "
                    "MoE layer)", "scale"),
    "router": ("every router's weights", "scale"),
    "block_norm_weight": ("the weight of every norm inside the blocks (q/k norms apart)", "scale"),
    "block_norm_eps": ("the epsilon of every norm inside the blocks (q/k norms apart)", "factor"),
    "qk_norm_weight": ("the q/k-norm weights", "scale"),
    "qk_norm_eps": ("the q/k-norm epsilon", "factor"),
    "final_norm_weight": ("the final norm's weight", "scale"),
    "final_norm_eps": ("the final norm's epsilon", "factor"),
    "rope_theta": ("RoPE theta", "scale"),
    "attention_window": ("a sliding window on every attention layer", "window"),
    "mamba_a_log": ("Mamba-2 A_log (A = -exp(A_log))", "shift"),
    "mamba_d": ("Mamba-2 D (the skip)", "scale"),
    "mamba_dt_bias": ("Mamba-2 dt_bias", "shift"),
    "mamba_conv": ("Mamba-2 convolution weights", "scale"),
    "mamba_norm": ("Mamba-2 gated-norm weight", "scale"),
    "mamba_in_proj": ("Mamba-2 in_proj", "scale"),
    "mamba_out_proj": ("Mamba-2 out_proj", "scale"),
}
MAMBA_PARAMS = {"mamba_a_log": "a_log_gr", "mamba_d": "d_gr", "mamba_dt_bias": "dt_bias_gr", "mamba_conv": "conv_gck",
                "mamba_norm": "norm_gi", "mamba_in_proj": "in_proj_dgw", "mamba_out_proj": "out_proj_gid"}


class FaultMissed(Exception):
    """The fault did not change the model (its parameters, or its outputs on the probe)."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    magnitude: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {sorted(KINDS)}")

    def __str__(self) -> str:
        how = KINDS[self.kind][1]
        shown = {"scale": f"x(1{self.magnitude:+g})", "factor": f"x{self.magnitude:g}", "shift": f"{self.magnitude:+g}",
                 "window": f"{int(self.magnitude)} tokens"}[how]
        return f"{self.kind} {shown}"


def _modules(model, cls) -> list[tuple[tuple, object]]:
    return [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, cls)]


def _qk_norms(model) -> list:
    return [norm for _, attn in _modules(model, Attention) for norm in
            ((attn.q_norm, attn.k_norm) if attn.qk_norm else ())]


def _norms(model, where: str) -> list[RMSNorm]:
    """The RMSNorm modules "inside" the blocks (q/k norms apart), the "final" ones outside them, or the "qk" ones."""
    if where == "qk":
        return _qk_norms(model)
    qk = {id(n) for n in _qk_norms(model)}
    inside = where == "inside"
    return [norm for path, norm in _modules(model, RMSNorm)
            if id(norm) not in qk and (layer_position(path + ("x",)) is not None) == inside]


def kinds_for(model) -> list[str]:
    """The fault kinds this model has something to inject into."""
    present = {
        "experts_all": bool(_modules(model, Experts)), "router": bool(_modules(model, Router)),
        "block_norm_weight": bool(_norms(model, "inside")), "qk_norm_weight": bool(_norms(model, "qk")),
        "final_norm_weight": bool(_norms(model, "final")), "rope_theta": hasattr(model.config, "rope"),
        "attention_window": bool(_modules(model, Attention)), "mamba_a_log": bool(_modules(model, Mamba2Mixer)),
    }
    family = {"experts_layer": "experts_all", "expert_rare": "experts_all", "block_norm_eps": "block_norm_weight",
              "qk_norm_eps": "qk_norm_weight", "final_norm_eps": "final_norm_weight",
              **{kind: "mamba_a_log" for kind in MAMBA_PARAMS}}
    return [kind for kind in KINDS if present.get(family.get(kind, kind), False)]


def rare_expert(model, counts_e: np.ndarray) -> tuple[int, int]:
    """(MoE layer, expert): the middle MoE layer's least chosen expert among those chosen at all, by its top-k
    counts [E] in that layer."""
    used = np.flatnonzero(counts_e > 0)
    return len(model.config.moe_layers) // 2, int(used[np.argmin(counts_e[used])])


def _edit(variable, fn, index=()) -> None:
    """variable[index] <- fn(variable[index]) computed in float32, stored in the variable's dtype."""
    value = variable[...]
    part = value[index] if index else value
    new = fn(part.astype(jnp.float32)).astype(value.dtype)
    variable[...] = value.at[index].set(new) if index else new


def inject(model, fault: Fault, *, probe: tuple[np.ndarray, np.ndarray] | None = None,
           rare: tuple[int, int] | None = None):
    """A copy of `model` with `fault` applied (the model itself is unchanged). probe: (ids, mask) on which
    the copy's logits must differ from the model's. rare: (MoE layer, expert) for "expert_rare" (rare_expert).
    Raises FaultMissed when nothing changed, ValueError when the model has nothing of that kind."""
    if fault.kind not in kinds_for(model):
        raise ValueError(f"{model.config.model_type} has nothing for the fault {fault.kind!r}")
    faulted = nnx.clone(model)  # new Variables (merge(*split(model)) would share them with the model)
    m, how = fault.magnitude, KINDS[fault.kind][1]
    op = {"scale": lambda a: a * (1 + m), "shift": lambda a: a + m}.get(how)
    targets = []  # (variable, index) pairs whose values must change
    cfg = faulted.config
    kind = fault.kind
    if kind in ("experts_all", "experts_layer", "expert_rare"):
        if kind == "experts_all":
            targets = [(experts.down_efd, ()) for _, experts in _modules(faulted, Experts)]
        else:
            layer, expert = (len(cfg.moe_layers) // 2, None) if kind == "experts_layer" else rare
            segment, position, repeat = faulted.layers.locate(cfg.moe_layers[layer])
            for path, experts in _modules(faulted, Experts):
                if layer_position(path + ("x",))[:2] == (segment, position):
                    targets.append((experts.down_efd, (repeat,) if expert is None else (repeat, expert)))
    elif kind == "router":
        targets = [(router.w_de, ()) for _, router in _modules(faulted, Router)]
    elif kind in MAMBA_PARAMS:
        targets = [(getattr(mixer, MAMBA_PARAMS[kind]), ()) for _, mixer in _modules(faulted, Mamba2Mixer)]
    elif kind.endswith("_weight"):
        targets = [(norm.weight, ()) for norm in _norms(faulted, {"block": "inside", "qk": "qk",
                                                                  "final": "final"}[kind.split("_")[0]])]
    elif kind.endswith("_eps"):
        for norm in _norms(faulted, {"block": "inside", "qk": "qk", "final": "final"}[kind.split("_")[0]]):
            norm.eps = norm.eps * m
    elif kind == "rope_theta":
        faulted.config = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, theta=cfg.rope.theta * (1 + m)))
    elif kind == "attention_window":
        for _, attn in _modules(faulted, Attention):
            attn.window = int(m)
    before = [np.asarray(var[...][index] if index else var[...]) for var, index in targets]
    for var, index in targets:
        _edit(var, op, index)
    if targets:
        changed = sum(int(np.sum(np.asarray(var[...][index] if index else var[...]) != old))
                      for (var, index), old in zip(targets, before, strict=True))
        if not changed:
            raise FaultMissed(f"{fault}: no parameter changed (the change rounds away in "
                              f"{np.asarray(targets[0][0][...]).dtype})")
    if probe is not None:
        ids, mask = probe
        if np.array_equal(np.asarray(model(ids, mask).logits), np.asarray(faulted(ids, mask).logits)):
            raise FaultMissed(f"{fault}: the model's logits on the probe tokens did not change")
    return faulted

