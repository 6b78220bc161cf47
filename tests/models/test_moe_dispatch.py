"""The dropless MoE dispatch: both grouped-matmul paths against a per-token numpy oracle.

The CPU path (tiles of several sizes, gather + MLP + scatter-add in one loop, custom VJP) and the
TPU/GPU path (jax.lax.ragged_dot, run here on the CPU) must give the same outputs and gradients as
computing each token's chosen experts one by one. Bound 1e-5 relative: float32, summation order only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax.layers.moe as moe
from moejax.layers.mlp import activate


def oracle(x_td, ids_tk, weights_tk, w, activation):
    out = np.zeros_like(x_td)
    for t in range(x_td.shape[0]):
        for slot, e in enumerate(ids_tk[t]):
            up = x_td[t] @ w["up_edf"][e]
            gate = x_td[t] @ w["gate_edf"][e] if "gate_edf" in w else None
            h = np.asarray(activate(activation, up, gate))
            out[t] += weights_tk[t, slot] * (h @ w["down_efd"][e])
    return out


def problem(activation, tokens=37, experts=6, k=2, d=16, f=12, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    ids = np.array(jax.random.randint(keys[0], (tokens, k), 0, experts - 1))
    ids[:, 1] = np.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % (experts - 1), ids[:, 1])
    ids[:4, 0] = 4  # expert 4 gets only a few rows; expert experts-1 gets none at all
    # Scaled so outputs are O(1): sin() in the gradient test then stays well conditioned.
    w = {"up_edf": jax.random.normal(keys[1], (experts, d, f)) * d**-0.5,
         "down_efd": jax.random.normal(keys[2], (experts, f, d)) * f**-0.5}
    if activation == "swiglu":
        w["gate_edf"] = jax.random.normal(keys[3], (experts, d, f)) * d**-0.5
    x = jax.random.normal(keys[4], (tokens, d))
    weights = jax.nn.softmax(jax.random.normal(keys[5], (tokens, k)), -1)
    return x, jnp.asarray(ids, jnp.int32), weights, w


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("tiles", [(), (8,), (16, 8), (32, 16, 8)])
def test_forward_matches_oracle(activation, tiles):
    x, ids, weights, w = problem(activation)
    expected = oracle(*(np.asarray(a) for a in (x, ids, weights)), {n: np.asarray(v) for n, v in w.items()},
                      activation)
    got = np.asarray(jax.jit(moe.mix_experts, static_argnums=(4, 5))(x, ids, weights, w, activation, tiles))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_tiled_gradients_match_ragged_dot(activation):
    x, ids, weights, w = problem(activation, seed=1)

    def loss(x, weights, w, tiles):
        return jnp.sum(jnp.sin(moe.mix_experts(x, ids, weights, w, activation, tiles)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    ragged = grad(x, weights, w, ())
    for tiles in [(8,), (16, 8)]:
        tiled = grad(x, weights, w, tiles)
        for a, b in zip(jax.tree.leaves(ragged), jax.tree.leaves(tiled), strict=True):
            assert float(jnp.abs(a).max()) > 0
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.slow
def test_plan_places_every_pair_once_in_its_experts_group():
    _, ids, _, _ = problem("relu2", tokens=50, experts=5, k=3)
    plan = moe.plan_dispatch(ids, 5, 8)
    sizes = np.asarray(plan.group_sizes_e)
    assert (sizes % 8 == 0).all()
    assert (sizes == (np.bincount(np.asarray(ids).ravel(), minlength=5) + 7) // 8 * 8).all()
    rows, source = np.asarray(plan.row_tk), np.asarray(plan.source_token_m)
    assert len(np.unique(rows)) == rows.size
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for t in range(ids.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            assert starts[e] <= rows[t, slot] < starts[e + 1]
            assert source[rows[t, slot]] == t
    assert (np.bincount(source, minlength=51)[:50] == ids.shape[1]).all()


def test_cpu_tiles_halve_down_to_eight_rows():
    assert moe.dispatch_tiles(16384, 64) == (128, 64, 32, 16, 8)
    assert moe.dispatch_tiles(40, 8) == (8,)
    assert moe.dispatch_tiles(200, 8) == (16, 8)
