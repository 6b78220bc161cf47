"""GPT-OSS (openai/gpt-oss-20b, -120b): decoder layers alternating sliding-window and full attention, both with
biases and one learned sink logit per head, + a biased router (top-k of the raw logits, softmaxed over the k) over
clamped-SwiGLU experts with biases, in every layer; YaRN RoPE; norms in float32.

The whole architecture, top to bottom: its config (read from and written back to config.json), its Hugging Face key
map (the bfloat16 layout, and the MXFP4-quantized experts of the published checkpoints, dequantized on load), its
modules, the published shapes `moejax plan` knows, and the tiny transformers config the tests build.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from moejax.config import Fields, ModelConfig, RopeConfig, check_hf, require, require_exchange
from moejax.errors import ConfigError
from moejax.keymap import KeyMap, Rule, decoder_rules, decoder_top, transpose
from moejax.layers.attention import Attention
from moejax.layers.mlp import ClampedSwiGLU
from moejax.layers.moe import GptOssMoE
from moejax.layers.norms import RMSNorm
from moejax.models.decoder import DecoderLayer, DecoderLM
from moejax.mxfp4 import dequantize_mxfp4

# --- config ---------------------------------------------------------------------------------------------------

# config.json's layer_types -> moejax's layer kinds (every layer routes: moejax.layers.stack.is_moe).
LAYER_TYPES = {"sliding_attention": "moe_sliding", "full_attention": "moe"}


@dataclasses.dataclass(frozen=True)
class GptOssConfig(ModelConfig):
    """Every GPT-OSS config.json field that changes the forward pass."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # each expert's
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]  # "sliding_attention" or "full_attention", per layer
    sliding_window: int | None = 128
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig(theta=150000.0, kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                                  truncate=False)
    max_position_embeddings: int = 131072
    router_aux_loss_coef: float | None = None
    expert_exchange: str = "auto"

    model_type = "gpt_oss"
    router_kind = "topk_softmax"  # top-k of the raw (biased) logits, then a softmax over the k chosen
    _READ = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok", "layer_types",
        "sliding_window", "swiglu_alpha", "swiglu_limit", "attention_bias", "tie_word_embeddings", "rms_norm_eps",
        "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "max_position_embeddings",
        "router_aux_loss_coef", "quantization_config",
    }
    _INERT = frozenset({"experts_per_token", "initial_context_length"})

    def __post_init__(self):
        src = f"{self.model_type} config"
        require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        require(0 < self.num_experts_per_tok <= self.num_local_experts, src,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts="
                f"{self.num_local_experts}]")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        require(not bad, src, f"layer_types {bad} are not among {sorted(LAYER_TYPES)}")
        require(self.sliding_window is not None or "sliding_attention" not in self.layer_types, src,
                "sliding_attention layers need a sliding_window")
        require(self.swiglu_limit > 0, src, f"swiglu_limit={self.swiglu_limit} must be > 0")
        require_exchange(self)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        """Builds the config from a parsed GPT-OSS config.json; unsupported values raise ConfigError."""
        check_hf(cls, d, source)
        act = d.get("hidden_act", "silu")
        require(act == "silu", source, f"hidden_act={act!r} is not supported (GPT-OSS's experts use their clamped "
                                       "SwiGLU)")
        quantization = d.get("quantization_config")
        if quantization is not None and (not isinstance(quantization, dict)
                                         or quantization.get("quant_method") != "mxfp4"):
            raise ConfigError(f"{source}: quantization_config {quantization!r} is not supported (only the published "
                              "checkpoints' mxfp4 experts, dequantized on load)")
        f = Fields(d, source)
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        layers = f.int("num_hidden_layers", minimum=1)
        types = d.get("layer_types")
        if types is None:  # transformers' default: sliding first, then alternating
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        require(isinstance(types, list) and len(types) == layers and all(isinstance(t, str) for t in types), source,
                f"layer_types must list num_hidden_layers={layers} strings, got {types!r}")
        experts_field = "num_local_experts" if "num_local_experts" in d else "num_experts"
        rope = RopeConfig.from_hf(d, source) if ("rope_parameters" in d or "rope_scaling" in d
                                                   or "rope_theta" in d) else cls.rope
        return cls(
            vocab_size=f.int("vocab_size", minimum=1), hidden_size=hidden, num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads, minimum=1),
            head_dim=f.int("head_dim", hidden // heads, minimum=1),
            intermediate_size=f.int("intermediate_size", minimum=1),
            num_local_experts=f.int(experts_field, minimum=1),
            num_experts_per_tok=f.int("num_experts_per_tok", minimum=1), layer_types=tuple(types),
            sliding_window=f.int("sliding_window", None, minimum=1),
            swiglu_alpha=f.float("swiglu_alpha", 1.702), swiglu_limit=f.float("swiglu_limit", 7.0),
            attention_bias=f.bool("attention_bias", True), tie_word_embeddings=f.bool("tie_word_embeddings", False),
            rms_norm_eps=f.float("rms_norm_eps", 1e-5), rope=rope,
            max_position_embeddings=f.int("max_position_embeddings", 131072, minimum=1),
            router_aux_loss_coef=f.float("router_aux_loss_coef", None),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads for this model (unquantized)."""
        skip = ("rope", "expert_exchange")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["layer_types"] = list(self.layer_types)
        if self.router_aux_loss_coef is None:
            del d["router_aux_loss_coef"]
        d.update(model_type=self.model_type, architectures=["GptOssForCausalLM"], hidden_act="silu",
                 num_hidden_layers=len(self.layer_types), rope_parameters=self.rope.to_hf())
        return d

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(LAYER_TYPES[t] for t in self.layer_types)

    @property
    def num_routed_experts(self) -> int:
        return self.num_local_experts

    @property
    def expert_ffn_size(self) -> int:
        """The intermediate width of each routed expert."""
        return self.intermediate_size

    @property
    def activation(self) -> ClampedSwiGLU:
        return ClampedSwiGLU(alpha=self.swiglu_alpha, limit=self.swiglu_limit)

    def parameter_count(self) -> int:
        """The number of parameters, counted from the architecture's definition (not from a model)."""
        d, h, n, k, e = (self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads,
                         self.num_local_experts)
        f = self.intermediate_size
        attention = d * h * (2 * n + 2 * k) + n + ((n + 2 * k) * h + d if self.attention_bias else 0)
        moe = d * e + e + e * (3 * d * f + 2 * f + d)
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d + self.num_hidden_layers * (
            attention + 2 * d + moe)

    @classmethod
    def gpt_oss_20b(cls) -> GptOssConfig:
        """openai/gpt-oss-20b: 24 layers alternating sliding (128) and full attention, 32 experts, 4 chosen."""
        return cls(vocab_size=201088, hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                   layer_types=("sliding_attention", "full_attention") * 12, sliding_window=128,
                   max_position_embeddings=131072, router_aux_loss_coef=0.9)


# --- Hugging Face key map -------------------------------------------------------------------------------------


def keymap(cfg: GptOssConfig) -> KeyMap:
    """The key map of GptOssForCausalLM checkpoints: experts fused, gate and up interleaved along the last axis
    (gate_up_proj [E, d, 2f]: gate = [..., ::2], up = [..., 1::2]), down_proj [E, f, d]; or their MXFP4 form
    (*_blocks and *_scales, dequantized exactly on load: moejax.mxfp4)."""
    d, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    p = "model.layers.{i}."
    x = p + "mlp.experts."

    def mxfp4(name: str, rows: int, cols: int, take, shape):
        """The MXFP4 form of expert tensor `name` ([E, cols, rows] dequantized), `take` applied after."""
        return Rule(x + name, (e, rows, cols), lambda blocks, scales: take(dequantize_mxfp4(blocks, scales, name)),
                    parts=(("_blocks", (e, rows, cols // 32, 16)), ("_scales", (e, rows, cols // 32))), shape=shape)

    layer = {
        **decoder_rules(p, d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
        ("self_attn", "sinks_n"): [Rule(p + "self_attn.sinks", (cfg.num_attention_heads,))],
        ("mlp", "router", "w_de"): [Rule(p + "mlp.router.weight", (e, d), transpose)],
        ("mlp", "router", "b_e"): [Rule(p + "mlp.router.bias", (e,))],
        ("mlp", "experts", "gate_edf"): [Rule(x + "gate_up_proj", (e, d, 2 * f), lambda a: a[..., ::2]),
                                         mxfp4("gate_up_proj", 2 * f, d, lambda a: a[..., ::2], (e, d, f))],
        ("mlp", "experts", "up_edf"): [Rule(x + "gate_up_proj", (e, d, 2 * f), lambda a: a[..., 1::2]),
                                       mxfp4("gate_up_proj", 2 * f, d, lambda a: a[..., 1::2], (e, d, f))],
        ("mlp", "experts", "down_efd"): [Rule(x + "down_proj", (e, f, d)),
                                         mxfp4("down_proj", d, f, lambda a: a, (e, f, d))],
        ("mlp", "experts", "gate_bias_ef"): [Rule(x + "gate_up_proj_bias", (e, 2 * f), lambda a: a[:, ::2])],
        ("mlp", "experts", "up_bias_ef"): [Rule(x + "gate_up_proj_bias", (e, 2 * f), lambda a: a[:, 1::2])],
        ("mlp", "experts", "down_bias_ed"): [Rule(x + "down_proj_bias", (e, d))],
    }
    top, optional = decoder_top(cfg.vocab_size, d, cfg.tie_word_embeddings)
    return KeyMap(top=top, layer=layer, num_experts=e, optional_keys=optional)


# --- modules --------------------------------------------------------------------------------------------------


def norm_dtype(dtype):
    """The norms' weights: float32 in a float16 model, as transformers keeps them (_keep_in_fp32_modules, applied
    to float16 only), else the model's dtype."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def make_layer(cfg: GptOssConfig, kind: str, *, dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """One decoder layer: attention with biases and sinks (windowed when kind is "moe_sliding"), then the sparse
    MoE block. The norms multiply by their weight in float32."""
    d = cfg.hidden_size
    window = cfg.sliding_window if kind == "moe_sliding" else None
    attention = Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=cfg.attention_bias,
                          sinks=True, window=window, dtype=dtype, rngs=rngs)
    moe = GptOssMoE(d, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                    activation=cfg.activation, exchange=cfg.expert_exchange, dtype=dtype, rngs=rngs)
    return DecoderLayer(kind, make_norm(cfg, dtype=dtype, rngs=rngs), attention, make_norm(cfg, dtype=dtype, rngs=rngs),
                        moe)


def make_norm(cfg: GptOssConfig, *, dtype, rngs: nnx.Rngs) -> RMSNorm:
    """RMSNorm multiplying by its weight in float32; the weight float32 in a float16 model (norm_dtype)."""
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis_name="embed", weight_in_float32=True,
                   dtype=norm_dtype(dtype), rngs=rngs)


class GptOssForCausalLM(DecoderLM):
    """Embeddings, the scanned stack of (sliding, full) layer pairs, final norm and the LM head."""

    make_layer, make_norm = staticmethod(make_layer), staticmethod(make_norm)


# The published shapes `moejax plan` knows by name.
PRESETS = {"gpt-oss-20b": GptOssConfig.gpt_oss_20b}


def tiny_reference_config(**overrides):
    """A tiny transformers GptOssConfig for tests and benchmarks: 4 layers alternating a 6-token sliding window and
    full attention, YaRN, a swiglu_limit low enough to clamp (overrides replace its fields)."""
    import transformers

    base = dict(vocab_size=97, hidden_size=48, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=3, sliding_window=6,
                swiglu_limit=1.5, rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 64})
    return transformers.GptOssConfig(**(base | overrides))


Config, Model = GptOssConfig, GptOssForCausalLM
