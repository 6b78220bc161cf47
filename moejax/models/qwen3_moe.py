"""Qwen3-MoE (e.g. Qwen3-30B-A3B): decoder layers of QK-normed GQA + softmax-routed SwiGLU experts."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import Qwen3MoeConfig
from moejax.layers.attention import Attention
from moejax.layers.mlp import MLP
from moejax.layers.moe import SoftmaxMoE
from moejax.layers.norms import RMSNorm
from moejax.layers.params import param
from moejax.layers.rope import inverse_frequencies, rope_tables
from moejax.layers.stack import LayerStack
from moejax.models.common import CausalLM


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the mlp is the sparse MoE block when kind == "moe"."""

    def __init__(self, cfg: Qwen3MoeConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, axis_name="embed", dtype=dtype, rngs=rngs)
        self.self_attn = Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps, window=cfg.sliding_window,
                                   dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, axis_name="embed", dtype=dtype, rngs=rngs)
        if kind == "moe":
            self.mlp = SoftmaxMoE(d, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                                  normalize=cfg.norm_topk_prob, exchange=cfg.expert_exchange, dtype=dtype,
                                  rngs=rngs)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, activation="swiglu", dtype=dtype, rngs=rngs)
        self.kind = kind

    def cache(self, batch: int, length: int, dtype):
        return self.self_attn.cache(batch, length, dtype)

    def __call__(self, x_btd, *, mask_bts, rope_cos_sin, control=None, cache=None, cache_slot=0, repeat=None):
        """-> (x, the MoE routing or None, the updated KV cache or None); repeat: see LayerStack.index_experts."""
        h_btd = self.input_layernorm(x_btd)
        if cache is None:
            x_btd = x_btd + self.self_attn(h_btd, mask_bts, rope_cos_sin)
        else:
            y_btd, cache = self.self_attn(h_btd, mask_bts, rope_cos_sin, cache, cache_slot)
            x_btd = x_btd + y_btd
        if self.kind == "moe":
            y_btd, routing = self.mlp(self.post_attention_layernorm(x_btd), control, repeat)
            return x_btd + y_btd, routing, cache
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), None, cache


class Qwen3MoeForCausalLM(CausalLM):
    """Embeddings, the scanned decoder stack, final norm and the (optionally tied) LM head."""

    def __init__(self, cfg: Qwen3MoeConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_vd = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=1)
        self.layers = LayerStack(
            cfg.layer_kinds, lambda kind, rngs: DecoderLayer(cfg, kind, dtype=dtype, rngs=rngs), rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis_name="embed", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head_dv = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def layer_context(self, segment_ids_bt, position_ids_bt, dtype) -> dict:
        """What every decoder layer takes besides x and the mask: the RoPE tables of these positions."""
        inv_freq_h = inverse_frequencies(self.config.rope, self.config.head_dim)
        return {"rope_cos_sin": rope_tables(position_ids_bt, inv_freq_h, self.config.rope.mscale, dtype)}

    def head(self, x_btd):
        """The last block's output [batch, seq, d] -> logits [batch, seq, vocab]: final norm, then the LM head."""
        head_dv = self.embed_vd[...].T if self.config.tie_word_embeddings else self.lm_head_dv[...]
        return self.norm(x_btd) @ head_dv
