"""Qwen3-MoE (e.g. Qwen3-30B-A3B): decoder layers of QK-normed GQA + softmax-routed SwiGLU experts.

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
from moejax.layers.mlp import MLP
from moejax.layers.moe import SoftmaxMoE
from moejax.models.decoder import DecoderLayer, DecoderLM, rms_norm

# --- config -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):
    """Every Qwen3-MoE config.json field that changes the forward pass."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(theta=1_000_000.0)
    max_position_embeddings: int = 40960
    router_aux_loss_coef: float | None = None  # the load-balancing coefficient the model was trained with
    sliding_window: int | None = None  # every layer's attention window (use_sliding_window), None: full attention
    expert_exchange: str = "auto"

    model_type = "qwen3_moe"
    _READ = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
        "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
        "tie_word_embeddings", "attention_bias", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
        "max_position_embeddings", "original_max_position_embeddings", "router_aux_loss_coef",
    }
    _INERT = frozenset()

    def __post_init__(self):
        src = f"{self.model_type} config"
        require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        require(0 < self.num_experts_per_tok <= self.num_experts or not self.moe_layers, src,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        require(self.decoder_sparse_step >= 1, src, "decoder_sparse_step must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        require(not bad, src, f"mlp_only_layers {bad} are outside [0, {self.num_hidden_layers})")
        require_exchange(self)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3MoeConfig:
        """Builds the config from a parsed Qwen3-MoE config.json; unsupported values raise ConfigError."""
        check_hf(cls, d, source)
        act = d.get("hidden_act", "silu")
        require(act == "silu", source, f"hidden_act={act!r} is not supported (Qwen3-MoE uses 'silu')")
        f = Fields(d, source)
        # transformers windows every layer's attention when use_sliding_window is set (max_window_layers is unused).
        window = f.int("sliding_window", None, minimum=1) if f.bool("use_sliding_window", False) else None
        experts_field = "num_experts" if "num_experts" in d else "num_local_experts"
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        return cls(
            vocab_size=f.int("vocab_size", minimum=1), hidden_size=hidden,
            num_hidden_layers=f.int("num_hidden_layers", minimum=1), num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads, minimum=1),
            head_dim=f.int("head_dim", hidden // heads, minimum=1),
            intermediate_size=f.int("intermediate_size", minimum=1),
            moe_intermediate_size=f.int("moe_intermediate_size", minimum=1),
            num_experts=f.int(experts_field, minimum=0), num_experts_per_tok=f.int("num_experts_per_tok", minimum=1),
            norm_topk_prob=f.bool("norm_topk_prob", False), decoder_sparse_step=f.int("decoder_sparse_step", 1),
            mlp_only_layers=f.ints("mlp_only_layers"), tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=f.bool("attention_bias", False), rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(d, source),
            max_position_embeddings=f.int("max_position_embeddings", 40960, minimum=1),
            router_aux_loss_coef=f.float("router_aux_loss_coef", None), sliding_window=window,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads for this model."""
        skip = ("rope", "expert_exchange")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        if self.router_aux_loss_coef is None:
            del d["router_aux_loss_coef"]
        d.update(model_type=self.model_type, architectures=["Qwen3MoeForCausalLM"], hidden_act="silu",
                 rope_parameters=self.rope.to_hf(), use_sliding_window=self.sliding_window is not None)
        return d

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Per decoder layer: "moe" or "mlp", by transformers' rule."""
        return tuple(
            "moe" if i not in self.mlp_only_layers and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0 else "mlp"
            for i in range(self.num_hidden_layers)
        )

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts

    router_kind = "softmax"  # softmax top-k over the raw logits

    @property
    def expert_ffn_size(self) -> int:
        """The intermediate width of each routed expert."""
        return self.moe_intermediate_size

    def parameter_count(self) -> int:
        """The number of parameters, counted from the architecture's definition (not from a model)."""
        d, h, n, k = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attention = d * h * (2 * n + 2 * k) + 2 * h + (n * h + 2 * k * h + d if self.attention_bias else 0)
        mixer = {"moe": d * self.num_experts + 3 * self.num_experts * d * self.moe_intermediate_size,
                 "mlp": 3 * d * self.intermediate_size}
        layers = sum(attention + 2 * d + mixer[kind] for kind in self.layer_kinds)
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d + layers

    @classmethod
    def qwen3_30b_a3b(cls) -> Qwen3MoeConfig:
        """Qwen/Qwen3-30B-A3B (base and instruct share this shape)."""
        return cls(
            vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
            rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=40960, router_aux_loss_coef=0.001,
        )


# --- Hugging Face key map -----------------------------------------------------------------------------------

def keymap(cfg: Qwen3MoeConfig) -> KeyMap:
    """The key map of Qwen3MoeForCausalLM checkpoints (per-expert tensors, or fused gate_up_proj)."""
    d, h, e, ff = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.intermediate_size
    p = "model.layers.{i}."
    layer = {
        **decoder_rules(p, d, cfg.num_attention_heads, cfg.num_key_value_heads, h),
        ("self_attn", "q_norm", "weight"): [Rule(p + "self_attn.q_norm.weight", (h,))],
        ("self_attn", "k_norm", "weight"): [Rule(p + "self_attn.k_norm.weight", (h,))],
        ("mlp", "router", "w_de"): [Rule(p + "mlp.gate.weight", (e, d), transpose)],
        **swiglu_expert_rules(p + "mlp.experts.", e, d, cfg.moe_intermediate_size),
        ("mlp", "gate_df"): [Rule(p + "mlp.gate_proj.weight", (ff, d), transpose)],
        ("mlp", "up_df"): [Rule(p + "mlp.up_proj.weight", (ff, d), transpose)],
        ("mlp", "down_fd"): [Rule(p + "mlp.down_proj.weight", (d, ff), transpose)],
    }
    top, optional = decoder_top(cfg.vocab_size, d, cfg.tie_word_embeddings)
    return KeyMap(top=top, layer=layer, num_experts=e, optional_keys=optional)


# --- modules ------------------------------------------------------------------------------------------------

def make_layer(cfg: Qwen3MoeConfig, kind: str, *, dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """One decoder layer: QK-normed attention (per head), and the sparse MoE block when kind == "moe", else the
    dense SwiGLU MLP."""
    d = cfg.hidden_size
    attention = Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=cfg.attention_bias,
                          qk_norm_eps=cfg.rms_norm_eps, window=cfg.sliding_window, dtype=dtype, rngs=rngs)
    if kind == "moe":
        mlp = SoftmaxMoE(d, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                         normalize=cfg.norm_topk_prob, exchange=cfg.expert_exchange, dtype=dtype, rngs=rngs)
    else:
        mlp = MLP(d, cfg.intermediate_size, activation="swiglu", dtype=dtype, rngs=rngs)
    return DecoderLayer(kind, rms_norm(cfg, dtype=dtype, rngs=rngs), attention, rms_norm(cfg, dtype=dtype, rngs=rngs),
                        mlp)


class Qwen3MoeForCausalLM(DecoderLM):
    """Embeddings, the scanned decoder stack, final norm and the (optionally tied) LM head."""

    make_layer = staticmethod(make_layer)


# The published shapes `moejax plan` knows by name.
PRESETS = {"qwen3-30b-a3b": Qwen3MoeConfig.qwen3_30b_a3b}


def tiny_reference_config(**overrides):
    """A tiny transformers Qwen3MoeConfig for tests and benchmarks (overrides replace its fields)."""
    import transformers

    base = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
                moe_intermediate_size=24, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.Qwen3MoeConfig(**(base | overrides))


Config, Model = Qwen3MoeConfig, Qwen3MoeForCausalLM
