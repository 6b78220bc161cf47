"""Dense feed-forward blocks: SwiGLU (Qwen3) and relu^2 (Nemotron-H); the activations the experts share."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.params import param

ACTIVATIONS = ("swiglu", "relu2")


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation, its constants carried with it (hashable: a static argument under jit):
    (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit)."""

    alpha: float = 1.702
    limit: float = 7.0


GPT_OSS_SWIGLU = ClampedSwiGLU(alpha=1.702, limit=7.0)  # transformers' GptOssConfig defaults


def has_gate(kind: str | ClampedSwiGLU) -> bool:
    """Whether the activation takes a gate projection beside the up projection."""
    return kind == "swiglu" or isinstance(kind, ClampedSwiGLU)


def activate(kind: str | ClampedSwiGLU, up: jax.Array, gate: jax.Array | None) -> jax.Array:
    """silu(gate) * up for "swiglu"; relu(up)^2 for "relu2"; GPT-OSS's clamped SwiGLU for a ClampedSwiGLU."""
    if isinstance(kind, ClampedSwiGLU):
        gate = jnp.minimum(gate, kind.limit)
        return (jnp.clip(up, -kind.limit, kind.limit) + 1) * (gate * jax.nn.sigmoid(gate * kind.alpha))
    if kind == "swiglu":
        return jax.nn.silu(gate) * up
    return jnp.square(jax.nn.relu(up))


class MLP(nnx.Module):
    """down(act(up(x), gate(x))): the dense layers and the shared experts."""

    def __init__(self, hidden: int, ffn: int, *, activation: str = "swiglu", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        self.activation = activation
        if activation == "swiglu":
            self.gate_df = param(rngs, (hidden, ffn), ("embed", "mlp"), dtype)
        self.up_df = param(rngs, (hidden, ffn), ("embed", "mlp"), dtype)
        self.down_fd = param(rngs, (ffn, hidden), ("mlp", "embed"), dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., hidden]."""
        gate = x_btd @ self.gate_df[...] if self.activation == "swiglu" else None
        return activate(self.activation, x_btd @ self.up_df[...], gate) @ self.down_fd[...]
