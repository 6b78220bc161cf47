"""Nemotron-H (e.g. Nemotron-3-Nano-30B-A3B): a hybrid stack of Mamba-2, attention (no RoPE), MoE and MLP
blocks, each x + mixer(norm(x)).

The whole architecture, top to bottom: its config (read from and written back to config.json), its Hugging Face key
map, its modules, the published shapes `moejax plan` knows, and the tiny transformers config the tests build.

On disk, save_pretrained writes `backbone.*`; transformers >= 5 names the same modules `model.*` in memory, and
checkpoints written from that state carry `model.*`. Both are read. Multi-token prediction weights (`mtp.*`) are not
part of the forward pass and are skipped, as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import Fields, ModelConfig, check_hf, float_pair, require, require_exchange
from moejax.keymap import KeyMap, Rule, transpose
from moejax.layers.attention import Attention
from moejax.layers.mamba2 import Mamba2Mixer
from moejax.layers.mlp import MLP
from moejax.layers.moe import SigmoidMoE
from moejax.layers.norms import RMSNorm
from moejax.layers.params import param
from moejax.layers.stack import LayerStack
from moejax.models.common import CausalLM

# --- config -------------------------------------------------------------------------------------------------

NEMOTRON_PATTERN = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
# transformers >= 5 names the kinds linear_attention/moe/full_attention/mlp; older configs mamba/moe/attention/mlp.
NEMOTRON_KINDS = {"mamba": "mamba", "linear_attention": "mamba", "moe": "moe", "attention": "attention",
                  "full_attention": "attention", "mlp": "mlp"}
# Config fields from before transformers 5 renamed them.
NEMOTRON_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_limit": "time_step_limit",
                   "mamba_dt_min": "time_step_min", "mamba_conv_bias": "use_conv_bias",
                   "mamba_chunk_size": "chunk_size"}



@dataclasses.dataclass(frozen=True)
class NemotronHConfig(ModelConfig):
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
        require(self.num_attention_heads % self.num_key_value_heads == 0, src,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        require(self.mamba_num_heads % self.n_groups == 0, src,
                 f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}")
        require(self.n_routed_experts % self.n_group == 0 and 0 < self.topk_group <= self.n_group, src,
                 f"n_routed_experts={self.n_routed_experts} must split into n_group={self.n_group} groups, "
                 f"and topk_group={self.topk_group} must be in [1, n_group]")
        require(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2, src,
                 "group-limited routing scores each group by its top-2 experts: groups need >= 2 experts")
        require(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group), src,
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group groups")
        require(self.dt_floor in self.DT_FLOORS, src, f"dt_floor={self.dt_floor!r} is not one of {self.DT_FLOORS}")
        require_exchange(self)
        bad = sorted(set(self.layer_kinds) - set(NEMOTRON_PATTERN.values()))
        require(not bad, src, f"unknown layer kinds {bad}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> NemotronHConfig:
        """Builds the config from a parsed Nemotron-H config.json; unsupported values raise ConfigError."""
        check_hf(cls, d, source)
        d = {**{new: d[old] for old, new in NEMOTRON_LEGACY.items() if old in d}, **d}
        if d.get("layers_block_type"):
            unknown = sorted(set(d["layers_block_type"]) - set(NEMOTRON_KINDS))
            require(not unknown, source, f"layers_block_type has unknown kinds {unknown}; "
                                          f"expected {sorted(NEMOTRON_KINDS)}")
            kinds = tuple(NEMOTRON_KINDS[k] for k in d["layers_block_type"])
        else:
            pattern = d.get("hybrid_override_pattern")
            require(isinstance(pattern, str) and pattern, source,
                     "needs layers_block_type or hybrid_override_pattern")
            unknown = sorted(set(pattern) - set(NEMOTRON_PATTERN))
            require(not unknown, source, f"hybrid_override_pattern has unknown symbols {unknown}; "
                                          f"expected {sorted(NEMOTRON_PATTERN)}")
            kinds = tuple(NEMOTRON_PATTERN[c] for c in pattern)
        f = Fields(d, source)
        layers = f.int("num_hidden_layers", None)
        require(layers is None or layers == len(kinds), source,
                 f"num_hidden_layers={layers} but the layer pattern has {len(kinds)} layers")
        for field, supported in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            require(d.get(field, supported) == supported, source,
                     f"{field}={d.get(field)!r} is not supported (Nemotron-H uses {supported!r})")
        for field in ("mlp_bias", "use_bias", "mamba_proj_bias", "tie_word_embeddings"):
            require(not f.bool(field, False), source, f"{field}=true is not supported (no Nemotron-H uses it)")
        require(d.get("sliding_window") is None, source, "sliding_window attention is not supported")
        require(f.int("n_shared_experts", 1) == 1, source,
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
            time_step_limit=float_pair(d.get("time_step_limit", (0.0, math.inf)), source, "time_step_limit"),
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
    def num_routed_experts(self) -> int:
        return self.n_routed_experts

    router_kind = "sigmoid"  # sigmoid scores plus the correction bias, group-limited top-k
    # transformers' PyTorch Mamba-2 floors dt at time_step_min (ModelConfig.transformers_overrides).
    transformers_overrides = (("dt_floor", "time_step_min"),)

    @property
    def router_groups(self) -> tuple[int, int]:
        """(groups, groups kept) of the group-limited top-k."""
        return self.n_group, self.topk_group

    @property
    def expert_ffn_size(self) -> int:
        """The intermediate width of each routed expert."""
        return self.moe_intermediate_size

    @property
    def expert_input_size(self) -> int:
        """The width of the rows the routed experts take (and give back): the latent size, if there is one."""
        return self.moe_latent_size or self.hidden_size

    max_positions = None  # no positional encoding: attention without RoPE, positions implicit in the Mamba scan

    @property
    def attention_layers(self) -> int:
        return self.layer_kinds.count("attention")

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


# --- Hugging Face key map -----------------------------------------------------------------------------------

PREFIXES = ("backbone.", "model.")


def keymap(cfg: NemotronHConfig) -> KeyMap:
    """The key map of NemotronHForCausalLM checkpoints (per-expert tensors, or fused expert tensors)."""
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    heads, inner = cfg.mamba_num_heads, cfg.mamba_num_heads * cfg.mamba_head_dim
    conv = inner + 2 * cfg.n_groups * cfg.ssm_state_size
    e, f, sf, ff, v = (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size,
                       cfg.intermediate_size, cfg.vocab_size)
    x = cfg.moe_latent_size or d

    def rules(name, shape, to_moejax=lambda a: a, *fused):
        """The same tensor under each prefix; `fused` adds (name, shape, to_moejax) alternatives."""
        out = [Rule(p + "layers.{i}.mixer." + name, shape, to_moejax) for p in PREFIXES]
        for fused_name, fused_shape, fused_to in fused:
            out += [Rule(p + "layers.{i}.mixer." + fused_name, fused_shape, fused_to) for p in PREFIXES]
        return out

    g, n_state = cfg.n_groups, cfg.ssm_state_size

    def per_group(a):  # [heads or inner, ...] (group-major) -> [g, heads or inner / g, ...]
        return a.reshape(g, a.shape[0] // g, *a.shape[1:])

    def by_group(a, z=0):
        """[..., (z) x B C (dt)] -> [..., g, (z) x B C (dt)]: transformers' concatenation along the last axis (z:
        inner columns, dt: the rest after C) regrouped so that each group's columns are contiguous."""
        bc = inner + z + 2 * g * n_state
        parts = [a[..., :z], a[..., z:z + inner], a[..., z + inner:bc - g * n_state], a[..., bc - g * n_state:bc],
                 a[..., bc:]]
        return np.concatenate([p.reshape(*p.shape[:-1], g, p.shape[-1] // g) for p in parts], axis=-1)

    def heads_of(count):  # [count*h, d] -> [d, count, h]
        return lambda a: a.reshape(count, h, d).transpose(2, 0, 1)

    layer = {
        ("norm", "weight"): [Rule(p + "layers.{i}.norm.weight", (d,)) for p in PREFIXES],
        ("mixer", "in_proj_dgw"): rules("in_proj.weight", (inner + conv + heads, d), lambda a: by_group(a.T, z=inner)),
        ("mixer", "conv_gck"): rules("conv1d.weight", (conv, 1, cfg.conv_kernel),
                                    lambda a: np.moveaxis(by_group(a[:, 0].T), 0, -1)),
        ("mixer", "conv_bias_gc"): rules("conv1d.bias", (conv,), by_group),
        ("mixer", "dt_bias_gr"): rules("dt_bias", (heads,), per_group),
        ("mixer", "a_log_gr"): rules("A_log", (heads,), per_group),
        ("mixer", "d_gr"): rules("D", (heads,), per_group),
        ("mixer", "norm_gi"): rules("norm.weight", (inner,), per_group),
        ("mixer", "out_proj_gid"): rules("out_proj.weight", (d, inner), lambda a: per_group(a.T)),
        ("mixer", "q_dnh"): rules("q_proj.weight", (n * h, d), heads_of(n)),
        ("mixer", "k_dkh"): rules("k_proj.weight", (k * h, d), heads_of(k)),
        ("mixer", "v_dkh"): rules("v_proj.weight", (k * h, d), heads_of(k)),
        ("mixer", "o_nhd"): rules("o_proj.weight", (d, n * h), lambda a: a.reshape(d, n, h).transpose(1, 2, 0)),
        ("mixer", "up_df"): rules("up_proj.weight", (ff, d), transpose),
        ("mixer", "down_fd"): rules("down_proj.weight", (d, ff), transpose),
        ("mixer", "router", "w_de"): rules("gate.weight", (e, d), transpose),
        ("mixer", "correction_e"): rules("gate.e_score_correction_bias", (e,)),
        ("mixer", "to_latent_dl"): rules("fc1_latent_proj.weight", (x, d), transpose),
        ("mixer", "from_latent_ld"): rules("fc2_latent_proj.weight", (d, x), transpose),
        ("mixer", "experts", "up_edf"): rules(
            "experts.{e}.up_proj.weight", (f, x), transpose,
            ("experts.up_proj", (e, f, x), lambda a: a.transpose(0, 2, 1))),
        ("mixer", "experts", "down_efd"): rules(
            "experts.{e}.down_proj.weight", (x, f), transpose,
            ("experts.down_proj", (e, x, f), lambda a: a.transpose(0, 2, 1))),
        ("mixer", "shared", "up_df"): rules("shared_experts.up_proj.weight", (sf, d), transpose),
        ("mixer", "shared", "down_fd"): rules("shared_experts.down_proj.weight", (d, sf), transpose),
    }
    top = {
        ("embed_vd",): [Rule(p + "embeddings.weight", (v, d)) for p in PREFIXES],
        ("norm_f", "weight"): [Rule(p + "norm_f.weight", (d,)) for p in PREFIXES],
        ("lm_head_dv",): [Rule("lm_head.weight", (v, d), transpose)],
    }
    return KeyMap(top=top, layer=layer, num_experts=e, ignored_prefixes=("mtp.",))


# --- modules ------------------------------------------------------------------------------------------------

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


# The published shapes `moejax plan` knows by name.
PRESETS = {"nemotron-3-nano-30b-a3b": NemotronHConfig.nemotron_3_nano_30b_a3b}


def tiny_reference_config(**overrides):
    """A tiny transformers NemotronHConfig for tests and benchmarks: all four block kinds, n_groups 2, group-limited
    routing (2 groups, 1 kept), a latent MoE (overrides replace its fields)."""
    import transformers

    base = dict(vocab_size=97, hidden_size=48, hybrid_override_pattern="ME*-ME", num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=12,
                ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, n_routed_experts=8,
                num_experts_per_tok=3, moe_intermediate_size=24, moe_shared_expert_intermediate_size=20,
                moe_latent_size=32, n_group=2, topk_group=1, routed_scaling_factor=1.7, norm_topk_prob=True,
                layer_norm_epsilon=1e-5)
    return transformers.NemotronHConfig(**(base | overrides))


Config, Model = NemotronHConfig, NemotronHForCausalLM
