"""Mixture-of-Experts: routing, dropless sorted dispatch, the expert computation, and the expert weights.

Dispatch sorts the (token, slot) pairs by expert; each expert multiplies only its own rows, no token
is dropped, and no expert runs on tokens it was not given. `dispatch_tiles` alone picks the path:
- TPU/GPU: gather the rows, three `jax.lax.ragged_dot`s over contiguous expert groups, combine.
- CPU, where ragged_dot runs ~70x slower than a dense matmul: each expert's rows go through dense
  tiles of a few fixed sizes (full tiles of the largest, then at most one of each smaller size, so
  padding is under the smallest tile per expert). One loop over the busy experts does, per tile,
  the gather of its token rows, the whole expert MLP, and the weighted scatter-add into the output,
  so no [rows, d] intermediate is ever materialised (fresh large buffers cost page faults here).
  A custom VJP recomputes each tile's activations for the backward pass.

Expert weights, as `mix_experts` takes them in `w`: gate_edf [E, d, f] (gated activations), up_edf [E, d, f],
down_efd [E, f, d] and, for experts with biases (GPT-OSS), gate_bias_ef [E, f] (gated activations), up_bias_ef [E, f]
and down_bias_ed [E, d]: expert e computes down(act(x up_e + up_bias_e, x gate_e + gate_bias_e)) + down_bias_e.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from moejax.layers.mlp import GPT_OSS_SWIGLU, MLP, ClampedSwiGLU, activate, has_gate
from moejax.layers.params import param
from moejax.parallel.mesh import BATCH_AXES


@struct.dataclass
class RouterOutput:
    """One MoE layer's routing: raw float32 logits [tokens, E], chosen ids and combine weights [tokens, k]."""

    logits: jax.Array
    expert_ids: jax.Array
    weights: jax.Array


# The router logit of an expert that training may not route to (docs/training.md, training only some experts): large,
# negative and finite, so its softmax probability and sigmoid score are 0 without a NaN.
RESTRICTED = -1e9


def steering_noise(noise_key_2: jax.Array, position_t: jax.Array, experts: int, eps_std) -> jax.Array:
    """Hard steering's eps (docs/steering.md, eq. 5): a signed N(0, eps_std^2) draw per token and expert, [t, E]
    float32, from the layer's key folded with the token's position in its document, so a token's eps does not depend
    on the batch, the padding or the packing around it (the PyTorch reference draws the same numbers)."""
    key = jax.random.wrap_key_data(jnp.asarray(noise_key_2, jnp.uint32))
    draw = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(key, p), (experts,), jnp.float32))
    return draw(jnp.asarray(position_t, jnp.int32)) * jnp.asarray(eps_std, jnp.float32)


@struct.dataclass
class RouterControl:
    """Changes to one MoE layer's routing, given as arrays so that new values never recompile.

    Forcing: the tokens where `force_mask` [tokens] is set get the experts `force_ids` [tokens, k] instead of their
    top-k (their combine weights are still the router's own scores of those experts, normalised as usual).
    Steering (docs/steering.md, steering), on every token's raw router logits z [E] before the softmax or sigmoid:
    z + shift_e * std(z) (soft; std over the E logits, population), then experts in promote_e set to max(z) + eps
    and experts in suppress_e to min(z) - eps (hard, paper (b)'s eq. 5; max and min of the unsteered z; eps a signed
    N(0, eps_std^2) draw per token and expert, steering_noise from noise_key and the tokens' position_t, which the
    model's forward fills in). Where a selection score other than the logits decides (the sigmoid router's
    correction bias and group limit), `choose` applies hard steering to those scores as well.
    """

    force_ids: jax.Array | None = None
    force_mask: jax.Array | None = None
    shift_e: jax.Array | None = None
    promote_e: jax.Array | None = None
    suppress_e: jax.Array | None = None
    noise_key: jax.Array | None = None  # [2] uint32: the layer's key data for eps
    eps_std: jax.Array | None = None  # scalar float32: eps's standard deviation
    position_t: jax.Array | None = None  # [tokens] int32: each token's position in its document
    # Training only (--route-to-trained): the other experts' logits set to RESTRICTED (and, for a sigmoid router with
    # a selection-only bias, their choice scores to -inf, so the bias cannot choose them either).
    allowed_e: jax.Array | None = None

    def eps(self, tokens: int, experts: int) -> jax.Array:
        """eps [tokens, E] for these tokens (zeros where no position was given: a single block run alone)."""
        position_t = jnp.zeros((tokens,), jnp.int32) if self.position_t is None else self.position_t
        return steering_noise(self.noise_key, position_t, experts, self.eps_std)

    def steer(self, logits_te: jax.Array) -> jax.Array:
        """The logits the router chooses with: steered (and restricted) when this control says so, else as they
        are."""
        if self.shift_e is not None:
            z_te = logits_te.astype(jnp.float32)
            steered_te = z_te + self.shift_e * jnp.std(z_te, axis=-1, keepdims=True)
            eps_te = self.eps(*z_te.shape)
            steered_te = jnp.where(self.promote_e, jnp.max(z_te, axis=-1, keepdims=True) + eps_te, steered_te)
            logits_te = jnp.where(self.suppress_e, jnp.min(z_te, axis=-1, keepdims=True) - eps_te, steered_te)
        if self.allowed_e is not None:
            logits_te = jnp.where(self.allowed_e, logits_te, jnp.asarray(RESTRICTED, logits_te.dtype))
        return logits_te

    def choose(self, choice_te: jax.Array) -> jax.Array:
        """Hard steering on selection scores [tokens, E] (the sigmoid router's biased scores, before its group
        limit): promoted experts above every other expert (max + 1 + eps, eps ordering them among themselves; their
        groups lead the group limit, and sigmoid_group_topk lets them pass it) and suppressed ones at -inf, so a
        promoted expert is chosen at every token unless more than k are promoted, and a suppressed one never."""
        if self.promote_e is None:
            return choice_te
        top_t1 = jnp.max(jnp.where(jnp.isfinite(choice_te), choice_te, -jnp.inf), axis=-1, keepdims=True)
        choice_te = jnp.where(self.promote_e, top_t1 + 1.0 + self.eps(*choice_te.shape), choice_te)
        return jnp.where(self.suppress_e, -jnp.inf, choice_te)

    def select(self, ids_tk: jax.Array) -> jax.Array:
        """The experts each token uses: its top-k, or the forced ones."""
        if self.force_mask is None:
            return ids_tk
        return jnp.where(self.force_mask[:, None], self.force_ids.astype(ids_tk.dtype), ids_tk)


