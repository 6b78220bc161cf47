"""Rotary position embeddings (default, linear and yarn scaling), following transformers' formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies for the configured scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "yarn":
        return _yarn(rope, head_dim, pos_freqs)
    return inv_freq


def _yarn(rope: RopeConfig, dim: int, pos_freqs: np.ndarray) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)


def rope_tables(positions_bt: jax.Array, inv_freq_h: np.ndarray, mscale: float, dtype) -> tuple[jax.Array, ...]:
    """cos, sin [batch, seq, head_dim] for integer positions, computed in float32."""
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
    emb_bth = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return (jnp.cos(emb_bth) * mscale).astype(dtype), (jnp.sin(emb_bth) * mscale).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotates the two halves of head_dim (transformers' rotate_half convention)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
