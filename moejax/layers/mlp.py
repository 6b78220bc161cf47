"""Dense feed-forward blocks: SwiGLU (Qwen3) and relu^2 (Nemotron-H)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.params import param

ACTIVATIONS = ("swiglu", "relu2")


def activate(kind: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
    """silu(gate) * up for "swiglu"; relu(up)^2 for "relu2"."""
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
