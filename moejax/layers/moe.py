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


def grouped_mlp(x_md: jax.Array, w: dict[str, jax.Array], group_sizes_e: jax.Array, tile: int,
                activation: str) -> jax.Array:
    """Each expert's feed-forward on its group of rows: down(act(up(x), gate(x))) -> [rows, d].

    `w` holds "up_edf", "down_efd" and, for swiglu, "gate_edf".
    """
    if tile == 1:
        def project(name, a):
            return jax.lax.ragged_dot(a, w[name], group_sizes_e)

        gate = project("gate_edf", x_md) if "gate_edf" in w else None
        return project("down_efd", activate(activation, project("up_edf", x_md), gate))
    return _tiled_mlp(x_md, w, group_sizes_e, tile, activation)


def _for_each_expert(group_sizes_e: jax.Array, tile: int, run_expert, carry):
    """carry = run_expert(e, first_tile, end_tile, carry) for each expert e that has rows, in order.

    The callee slices its expert's weights once for all its tiles; empty experts cost nothing.
    """
    tile_end_e = jnp.cumsum(group_sizes_e) // tile
    tile_start_e = tile_end_e - group_sizes_e // tile
    busy_e = jnp.argsort(group_sizes_e == 0, stable=True)

    def expert(j, carry):
        e = busy_e[j]
        return run_expert(e, tile_start_e[e], tile_end_e[e], carry)

    return jax.lax.fori_loop(0, jnp.sum(group_sizes_e > 0), expert, carry)


def _tile_mlp(x_td, w_e, activation):
    up = jnp.dot(x_td, w_e["up_edf"], preferred_element_type=jnp.float32)
    gate = jnp.dot(x_td, w_e["gate_edf"], preferred_element_type=jnp.float32) if "gate_edf" in w_e else None
    return up, gate


def _tiled_forward(x_md, w, group_sizes_e, tile, activation):
    def run_expert(e, first, end, out_md):
        w_e = {name: value[e] for name, value in w.items()}

        def body(i, out_md):
            x_td = jax.lax.dynamic_slice_in_dim(x_md, i * tile, tile)
            h_tf = activate(activation, *_tile_mlp(x_td, w_e, activation)).astype(x_md.dtype)
            y_td = jnp.dot(h_tf, w_e["down_efd"], preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(out_md, y_td.astype(out_md.dtype), i * tile, 0)

        return jax.lax.fori_loop(first, end, body, out_md)

    return _for_each_expert(group_sizes_e, tile, run_expert, jnp.zeros_like(x_md))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_mlp(x_md, w, group_sizes_e, tile, activation):
    return _tiled_forward(x_md, w, group_sizes_e, tile, activation)


def _tiled_mlp_fwd(x_md, w, group_sizes_e, tile, activation):
    return _tiled_forward(x_md, w, group_sizes_e, tile, activation), (x_md, w, group_sizes_e)


def _tiled_mlp_bwd(tile, activation, residuals, dy_md):
    """Recomputes each tile's activations; weight gradients accumulate per expert in float32."""
    x_md, w, group_sizes_e = residuals
    f32 = jnp.float32

    def tile_grads(w_e, i, carry):
        dx_md, dw_e = carry
        x_td = jax.lax.dynamic_slice_in_dim(x_md, i * tile, tile)
        dy_td = jax.lax.dynamic_slice_in_dim(dy_md, i * tile, tile).astype(f32)
        h_tf, act_vjp = jax.vjp(lambda u, g: activate(activation, u, g), *_tile_mlp(x_td, w_e, activation))
        d_up, d_gate = act_vjp(dy_td @ w_e["down_efd"].astype(f32).T)
        x32 = x_td.astype(f32)
        grads = {"up_edf": x32.T @ d_up, "down_efd": h_tf.T @ dy_td}
        dx_td = d_up @ w_e["up_edf"].astype(f32).T
        if d_gate is not None:
            grads["gate_edf"] = x32.T @ d_gate
            dx_td = dx_td + d_gate @ w_e["gate_edf"].astype(f32).T
        dx_md = jax.lax.dynamic_update_slice_in_dim(dx_md, dx_td.astype(dx_md.dtype), i * tile, 0)
        return dx_md, {name: dw_e[name] + grads[name] for name in dw_e}

    def run_expert(e, first, end, carry):
        dx_md, dw = carry
        w_e = {name: value[e] for name, value in w.items()}
        zeros = {name: jnp.zeros(value.shape[1:], f32) for name, value in w.items()}
        dx_md, dw_e = jax.lax.fori_loop(first, end, functools.partial(tile_grads, w_e), (dx_md, zeros))
        return dx_md, {name: dw[name].at[e].set(dw_e[name]) for name in dw}

    dw0 = {name: jnp.zeros(value.shape, f32) for name, value in w.items()}
    dx_md, dw = _for_each_expert(group_sizes_e, tile, run_expert, (jnp.zeros_like(x_md), dw0))
    return dx_md, {name: dw[name].astype(w[name].dtype) for name in w}, None


_tiled_mlp.defvjp(_tiled_mlp_fwd, _tiled_mlp_bwd)


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
        w = {"up_edf": self.up_edf[...], "down_efd": self.down_efd[...]}
        if self.activation == "swiglu":
            w["gate_edf"] = self.gate_edf[...]
        y_md = grouped_mlp(x_md, w, plan.group_sizes_e, plan.tile, self.activation)
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
