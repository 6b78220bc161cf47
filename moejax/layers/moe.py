"""Mixture-of-Experts: routing, dropless sorted dispatch, grouped matmul, and the expert weights.

Dispatch sorts the (token, slot) pairs by expert and multiplies each expert's group by that expert's
weights; no token is dropped and no expert runs on tokens it was not given. The grouped matmul has
two paths, chosen by `dispatch_tile` alone:
- TPU/GPU: `jax.lax.ragged_dot` over contiguous groups (tile 1, no padding);
- CPU: ragged_dot is ~70x slower than a dense matmul there, so each expert's group is padded to a
  multiple of a row tile and a loop over the used tiles runs one dense [tile, d] x [d, f] matmul
  each (the loop's trip count is the number of used tiles, so padding costs at most tile-1 rows per
  expert).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax.layers.mlp import activate
from moejax.layers.params import param


@struct.dataclass
class RouterOutput:
    """One MoE layer's routing: raw float32 logits [tokens, E], chosen ids and combine weights [tokens, k]."""

    logits: jax.Array
    expert_ids: jax.Array
    weights: jax.Array


def softmax_topk(logits_te: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Qwen3-MoE routing: float32 softmax, top-k, optional renormalisation -> weights, ids [tokens, k]."""
    probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    weights_tk, ids_tk = jax.lax.top_k(probs_te, k)
    if normalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return weights_tk, ids_tk.astype(jnp.int32)


def dispatch_tile(num_rows: int, num_experts: int) -> int:
    """Rows per tile of the grouped matmul for the default backend: 1 means ragged_dot."""
    if jax.default_backend() != "cpu":
        return 1
    # Big enough to keep each matmul efficient, small enough that padding (<= tile-1 rows per
    # expert) stays a small share of the rows each expert gets on average.
    per_expert = max(num_rows // num_experts, 1)
    return int(min(64, max(8, 1 << (per_expert.bit_length() - 1))))


@struct.dataclass
class Dispatch:
    """Where each (token, slot) pair lives once grouped by expert (groups padded to `tile` rows)."""

    source_token_m: jax.Array  # [rows] token feeding each grouped row; num_tokens marks an empty row
    row_tk: jax.Array  # [tokens, k] grouped row holding each pair's output
    group_sizes_e: jax.Array  # [E] rows per expert, each a multiple of tile
    tile: int = struct.field(pytree_node=False)


def plan_dispatch(ids_tk: jax.Array, num_experts: int, tile: int) -> Dispatch:
    """Sorts the pairs by expert; each expert's group starts at a multiple of `tile`."""
    tokens, k = ids_tk.shape
    pairs = tokens * k
    flat_m = ids_tk.reshape(pairs)
    order_m = jnp.argsort(flat_m, stable=True)
    counts_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    padded_e = (counts_e + tile - 1) // tile * tile
    sorted_e = flat_m[order_m]
    rank_m = jnp.arange(pairs, dtype=jnp.int32) - (jnp.cumsum(counts_e) - counts_e)[sorted_e]
    dest_m = (jnp.cumsum(padded_e) - padded_e)[sorted_e] + rank_m
    rows = pairs if tile == 1 else -(-(pairs + num_experts * (tile - 1)) // tile) * tile
    source = jnp.full((rows,), tokens, jnp.int32).at[dest_m].set(order_m // k)
    row_tk = jnp.zeros((pairs,), jnp.int32).at[order_m].set(dest_m).reshape(tokens, k)
    return Dispatch(source_token_m=source, row_tk=row_tk, group_sizes_e=padded_e, tile=tile)


def grouped_matmul(lhs_md: jax.Array, rhs_edf: jax.Array, group_sizes_e: jax.Array, tile: int) -> jax.Array:
    """Rows of lhs in consecutive expert groups times their expert's [d, f] matrix -> [rows, f]."""
    if tile == 1:
        return jax.lax.ragged_dot(lhs_md, rhs_edf, group_sizes_e)
    return _tiled_matmul(lhs_md, rhs_edf, group_sizes_e, tile)


def _tile_experts(group_sizes_e: jax.Array, num_tiles: int, tile: int) -> tuple[jax.Array, jax.Array]:
    tile_ends_e = jnp.cumsum(group_sizes_e) // tile
    return jnp.searchsorted(tile_ends_e, jnp.arange(num_tiles), side="right"), tile_ends_e[-1]


def _tiled_forward(lhs_md, rhs_edf, group_sizes_e, tile):
    rows, f = lhs_md.shape[0], rhs_edf.shape[-1]
    tile_expert, used = _tile_experts(group_sizes_e, rows // tile, tile)

    def body(i, out_mf):
        lhs_td = jax.lax.dynamic_slice_in_dim(lhs_md, i * tile, tile)
        out_tf = jnp.dot(lhs_td, rhs_edf[tile_expert[i]], preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out_mf, out_tf.astype(out_mf.dtype), i * tile, 0)

    return jax.lax.fori_loop(0, used, body, jnp.zeros((rows, f), lhs_md.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_matmul(lhs_md, rhs_edf, group_sizes_e, tile):
    return _tiled_forward(lhs_md, rhs_edf, group_sizes_e, tile)


def _tiled_fwd(lhs_md, rhs_edf, group_sizes_e, tile):
    return _tiled_forward(lhs_md, rhs_edf, group_sizes_e, tile), (lhs_md, rhs_edf, group_sizes_e)


def _tiled_bwd(tile, residuals, dout_mf):
    lhs_md, rhs_edf, group_sizes_e = residuals
    dlhs_md = _tiled_forward(dout_mf, jnp.swapaxes(rhs_edf, 1, 2), group_sizes_e, tile)
    tile_expert, used = _tile_experts(group_sizes_e, lhs_md.shape[0] // tile, tile)

    def body(i, drhs_edf):
        lhs_td = jax.lax.dynamic_slice_in_dim(lhs_md, i * tile, tile)
        dout_tf = jax.lax.dynamic_slice_in_dim(dout_mf, i * tile, tile)
        grad_df = jnp.dot(lhs_td.T, dout_tf, preferred_element_type=jnp.float32)
        return drhs_edf.at[tile_expert[i]].add(grad_df)

    drhs_edf = jax.lax.fori_loop(0, used, body, jnp.zeros(rhs_edf.shape, jnp.float32))
    return dlhs_md, drhs_edf.astype(rhs_edf.dtype), None


_tiled_matmul.defvjp(_tiled_fwd, _tiled_bwd)


class Experts(nnx.Module):
    """E feed-forward experts, "swiglu" (gate, up, down) or "relu2" (up, down), run dropless."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, *, activation: str = "swiglu",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        e, d, f = num_experts, hidden, ffn
        self.activation = activation
        if activation == "swiglu":
            self.gate_edf = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dtype, fan_in=d)
        self.up_edf = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dtype, fan_in=d)
        self.down_efd = param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), dtype, fan_in=f)

    def __call__(self, x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array) -> jax.Array:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [tokens, hidden]."""
        tokens, k = ids_tk.shape
        num_experts = self.up_edf.shape[0]
        plan = plan_dispatch(ids_tk, num_experts, dispatch_tile(tokens * k, num_experts))
        x_md = jnp.concatenate([x_td, jnp.zeros_like(x_td[:1])])[plan.source_token_m]
        up_mf = grouped_matmul(x_md, self.up_edf[...], plan.group_sizes_e, plan.tile)
        gate_mf = (grouped_matmul(x_md, self.gate_edf[...], plan.group_sizes_e, plan.tile)
                   if self.activation == "swiglu" else None)
        h_mf = activate(self.activation, up_mf, gate_mf)
        y_md = grouped_matmul(h_mf, self.down_efd[...], plan.group_sizes_e, plan.tile)
        y_tkd = y_md[plan.row_tk]
        return jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(y_tkd.dtype))


class Router(nnx.Module):
    """Linear router; its logits are computed in float32 whatever the parameter dtype."""

    def __init__(self, hidden: int, num_experts: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w_de = param(rngs, (hidden, num_experts), ("embed", "expert_router"), dtype)

    def __call__(self, x_td: jax.Array) -> jax.Array:
        """[tokens, hidden] -> float32 logits [tokens, E]."""
        return jnp.dot(x_td.astype(jnp.float32), self.w_de[...].astype(jnp.float32))


class SoftmaxMoE(nnx.Module):
    """Qwen3-MoE sparse block: softmax top-k router over SwiGLU experts."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, normalize: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.top_k, self.normalize = top_k, normalize
        self.router = Router(hidden, num_experts, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, hidden, ffn, activation="swiglu", dtype=dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, RouterOutput]:
        """[batch, seq, hidden] -> output [batch, seq, hidden] and the routing of its b*s tokens."""
        b, s, d = x_btd.shape
        x_td = x_btd.reshape(b * s, d)
        logits_te = self.router(x_td)
        weights_tk, ids_tk = softmax_topk(logits_te, self.top_k, self.normalize)
        y_td = self.experts(x_td, ids_tk, weights_tk)
        return y_td.reshape(b, s, d), RouterOutput(logits_te, ids_tk, weights_tk)