def softmax_topk(logits_te: jax.Array, k: int, normalize: bool,
                 control: RouterControl | None = None) -> tuple[jax.Array, jax.Array]:
    """Qwen3-MoE routing: float32 softmax, top-k, optional renormalisation -> weights, ids [tokens, k]."""
    probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    _, ids_tk = jax.lax.top_k(probs_te, k)
    if control is not None:
        ids_tk = control.select(ids_tk)
    weights_tk = jnp.take_along_axis(probs_te, ids_tk, axis=-1)
    if normalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return weights_tk, ids_tk.astype(jnp.int32)


def topk_softmax(logits_te: jax.Array, k: int,
                 control: RouterControl | None = None) -> tuple[jax.Array, jax.Array]:
    """GPT-OSS routing: top-k of the raw logits, then a float32 softmax over the k chosen (or forced) experts' logits
    -> weights, ids [tokens, k]."""
    logits_te = logits_te.astype(jnp.float32)
    _, ids_tk = jax.lax.top_k(logits_te, k)
    if control is not None:
        ids_tk = control.select(ids_tk)
    weights_tk = jax.nn.softmax(jnp.take_along_axis(logits_te, ids_tk, axis=-1), axis=-1)
    return weights_tk, ids_tk.astype(jnp.int32)


def sigmoid_group_topk(logits_te: jax.Array, correction_e: jax.Array, k: int, n_group: int, topk_group: int,
                       normalize: bool, scale: float,
                       control: RouterControl | None = None) -> tuple[jax.Array, jax.Array]:
    """Nemotron-H / DeepSeek-V3 routing -> weights, ids [tokens, k].

    Sigmoid scores in float32; the correction bias is added for choosing only; experts are chosen
    among the topk_group groups whose two best biased scores sum highest; the chosen experts'
    unbiased scores are normalised, then scaled.
    """
    tokens, experts = logits_te.shape
    scores_te = jax.nn.sigmoid(logits_te.astype(jnp.float32))
    choice_te = scores_te + correction_e.astype(jnp.float32)
    if control is not None and control.allowed_e is not None:  # the selection-only bias must not choose them either
        choice_te = jnp.where(control.allowed_e, choice_te, -jnp.inf)
    if control is not None:  # hard steering acts on the selection scores, before the group limit
        choice_te = control.choose(choice_te)
    steered_te = choice_te
    if n_group > 1:
        choice_tgx = choice_te.reshape(tokens, n_group, experts // n_group)
        group_scores_tg = jnp.sum(jax.lax.top_k(choice_tgx, 2)[0], axis=-1)
        _, groups_tk = jax.lax.top_k(group_scores_tg, topk_group)
        keep_tg = jnp.zeros((tokens, n_group), bool).at[jnp.arange(tokens)[:, None], groups_tk].set(True)
        choice_te = jnp.where(keep_tg[:, :, None], choice_tgx, -jnp.inf).reshape(tokens, experts)
        if control is not None and control.promote_e is not None:  # a promoted expert passes the group limit too
            choice_te = jnp.where(control.promote_e, steered_te, choice_te)
    _, ids_tk = jax.lax.top_k(choice_te, k)
    if control is not None:
        ids_tk = control.select(ids_tk)
    weights_tk = jnp.take_along_axis(scores_te, ids_tk, axis=-1)
    if normalize:
        weights_tk = weights_tk / (jnp.sum(weights_tk, axis=-1, keepdims=True) + 1e-20)
    return weights_tk * scale, ids_tk.astype(jnp.int32)


def dispatch_tiles(num_rows: int, num_experts: int) -> tuple[int, ...]:
    """Tile sizes for the default backend, largest first; () means ragged_dot (TPU/GPU)."""
    if jax.default_backend() != "cpu":
        return ()
    # The largest tile keeps each matmul efficient; the halvings down to 8 rows cover each
    # expert's remainder, so padding stays under 8 rows per expert.
    per_expert = max(num_rows // num_experts, 1)
    largest = int(min(128, max(8, 1 << (per_expert.bit_length() - 1))))
    return tuple(largest >> i for i in range(largest.bit_length() - 3))


@struct.dataclass
class Dispatch:
    """Where each (token, slot) pair lives once grouped by expert (groups padded to `align` rows)."""

    source_token_m: jax.Array  # [rows] token feeding each grouped row; num_tokens marks an empty row
    row_tk: jax.Array  # [tokens, k] grouped row holding each pair
    group_sizes_e: jax.Array  # [E] rows per expert, each a multiple of align


@struct.dataclass
class TrainedRows:
    """A layer stack's expert tensor of which only the rows (repeat_n[i], expert_n[i]) train (expert-selective
    training; no rows: the tensor is frozen). `stack` [repeats, E, ...] is read in place and gets no gradient; the
    gradient of row i is taken with respect to rows_n[i] [...], which holds that row's values (the tiled kernel
    reads them from the stack). The kernel then forms weight gradients for those experts alone, and passes only the
    input gradient through the others. The training step puts it in place of an nnx Variable's value."""

    stack: jax.Array
    rows_n: jax.Array
    repeat_n: tuple[int, ...] = struct.field(pytree_node=False)
    expert_n: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape

    def __getitem__(self, index):
        """Read whole, as an nnx Variable reads its value (value[...]): the expert kernel takes it apart."""
        if index is not Ellipsis:
            raise TypeError(f"TrainedRows is read whole (value[...]), not at {index!r}")
        return self

    def layer(self, repeat: jax.Array) -> jax.Array:
        """The weights [E, ...] of layer `repeat`: the stack's, with that layer's trained rows taken from rows_n."""
        experts = self.stack.shape[1]
        at_n = jnp.where(jnp.asarray(self.repeat_n, jnp.int32) == repeat, jnp.asarray(self.expert_n, jnp.int32),
                         experts)  # other layers' rows: out of range, dropped
        return jax.lax.stop_gradient(self.stack[repeat]).at[at_n].set(self.rows_n, mode="drop")


def plan_dispatch(ids_tk: jax.Array, num_experts: int, align: int) -> Dispatch:
    """Sorts the pairs by expert; each expert's group is padded to a multiple of `align` rows."""
    tokens, k = ids_tk.shape
    pairs = tokens * k
    flat_m = ids_tk.reshape(pairs)
    order_m = jnp.argsort(flat_m, stable=True)
    counts_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    padded_e = (counts_e + align - 1) // align * align
    sorted_e = flat_m[order_m]
    rank_m = jnp.arange(pairs, dtype=jnp.int32) - _group_starts(counts_e)[sorted_e]
    dest_m = _group_starts(padded_e)[sorted_e] + rank_m
    rows = -(-(pairs + num_experts * (align - 1)) // align) * align
    source = jnp.full((rows,), tokens, jnp.int32).at[dest_m].set(order_m // k)
    row_tk = jnp.zeros((pairs,), jnp.int32).at[order_m].set(dest_m).reshape(tokens, k)
    return Dispatch(source_token_m=source, row_tk=row_tk, group_sizes_e=padded_e)


def mix_experts(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, w: dict[str, jax.Array],
                activation: str | ClampedSwiGLU, tiles: tuple[int, ...] | None = None,
                first_expert: jax.Array | None = None, repeat: jax.Array | None = None) -> jax.Array:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [tokens, d], dropless.

    `w` holds "up_edf", "down_efd", for a gated activation "gate_edf" and, with biases, their "*_bias_*" arrays
    (module docstring). `tiles` defaults to the backend's
    choice (`dispatch_tiles`); () forces the ragged_dot path. With `first_expert`, `w` holds only the
    experts first_expert, first_expert + 1, ... (one device's share): pairs routed to any other expert
    are grouped last and never computed, so they contribute nothing. With `repeat`, `w` holds a layer stack's
    weights [repeats, E, ...] and the layer `repeat` is used: the tiles read its experts in place (a gradient, rarely
    wanted on this path, slices the layer out and scatters its weight gradients back into the stack), or `w` holds
    TrainedRows (expert-selective training), whose gradient goes to the trained rows alone.
    """
    tokens, k = ids_tk.shape
    num_experts = w["up_edf"].shape[-3]
    tiles = dispatch_tiles(tokens * k, num_experts) if tiles is None else tuple(tiles)
    groups = num_experts
    if first_expert is not None:
        local_tk = ids_tk - first_expert
        foreign_tk = (local_tk < 0) | (local_tk >= num_experts)
        ids_tk, groups = jnp.where(foreign_tk, num_experts, local_tk), num_experts + 1
        weights_tk = jnp.where(foreign_tk, 0, weights_tk)
    plan = plan_dispatch(ids_tk, groups, tiles[-1] if tiles else 1)
    group_sizes_e = plan.group_sizes_e[:num_experts]
    if tiles:
        weights_m = jnp.zeros(plan.source_token_m.shape, jnp.float32).at[plan.row_tk.reshape(-1)].set(
            weights_tk.reshape(-1).astype(jnp.float32))
        if isinstance(w["up_edf"], TrainedRows):  # all of a layer's expert tensors train at the same rows
            rows_at = (w["up_edf"].repeat_n, w["up_edf"].expert_n)
            return _selective_mixture(x_td, weights_m, plan.source_token_m, group_sizes_e,
                                      {name: value.stack for name, value in w.items()},
                                      {name: value.rows_n for name, value in w.items()}, repeat, rows_at, tiles,
                                      activation)
        if repeat is not None:
            return _indexed_mixture(x_td, weights_m, plan.source_token_m, group_sizes_e, w, repeat, tiles, activation)
        return _tiled_mixture(x_td, weights_m, plan.source_token_m, group_sizes_e, w, tiles, activation)
    if repeat is not None:
        w = {name: value.layer(repeat) if isinstance(value, TrainedRows) else value[repeat]
             for name, value in w.items()}
    x_md = jnp.concatenate([x_td, jnp.zeros_like(x_td[:1])])[plan.source_token_m]
    # Each grouped row's expert, for the biases: num_experts past the groups, whose bias row is zero.
    expert_m = jnp.searchsorted(jnp.cumsum(group_sizes_e), jnp.arange(x_md.shape[0]), side="right")

    def project(name, a, bias):  # rows past the groups (other devices' experts) come out as zeros
        y = jax.lax.ragged_dot(a, w[name], group_sizes_e)
        return y + _with_zero_row(w[bias])[expert_m].astype(y.dtype) if bias in w else y

    gate = project("gate_edf", x_md, "gate_bias_ef") if "gate_edf" in w else None
    y_md = project("down_efd", activate(activation, project("up_edf", x_md, "up_bias_ef"), gate), "down_bias_ed")
    return jnp.einsum("tkd,tk->td", y_md[plan.row_tk], weights_tk.astype(jnp.float32),
                      preferred_element_type=jnp.float32).astype(x_td.dtype)


def _over_tiles(rows, row0, tiles: tuple[int, ...], visit, carry):
    """carry = visit(row, size, carry) over rows [row0, row0 + rows): full tiles of tiles[0], then at most
    one tile of each smaller size for the remainder."""
    largest = tiles[0]
    carry = jax.lax.fori_loop(0, rows // largest, lambda i, c: visit(row0 + i * largest, largest, c), carry)
    row = row0 + rows // largest * largest
    for size in tiles[1:]:
        take = rows % (2 * size) >= size
        carry = jax.lax.cond(take, functools.partial(visit, row, size), lambda c: c, carry)
        row = row + jnp.where(take, size, 0)
    return carry


def _group_starts(group_sizes_e: jax.Array) -> jax.Array:
    """Each expert's first grouped row."""
    return jnp.cumsum(group_sizes_e) - group_sizes_e


def _expert_tiles(group_sizes_e: jax.Array, start_e: jax.Array, tiles: tuple[int, ...], e):
    """over_tiles(visit, carry): `_over_tiles` on expert e's grouped rows."""
    return functools.partial(_over_tiles, group_sizes_e[e], start_e[e], tiles)


def _for_each_tile(group_sizes_e: jax.Array, tiles: tuple[int, ...], run_expert, carry, skip_e=None):
    """carry = run_expert(e, over_tiles, carry) for each expert e with rows (and not in the mask skip_e), in order.

    over_tiles(visit, carry) runs `_over_tiles` on the expert's rows. The callee slices its expert's
    weights once for all its tiles; experts without rows (or skipped) cost nothing.
    """
    start_e = _group_starts(group_sizes_e)
    idle_e = group_sizes_e == 0 if skip_e is None else (group_sizes_e == 0) | skip_e
    busy_e = jnp.argsort(idle_e, stable=True)

    def expert(j, carry):
        e = busy_e[j]
        return run_expert(e, _expert_tiles(group_sizes_e, start_e, tiles, e), carry)

    return jax.lax.fori_loop(0, jnp.sum(~idle_e), expert, carry)


def _tile_mlp(x_td, w_e):
    """One tile's float32 pre-activations up, gate (None without a gate), biases included."""
    def project(name, bias):
        y = jnp.dot(x_td, w_e[name], preferred_element_type=jnp.float32)
        return y + w_e[bias].astype(jnp.float32) if bias in w_e else y

    return project("up_edf", "up_bias_ef"), project("gate_edf", "gate_bias_ef") if "gate_edf" in w_e else None


def _tile_down(h_tf, w_e):
    """One tile's float32 expert outputs from its activations, the down bias included."""
    y_td = jnp.dot(h_tf, w_e["down_efd"], preferred_element_type=jnp.float32)
    return y_td + w_e["down_bias_ed"].astype(jnp.float32) if "down_bias_ed" in w_e else y_td


def _with_zero_row(a_td):
    return jnp.concatenate([a_td, jnp.zeros_like(a_td[:1])])


def _tiled_forward(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation, keep: bool, repeat=None):
    """-> output [tokens, d] and, with `keep`, each grouped row's float32 pre-activations (up_mf, gate_mf); with
    `repeat`, w's arrays lead with a layer stack's repeats and that layer's experts are read."""
    x_pad = _with_zero_row(x_td)
    rows, ffn = source_m.shape[0], w["up_edf"].shape[-1]
    kept = {name: jnp.zeros((rows, ffn) if keep else (0, 0), jnp.float32) for name in ("up_edf", "gate_edf")
            if name in w}

    def run_expert(e, over_tiles, carry):
        w_e = {name: value[e] if repeat is None else value[repeat, e] for name, value in w.items()}

        def visit(row, size, carry):
            out_td, kept = carry
            tokens_t = jax.lax.dynamic_slice_in_dim(source_m, row, size)
            up, gate = _tile_mlp(x_pad[tokens_t], w_e)
            if keep:
                kept = {name: jax.lax.dynamic_update_slice_in_dim(kept[name], a, row, 0)
                        for name, a in (("up_edf", up), ("gate_edf", gate)) if name in kept}
            h_tf = activate(activation, up, gate).astype(x_td.dtype)
            y_td = _tile_down(h_tf, w_e) * jax.lax.dynamic_slice_in_dim(weights_m, row, size)[:, None]
            return out_td.at[tokens_t].add(y_td), kept

        return over_tiles(visit, carry)

    # The k weighted expert outputs of a token are summed in float32 and rounded once, as transformers does.
    out_pad, kept = _for_each_tile(group_sizes_e, tiles, run_expert, (jnp.zeros(x_pad.shape, jnp.float32), kept))
    return out_pad[:-1].astype(x_td.dtype), kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _tiled_mixture(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation):
    return _tiled_forward(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation, keep=False)[0]


def _tiled_mixture_fwd(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation):
    out, kept = _tiled_forward(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation, keep=True)
    return out, (x_td, weights_m, source_m, group_sizes_e, w, kept)


def _expert_backward(w_e, over_tiles, inputs, activation, carry, weight_grads: bool):
    """One expert's backward over its tiles: six matmuls per tile from the forward's kept pre-activations, or three
    without `weight_grads` (the input and combine-weight gradients alone). d weight = h . (dout @ down^T) (+ dout .
    down_bias), so the expert outputs need not be kept. carry (dx_pad, dweights_m) -> (dx_pad, dweights_m, the
    expert's float32 weight gradients or None)."""
    x_pad, dout_pad, weights_m, source_m, kept = inputs
    f32 = jnp.float32

    def visit(row, size, carry):
        dx_pad, dweights_m, dw_e = carry
        tokens_t = jax.lax.dynamic_slice_in_dim(source_m, row, size)
        pre = [jax.lax.dynamic_slice_in_dim(kept[name], row, size) if name in kept else None
               for name in ("up_edf", "gate_edf")]
        h_tf, act_vjp = jax.vjp(lambda u, g: activate(activation, u, g), *pre)
        dout_td = dout_pad[tokens_t]
        dh_unweighted_tf = dout_td @ w_e["down_efd"].T
        weights_t = jax.lax.dynamic_slice_in_dim(weights_m, row, size)
        dweight_t = jnp.sum(h_tf * dh_unweighted_tf, axis=-1)
        if "down_bias_ed" in w_e:
            dweight_t = dweight_t + dout_td @ w_e["down_bias_ed"]
        dweights_m = jax.lax.dynamic_update_slice_in_dim(dweights_m, dweight_t, row, 0)
        d_up, d_gate = act_vjp(dh_unweighted_tf * weights_t[:, None])
        dx_td = d_up @ w_e["up_edf"].T
        if d_gate is not None:
            dx_td = dx_td + d_gate @ w_e["gate_edf"].T
        dx_pad = dx_pad.at[tokens_t].add(dx_td)
        if not weight_grads:
            return dx_pad, dweights_m, dw_e
        x32 = x_pad[tokens_t].astype(f32)
        dy_td = dout_td * weights_t[:, None]
        grads = {"up_edf": x32.T @ d_up, "down_efd": h_tf.T @ dy_td}
        if d_gate is not None:
            grads["gate_edf"] = x32.T @ d_gate
        for name, d in (("up_bias_ef", d_up), ("gate_bias_ef", d_gate), ("down_bias_ed", dy_td)):
            if name in w_e:
                grads[name] = jnp.sum(d, axis=0)
        return dx_pad, dweights_m, {n: dw_e[n] + grads[n] for n in dw_e}

    zeros = {name: jnp.zeros(value.shape, f32) for name, value in w_e.items()} if weight_grads else None
    return over_tiles(visit, (*carry, zeros))


def _tiled_mixture_bwd(tiles, activation, residuals, dout_td):
    """Weight gradients accumulate per expert in float32 (`_expert_backward`)."""
    x_td, weights_m, source_m, group_sizes_e, w, kept = residuals
    f32 = jnp.float32
    x_pad, dout_pad = _with_zero_row(x_td), _with_zero_row(dout_td.astype(f32))
    inputs = (x_pad, dout_pad, weights_m, source_m, kept)
    start_e = _group_starts(group_sizes_e)

    def expert(carry, e):
        w_e = {name: value[e].astype(f32) for name, value in w.items()}
        over_tiles = _expert_tiles(group_sizes_e, start_e, tiles, e)
        dx_pad, dweights_m, dw_e = _expert_backward(w_e, over_tiles, inputs, activation, carry, True)
        return (dx_pad, dweights_m), {name: dw_e[name].astype(w[name].dtype) for name in dw_e}

    # A scan over every expert (an idle one runs no tile): its stacked outputs are the weight gradients, with
    # no zero-filled [E, ...] buffer to update.
    (dx_pad, dweights_m), dw = jax.lax.scan(expert, (jnp.zeros(x_pad.shape, f32), jnp.zeros_like(weights_m)),
                                            jnp.arange(len(group_sizes_e)))
    return dx_pad[:-1].astype(x_td.dtype), dweights_m, None, None, dw


_tiled_mixture.defvjp(_tiled_mixture_fwd, _tiled_mixture_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _indexed_mixture(x_td, weights_m, source_m, group_sizes_e, w, repeat, tiles, activation):
    """_tiled_mixture of layer `repeat` of stacked weights w [repeats, E, ...], read in place."""
    return _tiled_forward(x_td, weights_m, source_m, group_sizes_e, w, tiles, activation, keep=False,
                          repeat=repeat)[0]


def _indexed_mixture_fwd(x_td, weights_m, source_m, group_sizes_e, w, repeat, tiles, activation):
    out = _indexed_mixture(x_td, weights_m, source_m, group_sizes_e, w, repeat, tiles, activation)
    return out, (x_td, weights_m, source_m, group_sizes_e, w, repeat)


def _indexed_mixture_bwd(tiles, activation, residuals, dout_td):
    x_td, weights_m, source_m, group_sizes_e, w, repeat = residuals
    layer = {name: value[repeat] for name, value in w.items()}
    _, vjp = jax.vjp(lambda x, wm, lw: _tiled_mixture(x, wm, source_m, group_sizes_e, lw, tiles, activation),
                     x_td, weights_m, layer)
    dx_td, dweights_m, dlayer = vjp(dout_td)
    dw = {name: jnp.zeros_like(value).at[repeat].set(dlayer[name]) for name, value in w.items()}
    return dx_td, dweights_m, None, None, dw, None


_indexed_mixture.defvjp(_indexed_mixture_fwd, _indexed_mixture_bwd)


def _row_tables(repeat_n: tuple[int, ...], expert_n: tuple[int, ...], repeats: int, experts: int):
    """TrainedRows' rows as tables: trained_re [repeats, E] bool, and per repeat its rows' indices slots_rj [repeats,
    J] (padded) and their number count_r [repeats]."""
    trained_re = np.zeros((repeats, experts), bool)
    trained_re[list(repeat_n), list(expert_n)] = True
    count_r = np.bincount(np.asarray(repeat_n, np.int64), minlength=repeats).astype(np.int32)
    slots_rj = np.zeros((repeats, max(int(count_r.max(initial=0)), 1)), np.int32)
    for r in range(repeats):
        mine = np.flatnonzero(np.asarray(repeat_n) == r)
        slots_rj[r, :len(mine)] = mine
    return trained_re, slots_rj, count_r


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _selective_mixture(x_td, weights_m, source_m, group_sizes_e, stack, rows_n, repeat, rows_at, tiles, activation):
    """_indexed_mixture of layer `repeat` of `stack` (TrainedRows' stacks, read in place) whose rows at rows_at =
    (repeat_n, expert_n) train: their weight gradients go to rows_n, the stack gets none."""
    return _tiled_forward(x_td, weights_m, source_m, group_sizes_e, stack, tiles, activation, keep=False,
                          repeat=repeat)[0]


def _selective_mixture_fwd(x_td, weights_m, source_m, group_sizes_e, stack, rows_n, repeat, rows_at, tiles,
                           activation):
    out, kept = _tiled_forward(x_td, weights_m, source_m, group_sizes_e, stack, tiles, activation, keep=True,
                               repeat=repeat)
    return out, (x_td, weights_m, source_m, group_sizes_e, stack, rows_n, repeat, kept)


def _selective_mixture_bwd(rows_at, tiles, activation, residuals, dout_td):
    """Two loops over the layer's experts: those that do not train pass the input gradient alone (three matmuls per
    tile, no weight-gradient accumulator), then the layer's trained rows, whose weight gradients are written into
    their rows of the rows_n gradient."""
    x_td, weights_m, source_m, group_sizes_e, stack, rows_n, repeat, kept = residuals
    f32 = jnp.float32
    trained_re, slots_rj, count_r = _row_tables(*rows_at, *stack["up_edf"].shape[:2])
    trained_e = jnp.asarray(trained_re)[repeat]
    x_pad, dout_pad = _with_zero_row(x_td), _with_zero_row(dout_td.astype(f32))
    inputs = (x_pad, dout_pad, weights_m, source_m, kept)
    start_e = _group_starts(group_sizes_e)

    def backward(e, over_tiles, carry, weight_grads):
        w_e = {name: value[repeat, e].astype(f32) for name, value in stack.items()}
        return _expert_backward(w_e, over_tiles, inputs, activation, carry, weight_grads)

    carry = _for_each_tile(group_sizes_e, tiles, lambda e, over_tiles, carry: backward(e, over_tiles, carry, False)[:2],
                           (jnp.zeros(x_pad.shape, f32), jnp.zeros_like(weights_m)), skip_e=trained_e)
    drows_n = {name: jnp.zeros_like(value) for name, value in rows_n.items()}
    if rows_at[0]:
        def trained(j, carry):
            *carry, drows_n = carry
            row = jnp.asarray(slots_rj)[repeat, j]
            e = jnp.asarray(rows_at[1], jnp.int32)[row]
            dx_pad, dweights_m, dw_e = backward(e, _expert_tiles(group_sizes_e, start_e, tiles, e), carry, True)
            return dx_pad, dweights_m, {name: jax.lax.dynamic_update_index_in_dim(
                drows_n[name], dw_e[name].astype(drows_n[name].dtype), row, 0) for name in drows_n}

        *carry, drows_n = jax.lax.fori_loop(0, jnp.asarray(count_r)[repeat], trained, (*carry, drows_n))
    dx_pad, dweights_m = carry
    return dx_pad[:-1].astype(x_td.dtype), dweights_m, None, None, None, drows_n, None


_selective_mixture.defvjp(_selective_mixture_fwd, _selective_mixture_bwd)


# "auto" exchanges all-to-all from this many devices on the expert axis, where the backend has ragged_all_to_all
# (TPU, GPU): each token then travels to at most min(k, expert) devices instead of all of them (docs/scaling.md).
ALL_TO_ALL_FROM = 8


def resolve_exchange(setting: str, expert_devices: int, platform: str | None = None) -> str:
    """"all_gather" or "all_to_all" for an `expert_exchange` setting (moejax.config.EXPERT_EXCHANGES) on an expert
    axis of this size, on `platform` (default: jax's default backend)."""
    if setting != "auto":
        return setting
    ragged = (platform or jax.default_backend()) != "cpu"
    return "all_to_all" if ragged and expert_devices >= ALL_TO_ALL_FROM else "all_gather"


def expert_parallel(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, w: dict[str, jax.Array],
                    activation: str | ClampedSwiGLU, mesh: jax.sharding.Mesh, repeat: jax.Array | None = None,
                    exchange: str = "auto") -> jax.Array:
    """mix_experts over a mesh: the experts are split over its "expert" axis (their ffn dimension over "tensor"),
    the tokens over BATCH_AXES; each device runs its own experts on the pairs routed to them (dropless, as on one
    device), and the partial outputs are summed over "tensor". The tokens reach the experts' devices by
    - "all_gather": each device all-gathers the tokens of its expert group and a reduce-scatter over "expert"
      returns each device its tokens' combined outputs (every token travels to every device of the group);
    - "all_to_all": each token travels only to the devices holding experts it chose, once per device, and their
      combined outputs come back the same way (`_exchange`).
    `exchange` is resolved by `resolve_exchange`."""
    tokens = x_td.shape[0]
    pad = -tokens % math.prod(mesh.shape[a] for a in BATCH_AXES)
    if pad:  # padded tokens route with weight 0 and are dropped after
        x_td, ids_tk, weights_tk = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x_td, ids_tk, weights_tk))
    tok = P(BATCH_AXES, None)
    specs = {"gate_edf": ("expert", None, "tensor"), "up_edf": ("expert", None, "tensor"),
             "down_efd": ("expert", "tensor", None), "gate_bias_ef": ("expert", "tensor"),
             "up_bias_ef": ("expert", "tensor"), "down_bias_ed": ("expert", None)}
    stacked = () if repeat is None else (None,)  # a layer stack's repeats lead, unsplit
    local = _all_to_all_local if resolve_exchange(exchange, mesh.shape["expert"]) == "all_to_all" else _all_gather_local
    y_td = jax.shard_map(functools.partial(local, activation=activation), mesh=mesh,
                         in_specs=(tok, tok, tok, {n: P(*stacked, *specs[n]) for n in w}, P()),
                         out_specs=tok, check_vma=False)(x_td, ids_tk, weights_tk, w, repeat)
    return y_td[:tokens]


def _down_bias_once(w: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """w with the down bias kept on the first "tensor" device only: the tensor devices' partial expert outputs are
    summed, so the bias, whole on each of them, must enter that sum once."""
    if "down_bias_ed" not in w:
        return w
    first = jax.lax.axis_index("tensor") == 0
    return w | {"down_bias_ed": jnp.where(first, w["down_bias_ed"], jnp.zeros_like(w["down_bias_ed"]))}


def _all_gather_local(x_td, ids_tk, weights_tk, w, repeat, activation):
    w = _down_bias_once(w)
    x_td, ids_tk, weights_tk = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x_td, ids_tk, weights_tk))
    first = jax.lax.axis_index("expert") * w["up_edf"].shape[-3]
    y_td = jax.lax.psum(mix_experts(x_td, ids_tk, weights_tk, w, activation, first_expert=first, repeat=repeat),
                        "tensor")
    return jax.lax.psum_scatter(y_td, "expert", scatter_dimension=0, tiled=True)


def _all_to_all_local(x_td, ids_tk, weights_tk, w, repeat, activation):
    """One device's tokens [T, ...] -> their outputs, exchanging with the devices of the "expert" axis (n of them).

    Send slots [n, T]: slot (j, r) holds the r-th of this device's tokens that chose an expert on device j, with all
    its k ids and weights (the receiver computes only its own experts, weight 0 for the rest); unused slots hold id
    -1, which no device computes. The receiver's slots [n, T] mirror them (from device i at row i), its weighted sums
    go back into the sender's slots, and each token adds up the rows it got back."""
    w = _down_bias_once(w)
    devices, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
    tokens, k = ids_tk.shape
    per_device = w["up_edf"].shape[-3]
    sends_tn = jnp.any((ids_tk // per_device)[:, :, None] == jnp.arange(devices), axis=1)
    rank_tn = jnp.cumsum(sends_tn, axis=0, dtype=jnp.int32) - 1
    slot_tn = jnp.where(sends_tn, jnp.arange(devices) * tokens + rank_tn, devices * tokens)
    token_m = jnp.full((devices * tokens + 1,), tokens, jnp.int32).at[slot_tn].set(
        jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], slot_tn.shape))[:-1]
    send_sizes_n = jnp.sum(sends_tn, axis=0, dtype=jnp.int32)
    recv_sizes_n = jax.lax.all_to_all(send_sizes_n, "expert", 0, 0, tiled=True)
    ids_mk = jnp.concatenate([ids_tk, jnp.full((1, k), -1, ids_tk.dtype)])[token_m]
    weights_mk = jnp.concatenate([weights_tk, jnp.zeros((1, k), weights_tk.dtype)])[token_m]

    def exchange(a_m, fill, sizes=(send_sizes_n, recv_sizes_n)):
        return _exchange(a_m.reshape(devices, tokens, *a_m.shape[1:]), *sizes, fill).reshape(a_m.shape)

    x_m, ids_mk, weights_mk = exchange(_with_zero_row(x_td)[token_m], 0), exchange(ids_mk, -1), exchange(weights_mk, 0)
    y_m = jax.lax.psum(mix_experts(x_m, ids_mk, weights_mk, w, activation, first_expert=me * per_device,
                                   repeat=repeat), "tensor")
    y_m = exchange(y_m, 0, (recv_sizes_n, send_sizes_n))
    out_pad = jnp.zeros((tokens + 1, x_td.shape[1]), jnp.float32).at[token_m].add(y_m.astype(jnp.float32))
    return out_pad[:-1].astype(x_td.dtype)


def _exchange(send_n, send_sizes_n: jax.Array, recv_sizes_n: jax.Array, fill) -> jax.Array:
    """send_n [n, rows, ...]: rows send_n[j, :send_sizes[j]] go to device j of the "expert" axis -> [n, rows, ...]
    holding at [i, :recv_sizes[i]] the rows device i sent here, `fill` after them.

    ragged_all_to_all moves only those rows. XLA:CPU has no ragged all-to-all, so there the whole slots move by a
    dense all_to_all (the same rows arrive; the sender's unused slots already hold `fill`): chosen when the program
    is lowered for its platform."""
    devices, rows = send_n.shape[:2]

    def ragged(send_n, send_sizes_n, recv_sizes_n):
        flat = send_n.reshape(devices * rows, *send_n.shape[2:])
        starts_n = jnp.arange(devices, dtype=jnp.int32) * rows
        here_n = jnp.full((devices,), jax.lax.axis_index("expert") * rows, jnp.int32)
        out = jax.lax.ragged_all_to_all(flat, jnp.full_like(flat, fill), starts_n, send_sizes_n, here_n,
                                        recv_sizes_n, axis_name="expert")
        return out.reshape(send_n.shape)

    def dense(send_n, send_sizes_n, recv_sizes_n):
        return jax.lax.all_to_all(send_n, "expert", 0, 0, tiled=True)

    return jax.lax.platform_dependent(send_n, send_sizes_n, recv_sizes_n, cpu=dense, default=ragged)


class Experts(nnx.Module):
    """E feed-forward experts, "swiglu" (gate, up, down), "relu2" (up, down) or GPT-OSS's ClampedSwiGLU (gate, up,
    down), run dropless; with `bias`, each projection has a per-expert bias (module docstring)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, *, activation: str | ClampedSwiGLU = "swiglu",
                 bias: bool = False, exchange: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        e, d, f = num_experts, hidden, ffn
        self.activation, self.exchange, self.bias = activation, exchange, bias
        if has_gate(activation):
            self.gate_edf = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dtype, fan_in=d)
        self.up_edf = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dtype, fan_in=d)
        self.down_efd = param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), dtype, fan_in=f)
        if bias:
            if has_gate(activation):
                self.gate_bias_ef = param(rngs, (e, f), ("expert", "expert_mlp"), dtype, init="zeros")
            self.up_bias_ef = param(rngs, (e, f), ("expert", "expert_mlp"), dtype, init="zeros")
            self.down_bias_ed = param(rngs, (e, d), ("expert", "embed"), dtype, init="zeros")

    def __call__(self, x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array,
                 repeat: jax.Array | None = None) -> jax.Array:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [tokens, hidden]. repeat: the weights are a layer
        stack's ([repeats, E, ...]; LayerStack.index_experts) and this is the layer's index among them."""
        names = ["up_edf", "down_efd"]
        if self.bias:
            names += ["up_bias_ef", "down_bias_ed"]
        if has_gate(self.activation):
            names += ["gate_edf", "gate_bias_ef"] if self.bias else ["gate_edf"]
        w = {name: getattr(self, name)[...] for name in names}
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            return expert_parallel(x_td, ids_tk, weights_tk, w, self.activation, mesh, repeat, self.exchange)
        return mix_experts(x_td, ids_tk, weights_tk, w, self.activation, repeat=repeat)


class Router(nnx.Module):
    """Linear router w_de [hidden, E]; its logits are computed in float32 whatever the parameter dtype.

    With `bias` (GPT-OSS: b_e [E]), it is transformers' nn.Linear run in the input's dtype instead: float32 products
    and bias, rounded once to the input's dtype (a no-op in float32), then widened to float32."""

    def __init__(self, hidden: int, num_experts: int, *, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w_de = param(rngs, (hidden, num_experts), ("embed", "expert_router"), dtype)
        if bias:
            self.b_e = param(rngs, (num_experts,), ("expert_router",), dtype, init="zeros")
        self.bias = bias

    def __call__(self, x_td: jax.Array) -> jax.Array:
        """[tokens, hidden] -> float32 logits [tokens, E]."""
        if not self.bias:
            return jnp.dot(x_td.astype(jnp.float32), self.w_de[...].astype(jnp.float32))
        logits_te = jnp.dot(x_td, self.w_de[...], preferred_element_type=jnp.float32) + self.b_e[...].astype(
            jnp.float32)
        return logits_te.astype(x_td.dtype).astype(jnp.float32)


def _route(router: Router, x_btd: jax.Array, control: RouterControl | None) -> tuple[jax.Array, jax.Array]:
    """The MoE blocks' common start: [batch, seq, hidden] -> tokens x_td [b*s, hidden] and their router logits
    [b*s, E], steered when `control` says so."""
    b, s, d = x_btd.shape
    x_td = x_btd.reshape(b * s, d)
    logits_te = router(x_td)
    if control is not None:
        logits_te = control.steer(logits_te)
    return x_td, logits_te


class SoftmaxMoE(nnx.Module):
    """Qwen3-MoE sparse block: softmax top-k router over SwiGLU experts."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, normalize: bool,
                 exchange: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.top_k, self.normalize = top_k, normalize
        self.router = Router(hidden, num_experts, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, hidden, ffn, activation="swiglu", exchange=exchange, dtype=dtype,
                               rngs=rngs)

    def __call__(self, x_btd: jax.Array, control: RouterControl | None = None,
                 repeat: jax.Array | None = None) -> tuple[jax.Array, RouterOutput]:
        """[batch, seq, hidden] -> output [batch, seq, hidden] and the routing of its b*s tokens (repeat: see
        Experts)."""
        x_td, logits_te = _route(self.router, x_btd, control)
        weights_tk, ids_tk = softmax_topk(logits_te, self.top_k, self.normalize, control)
        y_td = self.experts(x_td, ids_tk, weights_tk, repeat)
        return y_td.reshape(x_btd.shape), RouterOutput(logits_te, ids_tk, weights_tk)


class SigmoidMoE(nnx.Module):
    """Nemotron-H MoE: group-limited sigmoid router over relu^2 experts (optionally in a latent space),
    plus a shared relu^2 expert on the block input."""

    def __init__(self, hidden: int, ffn: int, shared_ffn: int, num_experts: int, top_k: int, *,
                 latent: int | None, n_group: int, topk_group: int, normalize: bool, scale: float,
                 exchange: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.normalize, self.scale, self.latent = normalize, scale, latent
        self.router = Router(hidden, num_experts, dtype=dtype, rngs=rngs)
        # Kept in float32 whatever the model dtype, as transformers does: it decides selections.
        self.correction_e = param(rngs, (num_experts,), ("expert_router",), jnp.float32, init="zeros")
        expert_dim = hidden if latent is None else latent
        if latent is not None:
            self.to_latent_dl = param(rngs, (hidden, latent), ("embed", "latent"), dtype)
            self.from_latent_ld = param(rngs, (latent, hidden), ("latent", "embed"), dtype)
        self.experts = Experts(num_experts, expert_dim, ffn, activation="relu2", exchange=exchange, dtype=dtype,
                               rngs=rngs)
        self.shared = MLP(hidden, shared_ffn, activation="relu2", dtype=dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, control: RouterControl | None = None,
                 repeat: jax.Array | None = None) -> tuple[jax.Array, RouterOutput]:
        """[batch, seq, hidden] -> output [batch, seq, hidden] and the routing of its b*s tokens (repeat: see
        Experts)."""
        x_td, logits_te = _route(self.router, x_btd, control)
        weights_tk, ids_tk = sigmoid_group_topk(logits_te, self.correction_e[...], self.top_k, self.n_group,
                                                self.topk_group, self.normalize, self.scale, control)
        h_td = x_td if self.latent is None else x_td @ self.to_latent_dl[...]
        y_td = self.experts(h_td, ids_tk, weights_tk, repeat)
        if self.latent is not None:
            y_td = y_td @ self.from_latent_ld[...]
        y_btd = y_td.reshape(x_btd.shape) + self.shared(x_btd)
        return y_btd, RouterOutput(logits_te, ids_tk, weights_tk)


class GptOssMoE(nnx.Module):
    """GPT-OSS sparse block (transformers' GptOssMLP): a router with a bias, top-k of its raw logits softmaxed over
    the k chosen, and clamped-SwiGLU experts with biases."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 activation: ClampedSwiGLU = GPT_OSS_SWIGLU, exchange: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.top_k = top_k
        self.router = Router(hidden, num_experts, bias=True, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, hidden, ffn, activation=activation, bias=True, exchange=exchange,
                               dtype=dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, control: RouterControl | None = None,
                 repeat: jax.Array | None = None) -> tuple[jax.Array, RouterOutput]:
        """[batch, seq, hidden] -> output [batch, seq, hidden] and the routing of its b*s tokens (repeat: see
        Experts)."""
        x_td, logits_te = _route(self.router, x_btd, control)
        weights_tk, ids_tk = topk_softmax(logits_te, self.top_k, control)
        y_td = self.experts(x_td, ids_tk, weights_tk, repeat)
        return y_td.reshape(x_btd.shape), RouterOutput(logits_te, ids_tk, weights_tk)
