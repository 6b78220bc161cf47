"""Frozen model configs built from a Hugging Face config.json, with presets for the published shapes.

Every config.json field is either read (it changes the forward pass), listed as known-inert (it does
not), or rejected: a field this code has never seen could change the model, so it is an error rather
than a silent ignore.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json this library cannot represent faithfully."""


# Fields that PreTrainedConfig writes for every model and that never change a forward pass.
_GENERIC_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_router_logits", "router_aux_loss_coef", "attention_dropout",
    "max_position_embeddings", "_name_or_path", "name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "problem_type", "task_specific_params", "_attn_implementation_autoset",
    "num_labels", "label_smoothing", "auto_map_disabled", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: theta and the scaling scheme ("default", "linear" or "yarn")."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    SUPPORTED = ("default", "linear", "yarn")

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str) -> RopeConfig:
        """Reads rope_parameters (transformers >= 5) or rope_theta + rope_scaling (older checkpoints)."""
        params = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        params = {**legacy, **params}
        kind = params.pop("rope_type", params.pop("type", "default"))
        if kind not in cls.SUPPORTED:
            raise ConfigError(
                f"{source}: rope type {kind!r} is not supported; moejax implements {cls.SUPPORTED}. "
                "Remove rope_scaling for the model's native context or convert to one of these."
            )
        known = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                 "attention_factor", "truncate", "mscale", "mscale_all_dim", "partial_rotary_factor"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown rope parameter(s) {unknown} for rope type {kind!r}.")
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise ConfigError(f"{source}: yarn mscale/mscale_all_dim are not supported.")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported.")
        factor = float(params.get("factor") or 1.0)
        original = params.get("original_max_position_embeddings")
        if kind == "yarn" and original is None:
            original = d.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        return cls(
            theta=float(theta), kind=kind, factor=factor,
            original_max_position_embeddings=None if original is None else int(original),
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.kind}
        if self.kind != "default":
            out["factor"] = self.factor
        if self.kind == "yarn":
            out.update(original_max_position_embeddings=self.original_max_position_embeddings,
                       beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        return out

    @property
    def mscale(self) -> float:
        """The factor transformers multiplies cos/sin by (1 except for yarn)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


def _check_fields(d: dict[str, Any], read: set[str], inert: set[str], source: str) -> None:
    unknown = sorted(set(d) - read - inert - _GENERIC_INERT)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config field(s) {unknown}. moejax does not know whether they change "
            "the forward pass; if they do not, add them to the architecture's inert list in moejax/config.py."
        )


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {message}")


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
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

    model_type = "qwen3_moe"
    _READ = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
        "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
        "tie_word_embeddings", "attention_bias", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
        "max_position_embeddings", "original_max_position_embeddings",
    }
    _INERT = frozenset()

    def __post_init__(self):
        src = f"{self.model_type} config"
        _require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(0 < self.num_experts_per_tok <= self.num_experts or not self.moe_layers, src,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        _require(self.decoder_sparse_step >= 1, src, "decoder_sparse_step must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        _require(not bad, src, f"mlp_only_layers {bad} are outside [0, {self.num_hidden_layers})")

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3MoeConfig:
        """Builds the config from a parsed Qwen3-MoE config.json; unsupported values raise ConfigError."""
        _require(d.get("model_type") == cls.model_type, source,
                 f"model_type is {d.get('model_type')!r}, expected {cls.model_type!r}")
        _check_fields(d, cls._READ, set(cls._INERT), source)
        act = d.get("hidden_act", "silu")
        _require(act == "silu", source, f"hidden_act={act!r} is not supported (Qwen3-MoE uses 'silu')")
        _require(not d.get("use_sliding_window", False), source,
                 "use_sliding_window=true is not supported (no published Qwen3-MoE uses it)")
        num_experts = d.get("num_experts", d.get("num_local_experts"))
        _require(num_experts is not None, source, "missing num_experts")
        try:
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                moe_intermediate_size=int(d["moe_intermediate_size"]),
                num_experts=int(num_experts), num_experts_per_tok=int(d["num_experts_per_tok"]),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(d, source),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads for this model."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d.update(model_type=self.model_type, architectures=["Qwen3MoeForCausalLM"], hidden_act="silu",
                 rope_parameters=self.rope.to_hf(), use_sliding_window=False)
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
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @classmethod
    def qwen3_30b_a3b(cls) -> Qwen3MoeConfig:
        """Qwen/Qwen3-30B-A3B (base and instruct share this shape)."""
        return cls(
            vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
            rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=40960,
        )


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Parses config.json, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json; a Hugging Face checkpoint directory holds one.")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d
