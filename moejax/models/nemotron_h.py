"""Nemotron-H (e.g. Nemotron-3-Nano-30B-A3B): a hybrid stack of Mamba-2, attention (no RoPE), MoE and MLP
blocks, each x + mixer(norm(x))."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import NemotronHConfig
from moejax.layers.attention import Attention
from moejax.layers.mamba2 import Mamba2Mixer
from moejax.layers.mlp import MLP
from moejax.layers.moe import SigmoidMoE
from moejax.layers.norms import RMSNorm
from moejax.layers.params import param
from moejax.layers.stack import LayerStack
from moejax.models.common import CausalLM


def make_mixer(cfg: NemotronHConfig, kind: str, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The mixer of one block: "mamba", "attention", "moe" or "mlp"."""
    d = cfg.hidden_size
    if kind == "mamba":
        return Mamba2Mixer(d, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups,
                           cfg.conv_kernel, cfg.chunk_size, conv_bias=cfg.use_conv_bias, eps=cfg.layer_norm_epsilon,
                           dt_limits=cfg.dt_limits, dtype=dtype, rngs=rngs)
    if kind == "attention":
        return Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, rngs=rngs)
    if kind == "moe":
        return SigmoidMoE(d, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size,
                          cfg.n_routed_experts, cfg.num_experts_per_tok, latent=cfg.moe_latent_size,
                          n_group=cfg.n_group, topk_group=cfg.topk_group, normalize=cfg.norm_topk_prob,
                          scale=cfg.routed_scaling_factor, exchange=cfg.expert_exchange, dtype=dtype,
                          rngs=rngs)
    return MLP(d, cfg.intermediate_size, activation="relu2", dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """x + mixer(norm(x)); an MoE block also returns its routing."""

    def __init__(self, cfg: NemotronHConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, axis_name="embed", weight_in_float32=True,
                            dtype=dtype, rngs=rngs)
        self.mixer = make_mixer(cfg, kind, dtype=dtype, rngs=rngs)

    def cache(self, batch: int, length: int, dtype):
        """The generation cache of a Mamba-2 or attention block; None for the others."""
        return self.mixer.cache(batch, length, dtype) if self.kind in ("mamba", "attention") else None

    def __call__(self, x_btd, *, mask_bts, segments_bt, control=None, cache=None, cache_slot=0, repeat=None):
        """-> (x, the MoE routing or None, the updated cache or None); repeat: see LayerStack.index_experts."""
        h_btd = self.norm(x_btd)
        if self.kind == "moe":
            y_btd, routing = self.mixer(h_btd, control, repeat)
            return x_btd + y_btd, routing, None
        if self.kind == "mlp":
            return x_btd + self.mixer(h_btd), None, None
        if self.kind == "mamba":
            out = self.mixer(h_btd, segments_bt, cache)
        else:
            out = self.mixer(h_btd, mask_bts, None, cache, cache_slot)
        y_btd, cache = (out, None) if cache is None else out
        return x_btd + y_btd, None, cache


class NemotronHForCausalLM(CausalLM):
    """Embeddings, the hybrid block stack (repeating units scanned), final norm and LM head."""

    def __init__(self, cfg: NemotronHConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_vd = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=1)
        self.layers = LayerStack(cfg.layer_kinds, lambda kind, rngs: Block(cfg, kind, dtype=dtype, rngs=rngs),
                                 rngs=rngs)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, axis_name="embed", weight_in_float32=True,
                              dtype=dtype, rngs=rngs)
        self.lm_head_dv = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def layer_context(self, segment_ids_bt, position_ids_bt, dtype) -> dict:
        """What every block takes besides x and the mask: the segment ids (the Mamba-2 scan restarts at each
        document). There is no RoPE: positions are implicit in the scan."""
        return {"segments_bt": segment_ids_bt}

    def head(self, x_btd):
        """The last block's output [batch, seq, d] -> logits [batch, seq, vocab]: final norm, then the LM head."""
        return self.norm_f(x_btd) @ self.lm_head_dv[...]
