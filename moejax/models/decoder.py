"""What the attention-only decoder architectures share (Qwen3-MoE, OLMoE, GPT-OSS): the pre-norm decoder layer,
x + attn(norm(x)) then + mlp(norm(x)), and the language model around a stack of them (token embeddings, RoPE tables
from the positions, final norm and LM head). An architecture builds its own attention, norms and MLP or MoE block
and hands them over; the parameter paths (input_layernorm, self_attn, post_attention_layernorm, mlp; embed_vd, norm,
lm_head_dv) are the same for all of them.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import is_moe
from moejax.layers.norms import RMSNorm
from moejax.layers.params import param
from moejax.layers.rope import inverse_frequencies, rope_tables
from moejax.layers.stack import LayerStack
from moejax.models.common import CausalLM


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the mlp is a sparse MoE block (returning its routing) when the kind is
    an MoE kind (moejax.layers.stack.is_moe)."""

    def __init__(self, kind: str, input_layernorm: nnx.Module, self_attn: nnx.Module,
                 post_attention_layernorm: nnx.Module, mlp: nnx.Module):
        self.kind = kind
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

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
        if is_moe(self.kind):
            y_btd, routing = self.mlp(self.post_attention_layernorm(x_btd), control, repeat)
            return x_btd + y_btd, routing, cache
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), None, cache


def rms_norm(cfg, *, dtype, rngs: nnx.Rngs) -> RMSNorm:
    """The norm most decoders use: RMSNorm over hidden_size with rms_norm_eps, the weight applied in `dtype`."""
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis_name="embed", dtype=dtype, rngs=rngs)


class DecoderLM(CausalLM):
    """Embeddings, the scanned stack of the architecture's layers over cfg.layer_kinds, the final norm and the
    (optionally tied: cfg.tie_word_embeddings) LM head; RoPE from cfg.rope over cfg.head_dim. A subclass names its
    architecture's builders: make_layer(cfg, kind, dtype=, rngs=) -> DecoderLayer and, if not rms_norm,
    make_norm(cfg, dtype=, rngs=)."""

    make_layer = None
    make_norm = staticmethod(rms_norm)

    @property
    def reads_branches(self) -> bool:
        """Attention alone mixes tokens here; a sliding window would count the columns between branches."""
        return getattr(self.config, "sliding_window", None) is None

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        build = type(self)
        self.config = cfg
        self.embed_vd = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=1)
        self.layers = LayerStack(
            cfg.layer_kinds, lambda kind, rngs: build.make_layer(cfg, kind, dtype=dtype, rngs=rngs), rngs=rngs)
        self.norm = build.make_norm(cfg, dtype=dtype, rngs=rngs)
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
