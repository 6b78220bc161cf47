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

from moejax.errors import ConfigError

# Fields that PreTrainedConfig writes for every model and that never change a forward pass.
_GENERIC_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_router_logits", "attention_dropout",
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
        f = _Fields({**params, "rope_theta": theta}, f"{source} (rope parameters)")
        original = f.int("original_max_position_embeddings", None, minimum=1)
        if kind == "yarn" and original is None:
            original = _Fields(d, source).int("original_max_position_embeddings",
                                              _Fields(d, source).int("max_position_embeddings", None))
        return cls(
            theta=f.float("rope_theta"), kind=kind, factor=f.float("factor", 1.0),
            original_max_position_embeddings=original, beta_fast=f.float("beta_fast", 32.0),
            beta_slow=f.float("beta_slow", 1.0), attention_factor=f.float("attention_factor", None),
            truncate=f.bool("truncate", True),
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


def _check_hf(cls, d: dict[str, Any], source: str) -> None:
    """The config.json is of cls's model_type and has no field cls does not know."""
    _require(d.get("model_type") == cls.model_type, source,
             f"model_type is {d.get('model_type')!r}, expected {cls.model_type!r}")
    _check_fields(d, cls._READ, set(cls._INERT), source)


_MISSING = object()


class _Fields:
    """Typed reads of config.json fields, as strict as transformers' own config classes: an integer field takes a
    JSON integer (not 48.7, not 48.0, not true), a boolean a JSON boolean (not "false", not 1), a number an integer
    or a float (not a string); a required field may not be missing or null. Anything else is a ConfigError naming
    the file, the field, the value and what was expected."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def _value(self, name: str, default):
        value = self.d.get(name, _MISSING)
        if value is _MISSING or value is None and default is not _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing required field {name!r}")
            return default
        return value

    def _wrong(self, name: str, value, expected: str):
        shown = "null" if value is None else json.dumps(value)
        return ConfigError(f"{self.source}: {name} is {shown} ({_json_type(value)}); expected {expected}")

    def int(self, name: str, default=_MISSING, minimum: int | None = None) -> int:
        value = self._value(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(name, value, "an integer")
        if minimum is not None and value < minimum:
            raise self._wrong(name, value, f"an integer >= {minimum}")
        return value

    def float(self, name: str, default=_MISSING) -> float:
        value = self._value(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(name, value, "a number")
        return float(value)

    def bool(self, name: str, default=_MISSING) -> bool:
        value = self._value(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self._wrong(name, value, "true or false")
        return value

    def ints(self, name: str) -> tuple[int, ...]:
        value = self._value(name, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise self._wrong(name, value, "a list of integers")
        return tuple(value)


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {message}")


# How tokens reach the experts' devices under expert parallelism (moejax.layers.moe.expert_parallel): not in
# config.json; a moejax setting, given as a config override (from_pretrained(..., expert_exchange="all_to_all")).
EXPERT_EXCHANGES = ("auto", "all_gather", "all_to_all")


# What a layer's backward pass keeps from its forward pass when training (moejax.layers.stack.REMAT_POLICIES):
# everything; only each layer's input (the rest recomputed); the matmul outputs.
REMAT_NAMES = ("none", "full", "dots")


def _require_exchange(cfg) -> None:
    _require(cfg.expert_exchange in EXPERT_EXCHANGES, f"{cfg.model_type} config",
             f"expert_exchange={cfg.expert_exchange!r} is not one of {EXPERT_EXCHANGES}")


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
        _require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(0 < self.num_experts_per_tok <= self.num_experts or not self.moe_layers, src,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        _require(self.decoder_sparse_step >= 1, src, "decoder_sparse_step must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        _require(not bad, src, f"mlp_only_layers {bad} are outside [0, {self.num_hidden_layers})")
        _require_exchange(self)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3MoeConfig:
        """Builds the config from a parsed Qwen3-MoE config.json; unsupported values raise ConfigError."""
        _check_hf(cls, d, source)
        act = d.get("hidden_act", "silu")
        _require(act == "silu", source, f"hidden_act={act!r} is not supported (Qwen3-MoE uses 'silu')")
        f = _Fields(d, source)
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
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts

    router_kind = "softmax"  # softmax top-k over the raw logits
    router_groups = (1, 1)  # (groups, groups kept): no group limit

    @property
    def expert_input_size(self) -> int:
        """The width of the rows the routed experts take (and give back)."""
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        """The longest sequence the model's positions cover (RoPE's trained range)."""
        return self.max_position_embeddings

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


CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a checkpoint directory's config.json records (`dtype`, or `torch_dtype` before transformers 5);
    float32 if none."""
    source = Path(path) / "config.json"
    hf = read_config_json(source)
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if name not in CHECKPOINT_DTYPES:
        raise ConfigError(f"{source}: dtype {name!r} is not one of {', '.join(CHECKPOINT_DTYPES)}")
    return name


