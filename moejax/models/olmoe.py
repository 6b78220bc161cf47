"""OLMoE (allenai/OLMoE-1B-7B): decoder layers of attention, its queries and keys RMS-normalised over the whole
projection (all heads together) and optionally clipped, + softmax-routed SwiGLU experts in every layer.

The whole architecture, top to bottom: its config (read from and written back to config.json), its Hugging Face key
map, its modules, the published shapes `moejax plan` knows, and the tiny transformers config the tests build.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from moejax.config import Fields, ModelConfig, RopeConfig, check_hf, require, require_exchange
from moejax.keymap import KeyMap, Rule, decoder_rules, decoder_top, swiglu_expert_rules, transpose
from moejax.layers.attention import Attention
from moejax.layers.moe import SoftmaxMoE
from moejax.models.decoder import DecoderLayer, DecoderLM, rms_norm

# --- config ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OlmoeConfig(ModelConfig):
    """Every OLMoE config.json field that changes the forward pass. head_dim is hidden_size / num_attention_heads
    (transformers' rule: OLMoE's config has no head_dim), so it can be any size (e.g. 22)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # each expert's
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig(theta=10000.0)
    max_position_embeddings: int = 4096
    router_aux_loss_coef: float | None = None  # the load-balancing coefficient the model was trained with
    expert_exchange: str = "auto"

    model_type = "olmoe"
    router_kind = "softmax"  # softmax over all experts, top-k, optionally renormalised (as Qwen3-MoE)
    sliding_window = None
    _READ = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv",
        "tie_word_embeddings", "attention_bias", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "hidden_act", "max_position_embeddings", "router_aux_loss_coef", "head_dim",
    }
    _INERT = frozenset()

    def __post_init__(self):
        src = f"{self.model_type} config"
        require(self.hidden_size % self.num_attention_heads == 0, src,
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads} "
                "(OLMoE's head_dim is their quotient)")
        require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        require(0 < self.num_experts_per_tok <= self.num_experts, src,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        require(self.clip_qkv is None or self.clip_qkv > 0, src, f"clip_qkv={self.clip_qkv} must be > 0")
        require_exchange(self)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> OlmoeConfig:
        """Builds the config from a parsed OLMoE config.json; unsupported values raise ConfigError."""
        check_hf(cls, d, source)
        act = d.get("hidden_act", "silu")
        require(act == "silu", source, f"hidden_act={act!r} is not supported (OLMoE uses 'silu')")
        f = Fields(d, source)
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        # transformers reads a head_dim if one is given, but sizes the QK-norms by hidden_size: only hidden / heads
        # gives a model it can run.
        head_dim = f.int("head_dim", None, minimum=1)
        require(head_dim is None or head_dim * heads == hidden, source,
                f"head_dim={head_dim} with num_attention_heads={heads} does not cover hidden_size={hidden} "
                "(OLMoE's QK-norm spans hidden_size)")
        experts_field = "num_experts" if "num_experts" in d else "num_local_experts"
        return cls(
            vocab_size=f.int("vocab_size", minimum=1), hidden_size=hidden,
            num_hidden_layers=f.int("num_hidden_layers", minimum=1), num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads, minimum=1),
            intermediate_size=f.int("intermediate_size", minimum=1), num_experts=f.int(experts_field, minimum=1),
            num_experts_per_tok=f.int("num_experts_per_tok", minimum=1),
            norm_topk_prob=f.bool("norm_topk_prob", False), clip_qkv=f.float("clip_qkv", None),
            tie_word_embeddings=f.bool("tie_word_embeddings", False), attention_bias=f.bool("attention_bias", False),
            rms_norm_eps=f.float("rms_norm_eps", 1e-5), rope=RopeConfig.from_hf(d, source),
            max_position_embeddings=f.int("max_position_embeddings", 4096, minimum=1),
            router_aux_loss_coef=f.float("router_aux_loss_coef", None),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads for this model."""
        skip = ("rope", "expert_exchange")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if self.router_aux_loss_coef is None:
            del d["router_aux_loss_coef"]
        d.update(model_type=self.model_type, architectures=["OlmoeForCausalLM"], hidden_act="silu",
                 rope_parameters=self.rope.to_hf())
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return ("moe",) * self.num_hidden_layers

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts

    @property
    def expert_ffn_size(self) -> int:
        """The intermediate width of each routed expert."""
        return self.intermediate_size

    def parameter_count(self) -> int:
        """The number of parameters, counted from the architecture's definition (not from a model)."""
        d, h, n, k = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        e = self.num_experts
        attention = d * h * (2 * n + 2 * k) + (n + k) * h + ((n + 2 * k) * h + d if self.attention_bias else 0)
        moe = d * e + 3 * e * d * self.intermediate_size
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d + self.num_hidden_layers * (
            attention + 2 * d + moe)

    @classmethod
    def olmoe_1b_7b(cls) -> OlmoeConfig:
        """allenai/OLMoE-1B-7B-0924: 16 layers of 64 experts, 8 chosen, clip_qkv unset."""
        return cls(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   norm_topk_prob=False, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                   max_position_embeddings=4096, router_aux_loss_coef=0.01)


# --- Hugging Face key map -------------------------------------------------------------------------------------


def keymap(cfg: OlmoeConfig) -> KeyMap:
    """The key map of OlmoeForCausalLM checkpoints (per-expert tensors, as save_pretrained writes them, or fused
    gate_up_proj [E, 2f, d] / down_proj [E, d, f], as transformers holds them in memory). The QK-norm weights cover
    the whole projection: [n * h] and [k * h] on disk, [n, h] and [k, h] in moejax."""
    d, n, k, h, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts
    p = "model.layers.{i}."
    layer = {
        **decoder_rules(p, d, n, k, h),
        ("self_attn", "q_norm_all", "weight"): [Rule(p + "self_attn.q_norm.weight", (n * h,),
                                                     lambda a: a.reshape(n, h))],
        ("self_attn", "k_norm_all", "weight"): [Rule(p + "self_attn.k_norm.weight", (k * h,),
                                                     lambda a: a.reshape(k, h))],
        ("mlp", "router", "w_de"): [Rule(p + "mlp.gate.weight", (e, d), transpose)],
        **swiglu_expert_rules(p + "mlp.experts.", e, d, cfg.intermediate_size),
    }
    top, optional = decoder_top(cfg.vocab_size, d, cfg.tie_word_embeddings)
    return KeyMap(top=top, layer=layer, num_experts=e, optional_keys=optional)


# --- modules --------------------------------------------------------------------------------------------------


def make_layer(cfg: OlmoeConfig, kind: str, *, dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """One decoder layer: attention with the whole-projection QK-norm (and clip_qkv), then the sparse MoE block."""
    d = cfg.hidden_size
    attention = Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=cfg.attention_bias,
                          qk_norm_eps=cfg.rms_norm_eps, qk_norm_over="all", clip_qkv=cfg.clip_qkv, dtype=dtype,
                          rngs=rngs)
    moe = SoftmaxMoE(d, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                     normalize=cfg.norm_topk_prob, exchange=cfg.expert_exchange, dtype=dtype, rngs=rngs)
    return DecoderLayer(kind, rms_norm(cfg, dtype=dtype, rngs=rngs), attention, rms_norm(cfg, dtype=dtype, rngs=rngs),
                        moe)


class OlmoeForCausalLM(DecoderLM):
    """Embeddings, the scanned decoder stack, final norm and the (optionally tied) LM head."""

    make_layer = staticmethod(make_layer)


# The published shapes `moejax plan` knows by name.
PRESETS = {"olmoe-1b-7b": OlmoeConfig.olmoe_1b_7b}


def tiny_reference_config(**overrides):
    """A tiny transformers OlmoeConfig for tests and benchmarks: head_dim 22 (hidden 44 over 2 heads), GQA, clip_qkv
    small enough to clip (overrides replace its fields)."""
    import transformers

    base = dict(vocab_size=97, hidden_size=44, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=2.0,
                rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.OlmoeConfig(**(base | overrides))


Config, Model = OlmoeConfig, OlmoeForCausalLM
