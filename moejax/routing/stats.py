"""Routing statistics reduced inside the jitted forward pass: the router logits never leave the device.

Per chunk of text (the unit of docs/metrics.md's per-chunk spreads and paired divergences) and per MoE layer, over
content tokens only: top-K and top-1 counts [E], sums of the routing probabilities P_t [E], the summed per-token
selection entropy (bits), the content-token count, and the summed Jaccard overlap of sampled token pairs (routing
consistency). A row of the batch may pack several chunks, one segment each (segment ids 1, 2, ...; 0 is padding);
the statistics are reduced per segment. What leaves the device is O(rows x segments x layers x experts), whatever
the row length, unless every token's routing is asked for (keep_routing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils

from moejax.data.packing import positions
from moejax.errors import DataError
from moejax.models.common import ForcedRouting
from moejax.models.steering import Steering, with_steering
from moejax.parallel.mesh import on_mesh
from moejax.routing import PROBABILITIES, SELECTIONS


@struct.dataclass
class ChunkStats:
    """Per row b, segment slot m (segment id m + 1) and MoE layer l (arrays [b, m, L, ...]); `tokens` [b, m] counts
    content tokens."""

    topk_counts: jax.Array  # [b, m, L, E] int32
    top1_counts: jax.Array  # [b, m, L, E] int32
    prob_sums: jax.Array  # [b, m, L, E] float32
    entropy_sums_bits: jax.Array  # [b, m, L] float32
    tokens: jax.Array  # [b, m] int32
    pair_jaccard_sums: jax.Array  # [b, m, L] float32
    pairs: jax.Array  # [b, m] int32
    expert_ids: jax.Array | None = None  # with keep_routing: [b, L, t, k] int32, every token's experts
    router_logits: jax.Array | None = None  # with keep_routing: [b, L, t, E] float32, its raw router logits


def _layer_stats(logits_bte, ids_btk, slot_btm, pairs_bmp2, pair_valid_bmp, probabilities: str, selection: str):
    """One MoE layer's statistics per segment slot; slot_btm: 1 where token t is a content token of slot m.
    selection "raw": the experts counted are the top-K of the (softmax of the) logits, not the model's ids_btk."""
    num_experts = logits_bte.shape[-1]
    k = ids_btk.shape[-1]
    logits = logits_bte.astype(jnp.float32)
    if selection == "raw":
        ids_btk = jax.lax.top_k(logits, k)[1]
    p_bte = jax.nn.softmax(logits, axis=-1) if probabilities == "softmax" else jax.nn.sigmoid(logits)
    chosen_bte = jax.nn.one_hot(ids_btk, num_experts, dtype=jnp.float32).sum(axis=-2)
    topk = jnp.einsum("bte,btm->bme", chosen_bte, slot_btm).astype(jnp.int32)
    top1 = jnp.einsum("bte,btm->bme", jax.nn.one_hot(ids_btk[..., 0], num_experts), slot_btm).astype(jnp.int32)
    prob_sums = jnp.einsum("bte,btm->bme", p_bte, slot_btm)
    entropy_bt = -jnp.sum(p_bte * jnp.log2(jnp.where(p_bte > 0, p_bte, 1.0)), axis=-1)
    entropy = jnp.einsum("bt,btm->bm", entropy_bt, slot_btm)
    rows_b11 = jnp.arange(chosen_bte.shape[0])[:, None, None]
    first_bmpe = chosen_bte[rows_b11, pairs_bmp2[..., 0]]
    second_bmpe = chosen_bte[rows_b11, pairs_bmp2[..., 1]]
    overlap_bmp = jnp.sum(first_bmpe * second_bmpe, axis=-1)
    jaccard = jnp.sum(overlap_bmp / (2 * k - overlap_bmp) * pair_valid_bmp, axis=-1)
    return topk, top1, prob_sums, entropy, jaccard