NEMOTRON_PATTERN = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
# transformers >= 5 names the kinds linear_attention/moe/full_attention/mlp; older configs mamba/moe/attention/mlp.
NEMOTRON_KINDS = {"mamba": "mamba", "linear_attention": "mamba", "moe": "moe", "attention": "attention",
                  "full_attention": "attention", "mlp": "mlp"}
# Config fields from before transformers 5 renamed them.
NEMOTRON_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_limit": "time_step_limit",
                   "mamba_dt_min": "time_step_min", "mamba_conv_bias": "use_conv_bias",
                   "mamba_chunk_size": "chunk_size"}


def _float_pair(value, source: str, name: str) -> tuple[float, float]:
    """A [low, high] pair; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    def one(v):
        if isinstance(v, dict) and "__float__" in v:
            return float(v["__float__"])
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(v)
        return float(v)

    try:
        low, high = (one(v) for v in value)
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{source}: {name} must be a [low, high] pair, got {value!r}") from None
    return low, high


@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
    """Every Nemotron-H config.json field that changes the forward pass.

    `dt_floor` is where the pinned transformers and the published model differ: transformers' PyTorch
    Mamba-2 path clamps dt to [time_step_min, inf) whatever `time_step_limit` says, while the model
    as trained and served (mamba_ssm kernels) clamps to `time_step_limit`. The default follows the
    config ("time_step_limit"); "time_step_min" reproduces transformers (the parity tests use it).
    """

    vocab_size: int
    hidden_size: int
    layer_kinds: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_min: float = 0.001
    layer_norm_epsilon: float = 1e-5
    router_aux_loss_coef: float | None = None  # the load-balancing coefficient, when config.json records one
    dt_floor: str = "time_step_limit"
    expert_exchange: str = "auto"

    model_type = "nemotron_h"
    DT_FLOORS = ("time_step_limit", "time_step_min")
    _READ = {
        "vocab_size", "hidden_size", "layers_block_type", "hybrid_override_pattern", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "mlp_hidden_act", "mlp_bias",
        "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
        "use_conv_bias", "mamba_hidden_act", "mamba_proj_bias", "use_bias", "time_step_limit", "time_step_min",
        "n_routed_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
        "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group", "topk_group", "routed_scaling_factor",
        "norm_topk_prob", "layer_norm_epsilon", "tie_word_embeddings", "sliding_window", "router_aux_loss_coef",
        *NEMOTRON_LEGACY,
    }
    # Read by transformers only for initialisation, caching, kernels or multi-token prediction, or
    # (attention_bias, residual_in_fp32, RoPE fields) not used by its Nemotron-H forward at all.
    _INERT = frozenset({
        "expand", "mamba_expand", "time_step_max", "time_step_floor", "mamba_dt_max", "mamba_dt_init_floor",
        "use_mamba_kernels", "mamba_ssm_cache_dtype", "num_logits_to_keep", "rescale_prenorm_residual",
        "hidden_dropout", "residual_in_fp32", "attention_bias", "moe_shared_expert_overlap",
        "num_nextn_predict_layers", "mtp_layers_block_type", "mtp_hybrid_override_pattern", "auto_map",
        "rope_theta", "partial_rotary_factor", "norm_eps", "rope_scaling", "rope_parameters",
    })

    def __post_init__(self):
        src = f"{self.model_type} config"
        _require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(self.mamba_num_heads % self.n_groups == 0, src,
                 f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}")
        _require(self.n_routed_experts % self.n_group == 0 and 0 < self.topk_group <= self.n_group, src,
                 f"n_routed_experts={self.n_routed_experts} must split into n_group={self.n_group} groups, "
                 f"and topk_group={self.topk_group} must be in [1, n_group]")
        _require(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2, src,
                 "group-limited routing scores each group by its top-2 experts: groups need >= 2 experts")
        _require(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group), src,
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group groups")
        _require(self.dt_floor in self.DT_FLOORS, src, f"dt_floor={self.dt_floor!r} is not one of {self.DT_FLOORS}")
        _require_exchange(self)
        bad = sorted(set(self.layer_kinds) - set(NEMOTRON_PATTERN.values()))
        _require(not bad, src, f"unknown layer kinds {bad}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> NemotronHConfig:
        """Builds the config from a parsed Nemotron-H config.json; unsupported values raise ConfigError."""
        _check_hf(cls, d, source)
        d = {**{new: d[old] for old, new in NEMOTRON_LEGACY.items() if old in d}, **d}
        if d.get("layers_block_type"):
            unknown = sorted(set(d["layers_block_type"]) - set(NEMOTRON_KINDS))
            _require(not unknown, source, f"layers_block_type has unknown kinds {unknown}; "
                                          f"expected {sorted(NEMOTRON_KINDS)}")
            kinds = tuple(NEMOTRON_KINDS[k] for k in d["layers_block_type"])
        else:
            pattern = d.get("hybrid_override_pattern")
            _require(isinstance(pattern, str) and pattern, source,
                     "needs layers_block_type or hybrid_override_pattern")
            unknown = sorted(set(pattern) - set(NEMOTRON_PATTERN))
            _require(not unknown, source, f"hybrid_override_pattern has unknown symbols {unknown}; "
                                          f"expected {sorted(NEMOTRON_PATTERN)}")
            kinds = tuple(NEMOTRON_PATTERN[c] for c in pattern)
        f = _Fields(d, source)
        layers = f.int("num_hidden_layers", None)
        _require(layers is None or layers == len(kinds), source,
                 f"num_hidden_layers={layers} but the layer pattern has {len(kinds)} layers")
        for field, supported in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            _require(d.get(field, supported) == supported, source,
                     f"{field}={d.get(field)!r} is not supported (Nemotron-H uses {supported!r})")
        for field in ("mlp_bias", "use_bias", "mamba_proj_bias", "tie_word_embeddings"):
            _require(not f.bool(field, False), source, f"{field}=true is not supported (no Nemotron-H uses it)")
        _require(d.get("sliding_window") is None, source, "sliding_window attention is not supported")
        _require(f.int("n_shared_experts", 1) == 1, source,
                 f"n_shared_experts={d.get('n_shared_experts')} is not supported: transformers builds exactly one "
                 "shared expert of moe_shared_expert_intermediate_size")
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        experts_field = "n_routed_experts" if "n_routed_experts" in d else "num_local_experts"
        return cls(
            vocab_size=f.int("vocab_size", minimum=1), hidden_size=hidden, layer_kinds=kinds,
            num_attention_heads=heads, num_key_value_heads=f.int("num_key_value_heads", heads, minimum=1),
            head_dim=f.int("head_dim", hidden // heads, minimum=1),
            intermediate_size=f.int("intermediate_size", minimum=1),
            mamba_num_heads=f.int("mamba_num_heads", minimum=1), mamba_head_dim=f.int("mamba_head_dim", minimum=1),
            ssm_state_size=f.int("ssm_state_size", minimum=1),
            n_groups=f.int("n_groups", 1, minimum=1), conv_kernel=f.int("conv_kernel", 4, minimum=1),
            chunk_size=f.int("chunk_size", 128, minimum=1), n_routed_experts=f.int(experts_field, 0, minimum=0),
            num_experts_per_tok=f.int("num_experts_per_tok", minimum=1),
            moe_intermediate_size=f.int("moe_intermediate_size", minimum=1),
            moe_shared_expert_intermediate_size=f.int("moe_shared_expert_intermediate_size", minimum=1),
            moe_latent_size=f.int("moe_latent_size", None, minimum=1),
            n_group=f.int("n_group", 1, minimum=1), topk_group=f.int("topk_group", 1, minimum=1),
            routed_scaling_factor=f.float("routed_scaling_factor", 1.0), norm_topk_prob=f.bool("norm_topk_prob", True),
            use_conv_bias=f.bool("use_conv_bias", True),
            time_step_limit=_float_pair(d.get("time_step_limit", (0.0, math.inf)), source, "time_step_limit"),
            time_step_min=f.float("time_step_min", 0.001), layer_norm_epsilon=f.float("layer_norm_epsilon", 1e-5),
            router_aux_loss_coef=f.float("router_aux_loss_coef", None),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers reads for this model."""
        skip = {"layer_kinds", "time_step_limit", "dt_floor", "expert_exchange"} | (
            {"router_aux_loss_coef"} if self.router_aux_loss_coef is None else set())
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        inverse = {v: k for k, v in NEMOTRON_PATTERN.items()}
        d.update(model_type=self.model_type, architectures=["NemotronHForCausalLM"],
                 hybrid_override_pattern="".join(inverse[k] for k in self.layer_kinds),
                 time_step_limit=list(self.time_step_limit), mlp_hidden_act="relu2", mamba_hidden_act="silu")
        return d

    @property
    def dt_limits(self) -> tuple[float, float]:
        """The [low, high] dt is clamped to, after softplus."""
        low, high = self.time_step_limit
        return (self.time_step_min, math.inf) if self.dt_floor == "time_step_min" else (low, high)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @property
    def num_routed_experts(self) -> int:
        return self.n_routed_experts

    router_kind = "sigmoid"  # sigmoid scores plus the correction bias, group-limited top-k

    @property
    def router_groups(self) -> tuple[int, int]:
        """(groups, groups kept) of the group-limited top-k."""
        return self.n_group, self.topk_group

    @property
    def expert_input_size(self) -> int:
        """The width of the rows the routed experts take (and give back): the latent size, if there is one."""
        return self.moe_latent_size or self.hidden_size

    max_positions = None  # no positional encoding: attention without RoPE, positions implicit in the Mamba scan

    def parameter_count(self) -> int:
        """The number of parameters, counted from the architecture's definition (not from a model)."""
        d, e, heads = self.hidden_size, self.n_routed_experts, self.mamba_num_heads
        inner = heads * self.mamba_head_dim
        conv = inner + 2 * self.n_groups * self.ssm_state_size
        expert_dim = self.moe_latent_size or d
        per_kind = {
            "mamba": d * (inner + conv + heads) + conv * self.conv_kernel + (conv if self.use_conv_bias else 0)
            + 3 * heads + inner + inner * d,
            "attention": d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads),
            "moe": d * e + e + 2 * e * expert_dim * self.moe_intermediate_size
            + 2 * d * self.moe_shared_expert_intermediate_size + (2 * d * expert_dim if self.moe_latent_size else 0),
            "mlp": 2 * d * self.intermediate_size,
        }
        return 2 * self.vocab_size * d + d + sum(per_kind[kind] + d for kind in self.layer_kinds)

    @classmethod
    def nemotron_3_nano_30b_a3b(cls) -> NemotronHConfig:
        """nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B: 52 layers = 23 Mamba-2 + 23 MoE + 6 attention."""
        pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
        return cls(
            vocab_size=131072, hidden_size=2688, layer_kinds=tuple(NEMOTRON_PATTERN[c] for c in pattern),
            num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
            mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
            n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, layer_norm_epsilon=1e-5,
        )
