"""Nemotron-H: Hugging Face tensor names <-> moejax parameters.

On disk, save_pretrained writes `backbone.*`; transformers >= 5 names the same modules `model.*` in
memory, and checkpoints written from that state carry `model.*`. Both are read. Multi-token
prediction weights (`mtp.*`) are not part of the forward pass and are skipped, as transformers does.
"""

from __future__ import annotations

import numpy as np

from converters.keymap import KeyMap, Rule
from moejax.config import NemotronHConfig

PREFIXES = ("backbone.", "model.")


def _t(a):
    return a.T


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
        ("mixer", "up_df"): rules("up_proj.weight", (ff, d), _t),
        ("mixer", "down_fd"): rules("down_proj.weight", (d, ff), _t),
        ("mixer", "router", "w_de"): rules("gate.weight", (e, d), _t),
        ("mixer", "correction_e"): rules("gate.e_score_correction_bias", (e,)),
        ("mixer", "to_latent_dl"): rules("fc1_latent_proj.weight", (x, d), _t),
        ("mixer", "from_latent_ld"): rules("fc2_latent_proj.weight", (d, x), _t),
        ("mixer", "experts", "up_edf"): rules(
            "experts.{e}.up_proj.weight", (f, x), _t, ("experts.up_proj", (e, f, x), lambda a: a.transpose(0, 2, 1))),
        ("mixer", "experts", "down_efd"): rules(
            "experts.{e}.down_proj.weight", (x, f), _t,
            ("experts.down_proj", (e, x, f), lambda a: a.transpose(0, 2, 1))),
        ("mixer", "shared", "up_df"): rules("shared_experts.up_proj.weight", (sf, d), _t),
        ("mixer", "shared", "down_fd"): rules("shared_experts.down_proj.weight", (d, sf), _t),
    }
    top = {
        ("embed_vd",): [Rule(p + "embeddings.weight", (v, d)) for p in PREFIXES],
        ("norm_f", "weight"): [Rule(p + "norm_f.weight", (d,)) for p in PREFIXES],
        ("lm_head_dv",): [Rule("lm_head.weight", (v, d), _t)],
    }
    return KeyMap(top=top, layer=layer, num_experts=e, ignored_prefixes=("mtp.",))
