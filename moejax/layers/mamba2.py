"""The Mamba-2 mixer of Nemotron-H, in transformers' order of operations.

in_proj splits into [z | x | B | C | dt]; a depthwise causal conv1d over xBC, then SiLU;
dt = clamp(softplus(dt + dt_bias)); A = -exp(A_log); the chunked SSD (B/C shared within groups);
the D skip; a gated RMSNorm per group (y * silu(z), normalised over d_inner / n_groups channels);
out_proj. Padding tokens are zeroed before the projection and again before the scan, so they
neither feed the convolution nor write to the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.norms import rms_normalize
from moejax.layers.params import param
from moejax.layers.ssd import ssd_chunked


def causal_depthwise_conv(x_btc: jax.Array, w_ck: jax.Array, bias_c: jax.Array | None) -> jax.Array:
    """out[t, c] = sum_k w[c, k] * x[t - K + 1 + k, c] (+ bias), zeros before the start -> [b, t, c]."""
    kernel = w_ck.shape[-1]
    x_pad = jnp.pad(x_btc, ((0, 0), (kernel - 1, 0), (0, 0)))
    t = x_btc.shape[1]
    out_btc = sum(x_pad[:, k:k + t] * w_ck[:, k] for k in range(kernel))
    return out_btc if bias_c is None else out_btc + bias_c


class Mamba2Mixer(nnx.Module):
    """[batch, seq, hidden] -> [batch, seq, hidden] through the selective state space."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, state: int, n_groups: int, conv_kernel: int,
                 chunk_size: int, *, conv_bias: bool, eps: float, dt_limits: tuple[float, float], dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.state, self.n_groups = num_heads, head_dim, state, n_groups
        self.chunk_size, self.eps, self.dt_limits = chunk_size, eps, dt_limits
        inner = num_heads * head_dim
        conv_channels = inner + 2 * n_groups * state
        # One fused projection: the five outputs are sliced from it, which is faster than five matmuls.
        self.in_proj_dp = param(rngs, (hidden, inner + conv_channels + num_heads), ("embed", "mamba_in"), dtype)
        self.conv_ck = param(rngs, (conv_channels, conv_kernel), ("mamba_conv", "conv_kernel"), dtype,
                             fan_in=conv_kernel)
        if conv_bias:
            self.conv_bias_c = param(rngs, (conv_channels,), ("mamba_conv",), dtype, init="zeros")
        self.conv_bias = conv_bias
        self.dt_bias_h = param(rngs, (num_heads,), ("mamba_heads",), dtype, init="zeros")
        self.a_log_h = param(rngs, (num_heads,), ("mamba_heads",), dtype, init="zeros")
        self.d_h = param(rngs, (num_heads,), ("mamba_heads",), dtype, init="ones")
        self.norm_i = param(rngs, (inner,), ("mamba_inner",), dtype, init="ones")
        self.out_proj_id = param(rngs, (inner, hidden), ("mamba_inner", "embed"), dtype)

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> jax.Array:
        b, t, _ = x_btd.shape
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state
        inner = h * p
        keep_bt1 = valid_bt[..., None].astype(x_btd.dtype)
        proj_btp = (x_btd * keep_bt1) @ self.in_proj_dp[...]
        z_bti, xbc_btc, dt_bth = jnp.split(proj_btp, [inner, proj_btp.shape[-1] - h], axis=-1)
        conv_bias = self.conv_bias_c[...] if self.conv_bias else None
        xbc_btc = jax.nn.silu(causal_depthwise_conv(xbc_btc, self.conv_ck[...], conv_bias)) * keep_bt1
        xs_bti, b_btm, c_btm = jnp.split(xbc_btc, [inner, inner + g * n], axis=-1)
        dt_bth = jax.nn.softplus(dt_bth.astype(jnp.float32) + self.dt_bias_h[...].astype(jnp.float32))
        dt_bth = jnp.clip(dt_bth, *self.dt_limits)
        a_h = -jnp.exp(self.a_log_h[...].astype(jnp.float32))
        xs_bthp = xs_bti.reshape(b, t, h, p).astype(jnp.float32)
        y_bthp, _ = ssd_chunked(xs_bthp, dt_bth, a_h, b_btm.reshape(b, t, g, n), c_btm.reshape(b, t, g, n),
                                self.chunk_size)
        y_bthp = y_bthp + self.d_h[...].astype(jnp.float32)[:, None] * xs_bthp
        gated_bti = y_bthp.reshape(b, t, inner) * jax.nn.silu(z_bti.astype(jnp.float32))
        normed_bti = rms_normalize(gated_bti.reshape(b, t, g, inner // g), self.eps).reshape(b, t, inner)
        normed_bti = self.norm_i[...].astype(jnp.float32) * normed_bti
        return normed_bti.astype(x_btd.dtype) @ self.out_proj_id[...]
