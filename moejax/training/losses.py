"""Training losses: next-token cross-entropy, the load-balancing auxiliary loss and the router z-loss.

The first two are transformers' own definitions (ForCausalLMLoss, and Qwen3-MoE's
load_balancing_loss_func at the pinned version), so a moejax CPT run optimises the same objective
as a PyTorch one with `output_router_logits=True`. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def next_token_loss(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Mean cross-entropy of labels[:, t + 1] under logits[:, t], over labels that are not IGNORE_INDEX."""
    logits_btv = logits_btv[:, :-1].astype(jnp.float32)
    targets_bt = labels_bt[:, 1:]
    valid_bt = targets_bt != IGNORE_INDEX
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, jnp.where(valid_bt, targets_bt, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bt * valid_bt) / jnp.maximum(jnp.sum(valid_bt), 1)


def load_balancing_loss(router_logits: tuple[jax.Array, ...], top_k: int,
                        attention_mask_bt: jax.Array | None = None) -> jax.Array:
    """E * sum_e f_e * P_e over all MoE layers' tokens (Switch Transformer eq. 4-6, as transformers computes
    it): f_e = top-k assignments of expert e per token, P_e = mean softmax probability of e, both over the
    (unpadded) tokens of every layer. router_logits: per layer [batch, seq, E] raw logits."""
    experts = router_logits[0].shape[-1]
    mask_n = (jnp.ones(router_logits[0].shape[:-1]) if attention_mask_bt is None
              else attention_mask_bt).reshape(-1).astype(jnp.float32)
    counts_e = jnp.zeros(experts, jnp.float32)
    prob_sums_e = jnp.zeros(experts, jnp.float32)
    for logits_bte in router_logits:
        probs_ne = jax.nn.softmax(logits_bte.reshape(-1, experts).astype(jnp.float32), axis=-1)
        _, ids_nk = jax.lax.top_k(probs_ne, top_k)
        counts_e = counts_e + jnp.einsum("nke,n->e", jax.nn.one_hot(ids_nk, experts), mask_n)
        prob_sums_e = prob_sums_e + jnp.einsum("ne,n->e", probs_ne, mask_n)
    rows = jnp.sum(mask_n) * len(router_logits)
    return experts * jnp.sum((counts_e / rows) * (prob_sums_e / rows))


def router_z_loss(router_logits: tuple[jax.Array, ...], attention_mask_bt: jax.Array | None = None) -> jax.Array:
    """Mean over layers and (unpadded) tokens of logsumexp(router logits)^2 (ST-MoE's z-loss)."""
    mask_bt = jnp.ones(router_logits[0].shape[:-1]) if attention_mask_bt is None else attention_mask_bt
    mask_bt = mask_bt.astype(jnp.float32)
    total = sum(jnp.sum(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2 * mask_bt)
                for logits in router_logits)
    return total / (jnp.maximum(jnp.sum(mask_bt), 1) * len(router_logits))
