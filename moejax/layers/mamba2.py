"""The Mamba-2 mixer of Nemotron-H, in transformers' order of operations.

in_proj splits into [z | x | B | C | dt]; a depthwise causal conv1d over xBC, then SiLU;
dt = clamp(softplus(dt + dt_bias)); A = -exp(A_log); the chunked SSD (B/C shared within groups);
the D skip; a gated RMSNorm per group (y * silu(z), normalised over d_inner / n_groups channels);
out_proj. Padding tokens are zeroed before the projection and again before the scan, so they
neither feed the convolution nor write to the state. In a packed row (segment ids 1, 2, ... per document) neither
the convolution nor the state crosses from one document into the next: each document reads only its own tokens,
as if it were alone. For generation, a cache keeps the last K - 1 convolution inputs and the SSM state (float32).

Tensor parallelism: the parameters are stored by B/C group (heads are numbered group-major, head i in group
i // (heads / groups)), and the groups split over the tensor axis, so each device runs whole groups end to end and
only out_proj's sum over groups crosses devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.layers.norms import rms_normalize
from moejax.layers.params import param
from moejax.layers.ssd import ssd_chunked, ssd_step


@struct.dataclass
class MambaCache:
    """One Mamba-2 layer's state after the tokens seen so far: the last K - 1 inputs of the convolution
    [batch, K - 1, conv channels] and the SSM state [batch, heads, head_dim, state] (float32)."""

    conv_bkc: jax.Array
    ssm_bhpn: jax.Array


def segment_runs(segments_bt: jax.Array) -> jax.Array:
    """[b, t] int32: a run id that changes exactly where the segment id does (a new document, or padding)."""
    changes_bt = jnp.concatenate([jnp.zeros_like(segments_bt[:, :1], dtype=bool),
                                  segments_bt[:, 1:] != segments_bt[:, :-1]], axis=1)
    return jnp.cumsum(changes_bt, axis=1, dtype=jnp.int32)


def causal_depthwise_conv(x_btc: jax.Array, w_ck: jax.Array, bias_c: jax.Array | None,
                          runs_bt: jax.Array | None = None, history_bkc: jax.Array | None = None) -> jax.Array:
    """out[t, c] = sum_k w[c, k] * x[t - K + 1 + k, c] (+ bias) -> float32 [b, t, c], over earlier tokens of t's own run
    only (zeros before the start of the row or of the run); history_bkc: the K - 1 inputs before the row (a
    generation cache) in place of those zeros, read by every token (no runs)."""
    kernel = w_ck.shape[-1]
    t = x_btc.shape[1]
    # Products and sums in float32 whatever the dtype, as a convolution kernel accumulates (in bfloat16 each of the
    # 2K - 1 steps would round).
    f32 = jnp.float32
    w_ck = w_ck.astype(f32)
    bias = 0.0 if bias_c is None else bias_c.astype(f32)
    if history_bkc is not None:
        x_pad = jnp.concatenate([history_bkc.astype(f32), x_btc.astype(f32)], axis=1)
        return sum(x_pad[:, k:k + t] * w_ck[:, k] for k in range(kernel)) + bias
    x_pad = jnp.pad(x_btc.astype(f32), ((0, 0), (kernel - 1, 0), (0, 0)))
    if runs_bt is None:
        return sum(x_pad[:, k:k + t] * w_ck[:, k] for k in range(kernel)) + bias
    runs_pad = jnp.pad(runs_bt, ((0, 0), (kernel - 1, 0)), constant_values=-1)
    return sum(jnp.where((runs_pad[:, k:k + t] == runs_bt)[..., None], x_pad[:, k:k + t], 0) * w_ck[:, k]
               for k in range(kernel)) + bias


class Mamba2Mixer(nnx.Module):
    """[batch, seq, hidden] -> [batch, seq, hidden] through the selective state space."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, state: int, n_groups: int, conv_kernel: int,
                 chunk_size: int, *, conv_bias: bool, eps: float, dt_limits: tuple[float, float], dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if num_heads % n_groups:
            raise ValueError(f"Mamba-2: {num_heads} heads do not split into {n_groups} groups of B/C")
        self.num_heads, self.head_dim, self.state, self.n_groups = num_heads, head_dim, state, n_groups
        self.chunk_size, self.eps, self.dt_limits = chunk_size, eps, dt_limits
        g, r, p, n = n_groups, num_heads // n_groups, head_dim, state
        # Every parameter is stored group-major: group j's slice holds its r heads' z, x and dt columns, its B and C,
        # their convolution channels, norm weights and out_proj rows (transformers' concatenated [z | x | B | C | dt]
        # is reordered on load). So the groups split over tensor with no other data on a device, and each device's
        # projection is still one fused matmul (slicing five outputs from it is faster than five matmuls).
        self.in_proj_dgw = param(rngs, (hidden, g, 2 * r * p + 2 * n + r), ("embed", "mamba_groups", "mamba_group_in"),
                                 dtype, fan_in=hidden)
        self.conv_gck = param(rngs, (g, r * p + 2 * n, conv_kernel), ("mamba_groups", "mamba_group_conv",
                                                                      "conv_kernel"), dtype, fan_in=conv_kernel)
        if conv_bias:
            self.conv_bias_gc = param(rngs, (g, r * p + 2 * n), ("mamba_groups", "mamba_group_conv"), dtype,
                                      init="zeros")
        self.conv_bias = conv_bias
        heads = ("mamba_groups", "mamba_group_heads")
        self.dt_bias_gr = param(rngs, (g, r), heads, dtype, init="zeros")
        self.a_log_gr = param(rngs, (g, r), heads, dtype, init="zeros")
        self.d_gr = param(rngs, (g, r), heads, dtype, init="ones")
        self.norm_gi = param(rngs, (g, r * p), ("mamba_groups", "mamba_group_inner"), dtype, init="ones")
        self.out_proj_gid = param(rngs, (g, r * p, hidden), ("mamba_groups", "mamba_group_inner", "embed"), dtype,
                                  fan_in=num_heads * head_dim)

    def cache(self, batch: int, length: int, dtype) -> MambaCache:
        """The state before any token (`length`, the attention layers' cache length, is not needed here)."""
        groups, channels, kernel = self.conv_gck.shape[-3:]
        return MambaCache(jnp.zeros((batch, kernel - 1, groups * channels), dtype),
                          jnp.zeros((batch, self.num_heads, self.head_dim, self.state), jnp.float32))

    def __call__(self, x_btd: jax.Array, segments_bt: jax.Array,
                 cache: MambaCache | None = None) -> jax.Array | tuple[jax.Array, MambaCache]:
        """[batch, seq, hidden] -> [batch, seq, hidden]; segments_bt [batch, seq]: 0 padding, else the document.
        With a cache (one sequence per row, left padding allowed): the tokens continue from it, and the updated
        cache comes back too; a single token takes the recurrence's one-step form."""
        b, t, _ = x_btd.shape
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state
        r = h // g
        keep_bt1 = (segments_bt != 0)[..., None].astype(x_btd.dtype)
        runs_bt = segment_runs(segments_bt)
        proj_btgw = jnp.einsum("btd,dgw->btgw", x_btd * keep_bt1, self.in_proj_dgw[...])
        z_btgi, xbc_btgc, dt_btgr = jnp.split(proj_btgw, [r * p, 2 * r * p + 2 * n], axis=-1)
        # The convolution's channels, group-major ([g, x | B | C] flattened; depthwise, so the order is free).
        xbc_btc = xbc_btgc.reshape(b, t, -1)
        conv_bias = self.conv_bias_gc[...].reshape(-1) if self.conv_bias else None
        history_bkc = None if cache is None else cache.conv_bkc
        conv_btc = causal_depthwise_conv(xbc_btc, self.conv_gck[...].reshape(-1, self.conv_gck.shape[-1]),
                                         conv_bias, runs_bt, history_bkc)
        if cache is not None:
            kept = self.conv_gck.shape[-1] - 1
            window_bkc = jnp.concatenate([cache.conv_bkc, xbc_btc.astype(cache.conv_bkc.dtype)], axis=1)
            cache = cache.replace(conv_bkc=window_bkc[:, window_bkc.shape[1] - kept:])
        # SiLU in float32 on the float32 convolution, rounded once to the model dtype.
        xbc_btgc = (jax.nn.silu(conv_btc).astype(x_btd.dtype) * keep_bt1).reshape(b, t, g, -1)
        xs_btgi, b_btgn, c_btgn = jnp.split(xbc_btgc, [r * p, r * p + n], axis=-1)
        dt_bth = dt_btgr.reshape(b, t, h).astype(jnp.float32) + self.dt_bias_gr[...].reshape(h).astype(jnp.float32)
        dt_bth = jnp.clip(jax.nn.softplus(dt_bth), *self.dt_limits)
        a_h = -jnp.exp(self.a_log_gr[...].reshape(h).astype(jnp.float32))
        xs_bthp = xs_btgi.reshape(b, t, h, p).astype(jnp.float32)
        if cache is not None and t == 1:
            y_bhp, state_bhpn = ssd_step(xs_bthp[:, 0], dt_bth[:, 0], a_h, b_btgn[:, 0], c_btgn[:, 0],
                                         cache.ssm_bhpn)
            y_bthp = y_bhp[:, None]
        else:
            y_bthp, state_bhpn = ssd_chunked(xs_bthp, dt_bth, a_h, b_btgn, c_btgn, self.chunk_size,
                                             None if cache is None else cache.ssm_bhpn, runs_bt=runs_bt)
        y_bthp = y_bthp + self.d_gr[...].reshape(h).astype(jnp.float32)[:, None] * xs_bthp
        # The gated RMSNorm normalises each group's r * p channels.
        gated_btgi = y_bthp.reshape(b, t, g, r * p) * jax.nn.silu(z_btgi.astype(jnp.float32))
        normed_btgi = self.norm_gi[...].astype(jnp.float32) * rms_normalize(gated_btgi, self.eps)
        y_btd = jnp.einsum("btgi,gid->btd", normed_btgi.astype(x_btd.dtype), self.out_proj_gid[...])
        return y_btd if cache is None else (y_btd, cache.replace(ssm_bhpn=state_bhpn))
