"""Routing statistics reduced inside the jitted forward pass: the router logits never leave the device.

Per sequence (one chunk of text, the unit of METRICS.md's per-chunk spreads and paired divergences)
and per MoE layer, over content tokens only: top-K and top-1 counts [E], sums of the routing
probabilities P_t [E], the summed per-token selection entropy (bits), the content-token count, and
the summed Jaccard overlap of sampled token pairs (routing consistency). What leaves the device is
O(sequences x layers x experts), whatever the sequence length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.experimental import multihost_utils

from moejax.errors import DataError
from moejax.models.common import ForcedRouting
from moejax.parallel.mesh import on_mesh

PROBABILITIES = ("softmax", "native")


@struct.dataclass
class ChunkStats:
    """Per sequence b and MoE layer l (arrays [b, L, ...]); `tokens` [b] counts content tokens."""

    topk_counts: jax.Array  # [b, L, E] int32
    top1_counts: jax.Array  # [b, L, E] int32
    prob_sums: jax.Array  # [b, L, E] float32
    entropy_sums_bits: jax.Array  # [b, L] float32
    tokens: jax.Array  # [b] int32
    pair_jaccard_sums: jax.Array  # [b, L] float32
    pairs: jax.Array  # [b] int32
    expert_ids: jax.Array | None = None  # with keep_routing: [b, L, t, k] int32, every token's experts
    router_logits: jax.Array | None = None  # with keep_routing: [b, L, t, E] float32, its raw router logits


def _layer_stats(logits_bte, ids_btk, content_bt, pairs_bp2, pair_valid_bp, probabilities: str):
    num_experts = logits_bte.shape[-1]
    k = ids_btk.shape[-1]
    logits = logits_bte.astype(jnp.float32)
    p_bte = jax.nn.softmax(logits, axis=-1) if probabilities == "softmax" else jax.nn.sigmoid(logits)
    keep_bt = content_bt.astype(jnp.float32)
    chosen_bte = jax.nn.one_hot(ids_btk, num_experts, dtype=jnp.float32).sum(axis=-2)
    topk = jnp.einsum("bte,bt->be", chosen_bte, keep_bt).astype(jnp.int32)
    top1 = jnp.einsum("bte,bt->be", jax.nn.one_hot(ids_btk[..., 0], num_experts), keep_bt).astype(jnp.int32)
    prob_sums = jnp.einsum("bte,bt->be", p_bte, keep_bt)
    entropy_bt = -jnp.sum(p_bte * jnp.log2(jnp.where(p_bte > 0, p_bte, 1.0)), axis=-1)
    entropy = jnp.sum(entropy_bt * keep_bt, axis=-1)
    first = jnp.take_along_axis(chosen_bte, pairs_bp2[..., 0, None], axis=1)
    second = jnp.take_along_axis(chosen_bte, pairs_bp2[..., 1, None], axis=1)
    overlap_bp = jnp.sum(first * second, axis=-1)
    jaccard = jnp.sum(overlap_bp / (2 * k - overlap_bp) * pair_valid_bp, axis=-1)
    return topk, top1, prob_sums, entropy, jaccard


@functools.partial(jax.jit, static_argnums=(0, 6, 8))
def _stats(graphdef, state, input_ids_bt, attention_mask_bt, content_bt, pairs_bp2, probabilities, control,
           keep_routing):
    model = nnx.merge(graphdef, state)
    positions_bt = jnp.broadcast_to(jnp.arange(input_ids_bt.shape[1], dtype=jnp.int32), input_ids_bt.shape)
    out = model.forward(input_ids_bt, attention_mask_bt, positions_bt, True, control=control)
    content_bt = content_bt & attention_mask_bt.astype(bool)
    pair_valid_bp = (content_bt[jnp.arange(content_bt.shape[0])[:, None], pairs_bp2[..., 0]]
                     & content_bt[jnp.arange(content_bt.shape[0])[:, None], pairs_bp2[..., 1]]
                     & (pairs_bp2[..., 0] != pairs_bp2[..., 1])).astype(jnp.float32)
    per_layer = [_layer_stats(logits, ids, content_bt, pairs_bp2, pair_valid_bp, probabilities)
                 for logits, ids in zip(out.router_logits, out.router_expert_ids, strict=True)]
    topk, top1, prob_sums, entropy, jaccard = (jnp.stack(x, axis=1) for x in zip(*per_layer, strict=True))
    kept = {}
    if keep_routing:
        kept = {"expert_ids": jnp.stack(out.router_expert_ids, axis=1),
                "router_logits": jnp.stack(out.router_logits, axis=1)}
    return ChunkStats(topk_counts=topk, top1_counts=top1, prob_sums=prob_sums, entropy_sums_bits=entropy,
                      tokens=content_bt.sum(axis=-1).astype(jnp.int32), pair_jaccard_sums=jaccard,
                      pairs=pair_valid_bp.sum(axis=-1).astype(jnp.int32), **kept)


def chunk_stats(model: nnx.Module, input_ids_bt, attention_mask_bt, content_bt, pairs_bp2,
                probabilities: str = "softmax", *, forced: ForcedRouting | None = None,
                keep_routing: bool = False) -> ChunkStats:
    """Routing statistics of a batch of sequences, reduced in the same jitted call as the forward pass.

    content_bt marks the tokens that count (padding and special tokens excluded); pairs_bp2 holds
    token-position pairs per sequence for routing consistency (pairs touching a non-content token,
    or a position with itself, are ignored). probabilities: "softmax" of the raw logits (paper a's
    protocol, for both architectures) or "native" (sigmoid scores for Nemotron-H). forced: experts imposed on
    some tokens (as in model(...)); keep_routing: every token's experts and raw router logits come back too.
    """
    if probabilities not in PROBABILITIES:
        raise DataError(f"probabilities={probabilities!r} is not one of {PROBABILITIES}")
    if probabilities == "native":
        probabilities = "sigmoid" if model.config.router_kind == "sigmoid" else "softmax"
    graphdef, state = nnx.split(model)
    with on_mesh(state) as place:
        stats = _stats(graphdef, state, *place(jnp.asarray(input_ids_bt, jnp.int32),
                                               jnp.asarray(attention_mask_bt, jnp.int32), jnp.asarray(content_bt, bool),
                                               jnp.asarray(pairs_bp2, jnp.int32)), probabilities,
                       None if forced is None else forced.control(), keep_routing)
    if jax.process_count() > 1:  # every host gets the whole batch's statistics
        stats = multihost_utils.process_allgather(stats, tiled=True)
    return stats
