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
    """weight * x / rms(x); the weight multiplies after the cast back, as transformers does."""

    def __init__(self, dim: int, eps: float, *, axis_name: str = "norm", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * rms_normalize(x, self.eps).astype(x.dtype)
