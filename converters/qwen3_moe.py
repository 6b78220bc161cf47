"""Qwen3-MoE: Hugging Face tensor names <-> moejax parameters."""

from __future__ import annotations

from converters.keymap import KeyMap, Rule
from moejax.config import Qwen3MoeConfig


def _t(a):
    return a.T


def keymap(cfg: Qwen3MoeConfig) -> KeyMap:
    """The key map of Qwen3MoeForCausalLM checkpoints (per-expert tensors, or fused gate_up_proj)."""
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f, ff, v = cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.vocab_size
    p = "model.layers.{i}."

    def heads(count):  # [count*h, d] -> [d, count, h]
        return lambda a: a.reshape(count, h, d).transpose(2, 0, 1)

    layer = {
        ("input_layernorm", "weight"): [Rule(p + "input_layernorm.weight", (d,))],
        ("post_attention_layernorm", "weight"): [Rule(p + "post_attention_layernorm.weight", (d,))],
        ("self_attn", "q_dnh"): [Rule(p + "self_attn.q_proj.weight", (n * h, d), heads(n))],
        ("self_attn", "k_dkh"): [Rule(p + "self_attn.k_proj.weight", (k * h, d), heads(k))],
        ("self_attn", "v_dkh"): [Rule(p + "self_attn.v_proj.weight", (k * h, d), heads(k))],
        ("self_attn", "o_nhd"): [Rule(p + "self_attn.o_proj.weight", (d, n * h),
                                      lambda a: a.reshape(d, n, h).transpose(1, 2, 0))],
        ("self_attn", "q_bias_nh"): [Rule(p + "self_attn.q_proj.bias", (n * h,), lambda a: a.reshape(n, h))],
        ("self_attn", "k_bias_kh"): [Rule(p + "self_attn.k_proj.bias", (k * h,), lambda a: a.reshape(k, h))],
        ("self_attn", "v_bias_kh"): [Rule(p + "self_attn.v_proj.bias", (k * h,), lambda a: a.reshape(k, h))],
        ("self_attn", "o_bias_d"): [Rule(p + "self_attn.o_proj.bias", (d,))],
        ("self_attn", "q_norm", "weight"): [Rule(p + "self_attn.q_norm.weight", (h,))],
        ("self_attn", "k_norm", "weight"): [Rule(p + "self_attn.k_norm.weight", (h,))],
        ("mlp", "router", "w_de"): [Rule(p + "mlp.gate.weight", (e, d), _t)],
        ("mlp", "experts", "gate_edf"): [
            Rule(p + "mlp.experts.{e}.gate_proj.weight", (f, d), _t),
            Rule(p + "mlp.experts.gate_up_proj", (e, 2 * f, d), lambda a: a[:, :f].transpose(0, 2, 1))],
        ("mlp", "experts", "up_edf"): [
            Rule(p + "mlp.experts.{e}.up_proj.weight", (f, d), _t),
            Rule(p + "mlp.experts.gate_up_proj", (e, 2 * f, d), lambda a: a[:, f:].transpose(0, 2, 1))],
        ("mlp", "experts", "down_efd"): [
            Rule(p + "mlp.experts.{e}.down_proj.weight", (d, f), _t),
            Rule(p + "mlp.experts.down_proj", (e, d, f), lambda a: a.transpose(0, 2, 1))],
        ("mlp", "gate_df"): [Rule(p + "mlp.gate_proj.weight", (ff, d), _t)],
        ("mlp", "up_df"): [Rule(p + "mlp.up_proj.weight", (ff, d), _t)],
        ("mlp", "down_fd"): [Rule(p + "mlp.down_proj.weight", (d, ff), _t)],
    }
    top = {
        ("embed_vd",): [Rule("model.embed_tokens.weight", (v, d))],
        ("norm", "weight"): [Rule("model.norm.weight", (d,))],
        ("lm_head_dv",): [Rule("lm_head.weight", (v, d), _t)],
    }
    # A tied checkpoint may still carry the (identical) head; it is not read.
    optional = frozenset({"lm_head.weight"}) if cfg.tie_word_embeddings else frozenset()
    return KeyMap(top=top, layer=layer, num_experts=e, optional_keys=optional)
