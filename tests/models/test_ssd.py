"""The chunked SSD scan against its sequential oracle and against transformers' `mamba2_chunk_scan`.

Inputs are scaled so y is O(1) (|y| up to ~4): x ~ N(0, 1), B and C ~ N(0, 1) / sqrt(n), dt in
[0.01, 0.5], A = -exp(N(0, 1)). The absolute tolerance of 1e-5 is then ~20x the measured float32
rounding (<= 5e-7) and far below any real error, e.g. a missed decay or a wrong group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

from moejax.layers.ssd import ssd_chunked, ssd_sequential

BATCH, HEADS, HEAD_DIM, STATE, CHUNK = 2, 4, 3, 16, 8

pytestmark = pytest.mark.torch

LONGEST = 61
TOL = 1e-5

# Every comparison runs ssd_chunked under jax.jit with a static chunk size: that is its jit check.
chunked = jax.jit(ssd_chunked, static_argnames="chunk_size")
sequential = jax.jit(ssd_sequential)


def make_inputs(time: int, groups: int, seed: int = 0, dt_range=(0.01, 0.5)):
    """x [b,t,h,p], dt [b,t,h], a [h], B and C [b,t,g,n], a state [b,h,p,n]; float32 numpy."""
    rng = np.random.default_rng(seed)
    x_bthp = rng.standard_normal((BATCH, time, HEADS, HEAD_DIM))
    dt_bth = rng.uniform(*dt_range, (BATCH, time, HEADS))
    a_h = -np.exp(rng.standard_normal(HEADS))
    b_btgn = rng.standard_normal((BATCH, time, groups, STATE)) / np.sqrt(STATE)
    c_btgn = rng.standard_normal((BATCH, time, groups, STATE)) / np.sqrt(STATE)
    state_bhpn = rng.standard_normal((BATCH, HEADS, HEAD_DIM, STATE))
    return tuple(v.astype(np.float32) for v in (x_bthp, dt_bth, a_h, b_btgn, c_btgn, state_bhpn))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("time", [1, 7, CHUNK, 28, LONGEST], ids=["1", "7", "one_chunk", "3.5_chunks", "61"])
def test_chunked_matches_sequential(time, groups):
    """Oracle: the step-by-step recurrence. Covers padding (7, 28, 61) and the scan over chunks."""
    x, dt, a, b, c, _ = make_inputs(LONGEST, groups)
    y, final = chunked(x[:, :time], dt[:, :time], a, b[:, :time], c[:, :time], chunk_size=CHUNK)
    # The oracle always runs all LONGEST steps, so it compiles once per group count: the steps after `time`
    # get dt = 0, which in the recurrence is exactly the identity (decay exp(0) = 1, input 0), and y is causal.
    y_ref, final_ref = sequential(x, np.where(np.arange(LONGEST)[:, None] < time, dt, 0.0), a, b, c)
    assert y.shape == (BATCH, time, HEADS, HEAD_DIM) and y.dtype == jnp.float32
    assert final.shape == (BATCH, HEADS, HEAD_DIM, STATE) and final.dtype == jnp.float32
    assert max_diff(y, y_ref[:, :time]) <= TOL
    assert max_diff(final, final_ref) <= TOL


def test_initial_state():
    """Oracle: the recurrence started from the same state; the state must visibly change the output."""
    x, dt, a, b, c, state = make_inputs(28, 2)
    y, final = chunked(x, dt, a, b, c, chunk_size=CHUNK, initial_state_bhpn=state)
    y_ref, final_ref = sequential(x, dt, a, b, c, initial_state_bhpn=state)
    assert max_diff(y, y_ref) <= TOL
    assert max_diff(final, final_ref) <= TOL
    assert max_diff(y, chunked(x, dt, a, b, c, chunk_size=CHUNK)[0]) > 0.1


def test_chunk_size_invariance():
    """The chunk size is an implementation choice: 8, 16 and 64 (one padded chunk) give the same y and state."""
    x, dt, a, b, c, _ = make_inputs(LONGEST, 2)
    y8, final8 = chunked(x, dt, a, b, c, chunk_size=8)
    for chunk_size in (16, 64):
        y, final = chunked(x, dt, a, b, c, chunk_size=chunk_size)
        assert max_diff(y, y8) <= TOL
        assert max_diff(final, final8) <= TOL


@pytest.mark.parametrize(("time", "with_state"), [(CHUNK, False), (28, False), (28, True)],
                         ids=["one_chunk", "3.5_chunks", "3.5_chunks_initial_state"])
def test_matches_transformers(time, with_state):
    """Reference: transformers 5.23.0 `mamba2_chunk_scan` (its torch fallback) with dt_bias, softplus, clamp
    and D switched off. Measured max |diff| <= 3e-7 on y and final state, one chunk and 3.5 chunks alike:
    its multi-chunk path (a [c+1, c+1] segment-sum decay between chunks) agrees with our scan over chunks.
    """
    x, dt, a, b, c, state = make_inputs(time, 2, seed=1)
    initial = state if with_state else None
    y_ref, final_ref = mamba2_chunk_scan(
        *(torch.from_numpy(v) for v in (x, dt, a, b, c)), chunk_size=CHUNK, dt_bias=None, dt_softplus=False,
        D=None, dt_limit=(0.0, float("inf")), return_final_states=True,
        initial_states=None if initial is None else torch.from_numpy(initial))
    y, final = chunked(x, dt, a, b, c, chunk_size=CHUNK, initial_state_bhpn=initial)
    assert max_diff(y, y_ref.numpy()) <= TOL
    assert max_diff(final, final_ref.numpy()) <= TOL


def test_low_precision_inputs_compute_in_float32():
    """bfloat16 inputs are upcast before any arithmetic: the result is float32 and, being the same float32
    arithmetic, matches passing their float32 values (measured: bit-identical; TOL only allows other fusion)."""
    inputs = [jnp.asarray(v, jnp.bfloat16) for v in make_inputs(28, 2)[:5]]
    y, final = chunked(*inputs, chunk_size=CHUNK)
    y32, final32 = chunked(*(v.astype(jnp.float32) for v in inputs), chunk_size=CHUNK)
    assert y.dtype == final.dtype == jnp.float32
    assert max_diff(y, y32) <= TOL and max_diff(final, final32) <= TOL


def _weighted_sum(y_bthp, final_bhpn):
    """A scalar that every output position and state entry reaches, with fixed non-uniform weights."""
    w_bthp = jnp.cos(jnp.arange(y_bthp.size, dtype=jnp.float32)).reshape(y_bthp.shape)
    return jnp.sum(w_bthp * y_bthp) + jnp.sum(jnp.sin(final_bhpn))


def _chunked_loss(x, dt, a, b, c, state):
    return _weighted_sum(*ssd_chunked(x, dt, a, b, c, chunk_size=CHUNK, initial_state_bhpn=state))


def _sequential_loss(x, dt, a, b, c, state):
    return _weighted_sum(*ssd_sequential(x, dt, a, b, c, initial_state_bhpn=state))


# Gradients with respect to x, dt, A, B, C and the initial state.
grad_chunked = jax.jit(jax.grad(_chunked_loss, argnums=tuple(range(6))))
grad_sequential = jax.jit(jax.grad(_sequential_loss, argnums=tuple(range(6))))


def test_grad_matches_sequential():
    """Reference: autodiff through the sequential oracle. 1e-4 relative (to each gradient's largest entry):
    the backward pass sums many more float32 products than the forward; measured <= 4e-7.
    """
    inputs = make_inputs(28, 2)
    for grad, grad_ref in zip(grad_chunked(*inputs), grad_sequential(*inputs), strict=True):
        assert np.isfinite(np.asarray(grad)).all()
        assert max_diff(grad, grad_ref) <= 1e-4 * float(np.abs(np.asarray(grad_ref)).max())


def test_strong_decay_is_finite():
    """dt * A down to -50 a step, ~-200 over a chunk: exp underflows to 0 and, above the diagonal, exp of a naive
    cumsum difference overflows; nothing may become inf or NaN, in the values or the gradient (a segment sum
    masked after exp gives NaN gradients for dt and A here). Oracle: the sequential recurrence; 1e-5 absolute
    as above (|y| up to ~5, measured diff 5e-7). Same shapes as the tests above, so nothing new to compile.
    """
    x, dt, a, b, c, state = make_inputs(28, 2, dt_range=(0.01, 5.0))
    a = a * 20.0
    y, final = chunked(x, dt, a, b, c, chunk_size=CHUNK, initial_state_bhpn=state)
    y_ref, final_ref = sequential(x, dt, a, b, c, initial_state_bhpn=state)
    assert max_diff(y, y_ref) <= TOL and max_diff(final, final_ref) <= TOL
    assert all(np.isfinite(np.asarray(grad)).all() for grad in grad_chunked(x, dt, a, b, c, state))
