"""Mamba-2 SSD (state space duality) scan: the chunked form and its one-step-at-a-time oracle.

Both compute, per batch row and head, with the head's group supplying B and C:
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)      state [p, n]
    y_t     = state_t @ C_t                                             y [p]
This is transformers' `mamba2_chunk_scan` without dt_bias/softplus/clamp and without the D skip:
the caller passes the final dt and adds D * x itself.

Packed rows: with `runs_bt` (a run id per token, non-decreasing along the row, changing exactly where a new document
starts), the state starts from zero at each document's first token, as mamba_ssm's kernels do with their `seq_idx`:
    state_t = exp(dt_t * A) * state_{t-1} * [run_t == run_{t-1}] + dt_t * outer(x_t, B_t)
An initial state belongs to the first token's run.

Axes: b batch, t time, h heads, p head dim, g groups, r heads per group (h = g * r), n state size,
c chunks, l and s positions within a chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The state carries a whole sequence; TPU's default float32 matmul passes through bfloat16.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _segment_sum(x_sl: jax.Array) -> jax.Array:
    """[..., l] -> [..., l, l] with out[i, j] = sum(x[j+1 : i+1]) for j <= i and -inf above the diagonal."""
    length = x_sl.shape[-1]
    # A cumsum of masked copies rather than cumsum[i] - cumsum[j]: no cancellation between two large
    # partial sums, and the -inf goes in before exp, so no inf - inf NaN in the values or the gradient.
    x_ll = jnp.broadcast_to(x_sl[..., :, None], (*x_sl.shape, length))
    x_ll = jnp.where(jnp.tri(length, k=-1, dtype=bool), x_ll, 0.0)
    seg_ll = jnp.cumsum(x_ll, axis=-2)
    return jnp.where(jnp.tri(length, k=0, dtype=bool), seg_ll, -jnp.inf)


def _grouped(x_bthp, dt_bth, a_h, b_btgn, c_btgn, initial_state_bhpn):
    """Float32 copies with heads split into [g, r], so B and C are shared without repeating them."""
    batch, time, heads, head_dim = x_bthp.shape
    groups, state = b_btgn.shape[2], b_btgn.shape[3]
    if heads % groups:
        raise ValueError(f"ssd: {heads} heads do not split into {groups} groups of B/C; heads must be a multiple")
    per_group = heads // groups
    x_btgrp = x_bthp.astype(jnp.float32).reshape(batch, time, groups, per_group, head_dim)
    dt_btgr = dt_bth.astype(jnp.float32).reshape(batch, time, groups, per_group)
    a_gr = a_h.astype(jnp.float32).reshape(groups, per_group)
    if initial_state_bhpn is None:
        state_bgrpn = jnp.zeros((batch, groups, per_group, head_dim, state), jnp.float32)
    else:
        state_bgrpn = initial_state_bhpn.astype(jnp.float32).reshape(batch, groups, per_group, head_dim, state)
    return x_btgrp, dt_btgr, a_gr, b_btgn.astype(jnp.float32), c_btgn.astype(jnp.float32), state_bgrpn


def ssd_chunked(x_bthp, dt_bth, a_h, b_btgn, c_btgn, chunk_size: int, initial_state_bhpn=None, runs_bt=None):
    """Chunked SSD scan -> (y_bthp float32, final_state_bhpn float32); B, C [b, t, g, n], a_h [h]; runs_bt [b, t]
    (packed rows, see the module docstring) or None (one document per row)."""
    batch, time, heads, head_dim = x_bthp.shape
    x_btgrp, dt_btgr, a_gr, b_btgn, c_btgn, state_bgrpn = _grouped(
        x_bthp, dt_bth, a_h, b_btgn, c_btgn, initial_state_bhpn)
    state = state_bgrpn.shape[-1]

    # Padded steps have dt = 0: decay exp(0) = 1 and no input, so they leave the final state alone.
    pad = -time % chunk_size
    chunks = (time + pad) // chunk_size

    def to_chunks(v):
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(batch, chunks, chunk_size, *v.shape[2:])

    x_bclgrp, dt_bclgr, b_bclgn, c_bclgn = map(to_chunks, (x_btgrp, dt_btgr, b_btgn, c_btgn))
    xdt_bclgrp = x_bclgrp * dt_bclgr[..., None]
    da_bcgrl = jnp.moveaxis(dt_bclgr * a_gr, 2, -1)
    cum_bcgrl = jnp.cumsum(da_bcgrl, axis=-1)
    if runs_bt is None:
        runs_bt = jnp.zeros((batch, time), jnp.int32)
    # Padded steps continue the last run; each chunk's state enters from the run its previous chunk ended in (the
    # first chunk's, from the run of the row's first token).
    runs_bcl = jnp.pad(runs_bt, ((0, 0), (0, pad)), mode="edge").reshape(batch, chunks, chunk_size)
    entering_bc = jnp.concatenate([runs_bcl[:, :1, 0], runs_bcl[:, :-1, -1]], axis=1)

    # Within a chunk: the quadratic, attention-like form with decay exp(sum dA over (s, l]), between tokens of
    # one run only.
    same_bcls = runs_bcl[:, :, :, None] == runs_bcl[:, :, None, :]
    decay_bcgrls = jnp.where(same_bcls[:, :, None, None], jnp.exp(_segment_sum(da_bcgrl)), 0.0)
    scores_bcgls = _einsum("bclgn,bcsgn->bcgls", c_bclgn, b_bclgn)
    y_diag_bclgrp = _einsum("bcgls,bcgrls,bcsgrp->bclgrp", scores_bcgls, decay_bcgrls, xdt_bclgrp)

    # Each chunk's own contribution to the state at its end, from a zero start: its last run's tokens only.
    ends_run_bcl = runs_bcl == runs_bcl[:, :, -1:]
    to_end_bcgrl = jnp.where(ends_run_bcl[:, :, None, None], jnp.exp(cum_bcgrl[..., -1:] - cum_bcgrl), 0.0)
    chunk_state_bcgrpn = _einsum("bclgn,bcgrl,bclgrp->bcgrpn", b_bclgn, to_end_bcgrl, xdt_bclgrp)

    # Between chunks: a linear recurrence over chunks, O(chunks) instead of a [c, c] decay matrix; the carried
    # state survives a chunk only if its run lasts through it.
    def step(carry_bgrpn, inputs):
        chunk_decay_bgr, chunk_state_bgrpn, keeps_b = inputs
        kept_bgr = jnp.where(keeps_b[:, None, None], jnp.exp(chunk_decay_bgr), 0.0)
        return kept_bgr[..., None, None] * carry_bgrpn + chunk_state_bgrpn, carry_bgrpn

    keeps_bc = runs_bcl[:, :, -1] == entering_bc
    final_bgrpn, start_cbgrpn = jax.lax.scan(
        step, state_bgrpn, (jnp.moveaxis(cum_bcgrl[..., -1], 1, 0), jnp.moveaxis(chunk_state_bcgrpn, 1, 0),
                            jnp.moveaxis(keeps_bc, 1, 0)))

    # The state each chunk starts from, decayed to each position of its run and read out through C.
    from_start_bcgrl = jnp.where((runs_bcl == entering_bc[..., None])[:, :, None, None], jnp.exp(cum_bcgrl), 0.0)
    y_off_bclgrp = _einsum("bclgn,cbgrpn,bcgrl->bclgrp", c_bclgn, start_cbgrpn, from_start_bcgrl)

    y_bthp = (y_diag_bclgrp + y_off_bclgrp).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :time]
    return y_bthp, final_bgrpn.reshape(batch, heads, head_dim, state)


def _step(a_gr, state_bgrpn, x_bgrp, dt_bgr, b_bgn, c_bgn, new_b=None):
    """One token of the recurrence in the grouped layout (the state reset first where new_b is set)."""
    decay_bgr = jnp.exp(dt_bgr * a_gr)
    if new_b is not None:
        decay_bgr = jnp.where(new_b[:, None, None], 0.0, decay_bgr)
    state_bgrpn = decay_bgr[..., None, None] * state_bgrpn + _einsum("bgr,bgrp,bgn->bgrpn", dt_bgr, x_bgrp, b_bgn)
    return state_bgrpn, _einsum("bgrpn,bgn->bgrp", state_bgrpn, c_bgn)


def ssd_step(x_bhp, dt_bh, a_h, b_bgn, c_bgn, state_bhpn):
    """One new token per row continuing from `state_bhpn` (generation's decode step) -> (y_bhp, state_bhpn), both
    float32."""
    x_btgrp, dt_btgr, a_gr, b_btgn, c_btgn, state_bgrpn = _grouped(
        x_bhp[:, None], dt_bh[:, None], a_h, b_bgn[:, None], c_bgn[:, None], state_bhpn)
    state_bgrpn, y_bgrp = _step(a_gr, state_bgrpn, x_btgrp[:, 0], dt_btgr[:, 0], b_btgn[:, 0], c_btgn[:, 0])
    return y_bgrp.reshape(x_bhp.shape), state_bgrpn.reshape(state_bhpn.shape)


def ssd_sequential(x_bthp, dt_bth, a_h, b_btgn, c_btgn, initial_state_bhpn=None, runs_bt=None):
    """The same recurrence one step at a time (lax.scan over time), the state reset where the run changes: the
    test oracle -> (y_bthp, final_state_bhpn)."""
    batch, time, heads, head_dim = x_bthp.shape
    x_btgrp, dt_btgr, a_gr, b_btgn, c_btgn, state_bgrpn = _grouped(
        x_bthp, dt_bth, a_h, b_btgn, c_btgn, initial_state_bhpn)
    runs_bt = jnp.zeros((batch, time), jnp.int32) if runs_bt is None else runs_bt
    new_bt = jnp.concatenate([jnp.zeros((batch, 1), bool), runs_bt[:, 1:] != runs_bt[:, :-1]], axis=1)

    def step(state_bgrpn, inputs):
        x_bgrp, dt_bgr, b_bgn, c_bgn, new_b = inputs
        return _step(a_gr, state_bgrpn, x_bgrp, dt_bgr, b_bgn, c_bgn, new_b)

    final_bgrpn, y_tbgrp = jax.lax.scan(
        step, state_bgrpn, tuple(jnp.moveaxis(v, 1, 0) for v in (x_btgrp, dt_btgr, b_btgn, c_btgn, new_bt)))
    y_bthp = jnp.moveaxis(y_tbgrp, 0, 1).reshape(batch, time, heads, head_dim)
    return y_bthp, final_bgrpn.reshape(batch, heads, head_dim, state_bgrpn.shape[-1])