@functools.partial(jax.jit, static_argnums=(0, 7, 9, 10, 11))
def _stats(graphdef, state, input_ids_bt, segment_ids_bt, positions_bt, content_bt, pairs_bmp2, probabilities, control,
           keep_routing, slots, selection):
    model = nnx.merge(graphdef, state)
    out = model.forward(input_ids_bt, segment_ids_bt, positions_bt, True, control=control)
    content_bt = content_bt & (segment_ids_bt != 0)
    slot_btm = jax.nn.one_hot(segment_ids_bt - 1, slots, dtype=jnp.float32) * content_bt[..., None]
    rows_b11 = jnp.arange(content_bt.shape[0])[:, None, None]
    slot_of_bt = jnp.where(content_bt, segment_ids_bt - 1, -1)
    own_m = jnp.arange(slots)[None, :, None]
    pair_valid_bmp = ((slot_of_bt[rows_b11, pairs_bmp2[..., 0]] == own_m)
                      & (slot_of_bt[rows_b11, pairs_bmp2[..., 1]] == own_m)
                      & (pairs_bmp2[..., 0] != pairs_bmp2[..., 1])).astype(jnp.float32)
    # One program for all MoE layers (vmapped over the layer axis, which goes third): the same operations as layer
    # by layer, in a fraction of the compile time.
    layer = functools.partial(_layer_stats, slot_btm=slot_btm, pairs_bmp2=pairs_bmp2, pair_valid_bmp=pair_valid_bmp,
                              probabilities=probabilities, selection=selection)
    topk, top1, prob_sums, entropy, jaccard = jax.vmap(layer, out_axes=2)(jnp.stack(out.router_logits),
                                                                           jnp.stack(out.router_expert_ids))
    kept = {}
    if keep_routing:
        kept = {"expert_ids": jnp.stack(out.router_expert_ids, axis=1),
                "router_logits": jnp.stack(out.router_logits, axis=1)}
    return ChunkStats(topk_counts=topk, top1_counts=top1, prob_sums=prob_sums, entropy_sums_bits=entropy,
                      tokens=slot_btm.sum(axis=1).astype(jnp.int32), pair_jaccard_sums=jaccard,
                      pairs=pair_valid_bmp.sum(axis=-1).astype(jnp.int32), **kept)


def stats_cache_size() -> int:
    """The programs the statistics' jitted forward has compiled in this process (to count compilations)."""
    return _stats._cache_size()


def _native(model, probabilities: str) -> str:
    if probabilities not in PROBABILITIES:
        raise DataError(f"probabilities={probabilities!r} is not one of {PROBABILITIES}")
    if probabilities == "native":
        return "sigmoid" if model.config.router_kind == "sigmoid" else "softmax"
    return probabilities


def segment_stats(model: nnx.Module, input_ids_bt, segment_ids_bt, content_bt, pairs_bmp2,
                  probabilities: str = "softmax", *, forced: ForcedRouting | None = None,
                  steering: Steering | None = None, keep_routing: bool = False,
                  selection: str = "model") -> ChunkStats:
    """Routing statistics of rows that pack chunks, one segment each, reduced per segment in the same jitted call
    as the forward pass (each chunk sees only itself, as if alone: positions restart, attention and the Mamba
    state stop at its boundaries).

    segment_ids_bt: 0 padding, 1 .. m the chunks of a row; content_bt marks the tokens that count (special tokens
    excluded); pairs_bmp2 [b, m, P, 2]: token-position pairs of each slot's chunk for routing consistency, in row
    positions (pairs leaving the chunk, touching a non-content token, or a position with itself are ignored).
    probabilities: "softmax" of the raw logits (paper a's protocol, for both architectures) or "native" (sigmoid
    scores for Nemotron-H). forced: experts imposed on some tokens (as in model(...)); steering: the router steered
    (as in model(...); the statistics are the steered routing's); keep_routing: every token's experts and router
    logits come back too. selection: the experts counted, the model's choice ("model") or the top-K of
    softmax(raw router logits) ("raw", paper a's hook view; the same experts unless a correction bias, a group limit
    or forcing decides); keep_routing returns the model's choice either way.
    """
    probabilities = _native(model, probabilities)
    if selection not in SELECTIONS:
        raise DataError(f"selection={selection!r} is not one of {SELECTIONS}")
    segment_ids_bt = np.asarray(segment_ids_bt, np.int32)
    graphdef, state = nnx.split(model)
    with on_mesh(state) as place:
        stats = _stats(graphdef, state, *place(np.asarray(input_ids_bt, np.int32), segment_ids_bt,
                                               positions(segment_ids_bt), np.asarray(content_bt, bool),
                                               np.asarray(pairs_bmp2, np.int32)), probabilities,
                       with_steering(None if forced is None else forced.control(), steering, model.config),
                       keep_routing, np.shape(pairs_bmp2)[1], selection)
    if jax.process_count() > 1:  # every host gets the whole batch's statistics
        stats = multihost_utils.process_allgather(stats, tiled=True)
    return stats


def chunk_stats(model: nnx.Module, input_ids_bt, segment_ids_bt, content_bt, pairs_bp2,
                probabilities: str = "softmax", *, forced: ForcedRouting | None = None,
                keep_routing: bool = False, selection: str = "model") -> ChunkStats:
    """segment_stats for one chunk per row (segment_ids_bt: 0 = padding, any other id = the row's chunk, so a 0/1
    attention mask will do); the statistics come back without the slot axis ([b, L, E], [b, L], [b])."""
    stats = segment_stats(model, input_ids_bt, np.asarray(segment_ids_bt) != 0, content_bt,
                          np.asarray(pairs_bp2)[:, None], probabilities, forced=forced, keep_routing=keep_routing,
                          selection=selection)
    squeezed = {name: getattr(stats, name)[:, 0] for name in ("topk_counts", "top1_counts", "prob_sums",
                                                               "entropy_sums_bits", "tokens", "pair_jaccard_sums",
                                                               "pairs")}
    return stats.replace(**squeezed)
