"""AdamW with global-norm clipping and frozen parameters, as one optax GradientTransformation.

It computes what `optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(c), optax.adamw(
lr, b1, b2, weight_decay=wd, mask=decay)), "freeze": optax.set_to_zero()}, labels)` computes, with the
same formulas in the same order (tests/test_adamw.py holds the two together), but writes each parameter's
update as a single elementwise expression of (gradient, mu, nu, parameter). XLA then fuses it into one pass
that reads those four and writes mu, nu and, after `optax.apply_updates`, the parameter in place. Through
optax's chain it materialises intermediate trees (the bias-corrected ratio, the decayed update), each a
fresh buffer the size of the parameters: on the CPU, on the benchmark's 400M-parameter model, 1.33 s per
update against 0.57 s.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True, eq=False)
class Slices:
    """The trained part of a parameter: the sub-arrays at `index` (a tuple of int arrays over its leading axes, e.g.
    (repeats, experts) of a stacked [layers, E, d, f] expert tensor). Only they get updates and moments; the rest of
    the array keeps its values bit for bit. A leaf of the optimizer's `train` tree (not a pytree)."""

    index: tuple[np.ndarray, ...]

    @property
    def count(self) -> int:
        return len(self.index[0])

    def take(self, x: jax.Array) -> jax.Array:
        return x[tuple(jnp.asarray(i) for i in self.index)]

    def add(self, x: jax.Array, values: jax.Array) -> jax.Array:
        return x.at[tuple(jnp.asarray(i) for i in self.index)].add(values.astype(x.dtype))


def apply_updates(params, updates, train):
    """params + updates, as optax.apply_updates, where a Slices parameter's update holds its slices alone and a frozen
    parameter is returned as it is (no pass over it)."""
    def one(t, p, u):
        if isinstance(t, Slices):
            return t.add(p, u)
        return p if frozen(t) else (p + u).astype(p.dtype)

    return jax.tree.map(one, train, params, updates)


def frozen(is_trained) -> bool:
    """A `train` leaf that trains nothing."""
    return not isinstance(is_trained, Slices) and not is_trained


class ClippedAdamWState(NamedTuple):
    count: jax.Array  # int32: updates taken
    mu: optax.Updates  # first moments, mirroring the parameters; optax.MaskedNode() for a frozen one
    nu: optax.Updates  # second moments, likewise


def clipped_adamw(learning_rate: optax.Schedule, b1: float, b2: float, weight_decay: float, clip_norm: float,
                  train: optax.Params, decay: optax.Params, eps: float = 1e-8) -> optax.GradientTransformation:
    """train, decay: trees with the parameters' structure (a leaf per parameter array): train holds True, False or
    Slices (only those sub-arrays train), decay bools. Frozen parameters (train False) get a zero update and keep no
    moments; their gradients (which may be None) are left out of the clipping norm. A Slices parameter's gradient is
    its slices' alone ([slices, ...]), it keeps moments for them alone, and its update is for the slices alone
    ([slices, ...]: add it with `apply_updates`). Decoupled weight decay applies where decay is True (to the trained
    slices only)."""

    def init(params):
        def moment(is_trained, p):
            if isinstance(is_trained, Slices):
                return jnp.zeros((is_trained.count, *p.shape[len(is_trained.index):]), p.dtype)
            return jnp.zeros_like(p) if is_trained else optax.MaskedNode()

        return ClippedAdamWState(jnp.zeros([], jnp.int32), jax.tree.map(moment, train, params),
                                 jax.tree.map(moment, train, params))

    def update(grads, state, params):
        trained = [g for g, t in zip(jax.tree.leaves(grads, is_leaf=lambda g: g is None), jax.tree.leaves(train),
                                     strict=True) if not frozen(t)]
        norm = optax.tree.norm(trained)
        # A scalar factor, not optax's (g / norm) * clip_norm: XLA fuses a multiply into each use of the
        # clipped gradient, but keeps a divide once, in a fresh gradient-sized buffer (1 ulp apart).
        clip = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
        step_size = -learning_rate(state.count)
        count = optax.safe_increment(state.count)
        correction1, correction2 = 1 - b1**count, 1 - b2**count

        def one(is_trained, decays, g, m, v, p):
            if frozen(is_trained):
                return jnp.zeros_like(p), m, v
            if isinstance(is_trained, Slices):  # the update of the slices alone: apply_updates adds it there
                return one(True, decays, g, m, v, is_trained.take(p))
            g = g * clip.astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * (g**2) + b2 * v
            u = (m / correction1.astype(m.dtype)) / (jnp.sqrt(v / correction2.astype(v.dtype)) + eps)
            if decays:
                u = u + weight_decay * p
            return step_size * u, m, v

        out = jax.tree.map(one, train, decay, grads, state.mu, state.nu, params)
        pick = [jax.tree.map(lambda _, o, i=i: o[i], train, out) for i in range(3)]
        return pick[0], ClippedAdamWState(count, pick[1], pick[2])

    return optax.GradientTransformation(init, update)
