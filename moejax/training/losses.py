"""Training losses: next-token cross-entropy, the load-balancing auxiliary loss and the router z-loss.

The first two are transformers' own definitions (ForCausalLMLoss, and Qwen3-MoE's
load_balancing_loss_func at the pinned version), so a moejax CPT run optimises the same objective
as a PyTorch one with `output_router_logits=True`. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.data.mixture import IGNORE_INDEX


def next_token_loss(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Mean cross-entropy of labels[:, t + 1] under logits[:, t], over labels that are not IGNORE_INDEX."""
    logits_btv = logits_btv[:, :-1].astype(jnp.float32)
    targets_bt = labels_bt[:, 1:]
    valid_bt = targets_bt != IGNORE_INDEX
    # The target's logit as a masked sum over v, not a gather: with v split over devices (a vocabulary-split LM
    # head) it is by construction a local reduction and a [b, t] all-reduce, and its gradient needs fewer [b, t, v]
    # temporaries than log_softmax's.
    v_btv = jax.lax.broadcasted_iota(targets_bt.dtype, logits_btv.shape, 2)
    target_bt = jnp.sum(jnp.where(v_btv == targets_bt[..., None], logits_btv, 0), axis=-1)
    nll_bt = jax.nn.logsumexp(logits_btv, axis=-1) - target_bt
    return jnp.sum(nll_bt * valid_bt) / jnp.maximum(jnp.sum(valid_bt), 1)


def load_balancing_loss(router_logits: tuple[jax.Array, ...], top_k: int,
                        valid_bt: jax.Array | None = None) -> jax.Array:
    """E * sum_e f_e * P_e over all MoE layers' tokens (Switch Transformer eq. 4-6, as transformers computes
    it): f_e = top-k assignments of expert e per token, P_e = mean softmax probability of e, both over the
    (unpadded) tokens of every layer. router_logits: per layer [batch, seq, E] raw logits; valid_bt: 1 = counted
    (transformers' attention_mask; segment_ids_bt != 0)."""
    experts = router_logits[0].shape[-1]
    mask_n = (jnp.ones(router_logits[0].shape[:-1]) if valid_bt is None
              else valid_bt).reshape(-1).astype(jnp.float32)
    counts_e = jnp.zeros(experts, jnp.float32)
    prob_sums_e = jnp.zeros(experts, jnp.float32)
    for logits_bte in router_logits:
        probs_ne = jax.nn.softmax(logits_bte.reshape(-1, experts).astype(jnp.float32), axis=-1)
        _, ids_nk = jax.lax.top_k(probs_ne, top_k)
        counts_e = counts_e + jnp.einsum("nke,n->e", jax.nn.one_hot(ids_nk, experts), mask_n)
        prob_sums_e = prob_sums_e + jnp.einsum("ne,n->e", probs_ne, mask_n)
    rows = jnp.sum(mask_n) * len(router_logits)
    return experts * jnp.sum((counts_e / rows) * (prob_sums_e / rows))


def router_z_loss(router_logits: tuple[jax.Array, ...], valid_bt: jax.Array | None = None) -> jax.Array:
    """Mean over layers and (unpadded) tokens of logsumexp(router logits)^2 (ST-MoE's z-loss); valid_bt: 1 =
    counted."""
    mask_bt = jnp.ones(router_logits[0].shape[:-1]) if valid_bt is None else valid_bt
    mask_bt = mask_bt.astype(jnp.float32)
    total = sum(jnp.sum(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2 * mask_bt)
                for logits in router_logits)
    return total / (jnp.maximum(jnp.sum(mask_bt), 1) * len(router_logits))


def sigmoid_balance_loss(router_logits: tuple[jax.Array, ...], expert_ids: tuple[jax.Array, ...],
                         valid_bt: jax.Array | None = None) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss for sigmoid routing (Nemotron-H), averaged over MoE layers and
    sequences: sum_e f_e * P_e with f_e = E / (k T) * (tokens of the sequence routed to e) and P_e = the mean
    over its tokens of e's sigmoid score normalised over all experts. Balanced routing gives 1.
    router_logits: per layer [batch, seq, E]; expert_ids: per layer [batch, seq, k]; valid_bt: 1 = counted."""
    batch, seq, experts = router_logits[0].shape
    k = expert_ids[0].shape[-1]
    valid_bt = jnp.ones((batch, seq), jnp.float32) if valid_bt is None else valid_bt.astype(jnp.float32)
    tokens_b = jnp.maximum(jnp.sum(valid_bt, axis=1), 1)
    total = jnp.zeros((), jnp.float32)
    for logits_bte, ids_btk in zip(router_logits, expert_ids, strict=True):
        scores_bte = jax.nn.sigmoid(logits_bte.astype(jnp.float32))
        scores_bte = scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True)
        load_be = jnp.einsum("btke,bt->be", jax.nn.one_hot(ids_btk, experts), valid_bt)
        f_be = load_be * experts / (k * tokens_b[:, None])
        p_be = jnp.einsum("bte,bt->be", scores_bte, valid_bt) / tokens_b[:, None]
        total = total + jnp.mean(jnp.sum(f_be * p_be, axis=-1))
    return total / len(router_logits)


def expert_counts(expert_ids: tuple[jax.Array, ...], num_experts: int, group_b: jax.Array, groups: int,
                  valid_bt: jax.Array) -> jax.Array:
    """Top-k assignments per MoE layer, row group (language) and expert -> int32 [layers, groups, E].
    expert_ids: per layer [batch, seq, k]; group_b: each row's group; valid_bt: 1 = counted."""
    weight_btg = (jax.nn.one_hot(group_b, groups, dtype=jnp.int32)[:, None, :]
                  * valid_bt.astype(jnp.int32)[..., None])
    return jnp.stack([jnp.einsum("btke,btg->ge", jax.nn.one_hot(ids_btk, num_experts, dtype=jnp.int32), weight_btg)
                      for ids_btk in expert_ids])

