"""RMSNorm with float32 statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.params import param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32 and returned in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """weight * x / rms(x).

    Qwen3 multiplies by the weight after casting back to the input dtype; Nemotron-H multiplies in
    float32 and casts the product (`weight_in_float32`). The two differ only below float32.
    """

    def __init__(self, dim: int, eps: float, *, axis_name: str = "norm", weight_in_float32: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.weight_in_float32 = eps, weight_in_float32
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.weight_in_float32:
            return (self.weight[...].astype(jnp.float32) * rms_normalize(x, self.eps)).astype(x.dtype)
        return self.weight[...] * rms_normalize(x, self.eps).astype(x.dtype)
