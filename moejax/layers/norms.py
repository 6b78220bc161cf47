"""RMSNorm with float32 statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.params import param


def rms_normalize(x: jax.Array, eps: float, axes: int = 1) -> jax.Array:
    """x / rms(x) over the last `axes` axes, computed in float32 and returned in float32."""
    x32 = x.astype(jnp.float32)
    over = tuple(range(-axes, 0))
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=over, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """weight * x / rms(x).

    Qwen3 multiplies by the weight after casting back to the input dtype; Nemotron-H multiplies in
    float32 and casts the product (`weight_in_float32`). The two differ only below float32.
    A tuple `dim` (with one axis name per entry) normalises over that many trailing axes together: OLMoE's QK-norm
    over a whole projection, kept as [heads, head_dim] so that it can still be split over heads.
    """

    def __init__(self, dim: int | tuple[int, ...], eps: float, *, axis_name: str | tuple[str, ...] = "norm",
                 weight_in_float32: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
        self.eps, self.weight_in_float32, self.axes = eps, weight_in_float32, len(shape)
        self.weight = param(rngs, shape, names, dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.weight_in_float32:
            return (self.weight[...].astype(jnp.float32) * rms_normalize(x, self.eps, self.axes)).astype(x.dtype)
        return self.weight[...] * rms_normalize(x, self.eps, self.axes).astype(x.dtype)
