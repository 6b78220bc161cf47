"""What every architecture's config shares (each config lives in its moejax/models/<model_type>.py): typed reads of
config.json fields, the rope settings, the known-inert fields, moejax's own settings (expert exchange, remat).

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
GENERIC_INERT = frozenset({
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
        f = Fields({**params, "rope_theta": theta}, f"{source} (rope parameters)")
        original = f.int("original_max_position_embeddings", None, minimum=1)
        if kind == "yarn" and original is None:
            original = Fields(d, source).int("original_max_position_embeddings",
                                              Fields(d, source).int("max_position_embeddings", None))
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
    unknown = sorted(set(d) - read - inert - GENERIC_INERT)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config field(s) {unknown}. moejax does not know whether they change the forward pass; "
            "if they do not, add them to the inert list (_INERT) of the architecture's config in moejax/models/."
        )


def check_hf(cls, d: dict[str, Any], source: str) -> None:
    """The config.json is of cls's model_type and has no field cls does not know."""
    require(d.get("model_type") == cls.model_type, source,
             f"model_type is {d.get('model_type')!r}, expected {cls.model_type!r}")
    _check_fields(d, cls._READ, set(cls._INERT), source)


_MISSING = object()


class Fields:
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


def require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {message}")


def is_moe(kind: str) -> bool:
    """Whether layers of this kind route tokens to experts (and return their routing): "moe", or a kind named
    "moe_<variant>" (e.g. GPT-OSS's "moe_sliding", an MoE layer with windowed attention)."""
    return kind == "moe" or kind.startswith("moe_")


class ModelConfig:
    """What every architecture's config (a frozen dataclass deriving from this) answers the same way unless it says
    otherwise. Each also gives model_type, router_kind ("softmax", "sigmoid" or "topk_softmax"), layer_kinds,
    num_routed_experts, expert_ffn_size and parameter_count()."""

    router_groups = (1, 1)  # (groups, groups kept) of a group-limited top-k: none
    # Config fields that make moejax compute what transformers' PyTorch code computes, where that differs from the
    # model as published (`moejax parity` applies them), as (field, value) pairs.
    transformers_overrides = ()

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The indices of the layers that route."""
        return tuple(i for i, kind in enumerate(self.layer_kinds) if is_moe(kind))

    @property
    def expert_input_size(self) -> int:
        """The width of the rows the routed experts take (and give back)."""
        return self.hidden_size

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's positions cover (RoPE's trained or extended range); None: no limit."""
        return self.max_position_embeddings

    @property
    def attention_layers(self) -> int:
        """The layers that attend (every decoder layer, unless the architecture says otherwise)."""
        return len(self.layer_kinds)

    @property
    def attention_width(self) -> int:
        """Query heads x head size: the width of attention's score and value products."""
        return self.num_attention_heads * (getattr(self, "head_dim", None)
                                           or self.hidden_size // self.num_attention_heads)


# How tokens reach the experts' devices under expert parallelism (moejax.layers.moe.expert_parallel): not in
# config.json; a moejax setting, given as a config override (from_pretrained(..., expert_exchange="all_to_all")).
EXPERT_EXCHANGES = ("auto", "all_gather", "all_to_all")


# What a layer's backward pass keeps from its forward pass when training (moejax.layers.stack.REMAT_POLICIES):
# everything; only each layer's input (the rest recomputed); the matmul outputs.
REMAT_NAMES = ("none", "full", "dots")


def require_exchange(cfg) -> None:
    require(cfg.expert_exchange in EXPERT_EXCHANGES, f"{cfg.model_type} config",
             f"expert_exchange={cfg.expert_exchange!r} is not one of {EXPERT_EXCHANGES}")



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


def float_pair(value, source: str, name: str) -> tuple[float, float]:
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
