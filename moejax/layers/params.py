"""Parameter creation: every weight carries logical axis names, so sharding is a table, not code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, *, fan_in: int | None = None,
          init: str = "normal") -> nnx.Param:
    """A Param of `shape` named by `axes`; "normal" is scaled by fan_in**-0.5, "ones"/"zeros" are constant."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        scale = (fan_in or shape[0]) ** -0.5
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    """The logical axis names a parameter was declared with."""
    return variable.get_metadata()["logical_axes"]
