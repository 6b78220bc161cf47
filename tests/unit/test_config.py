"""Config parsing: both config.json generations, the published preset, and the layer pattern rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import transformers
from flax import nnx

from moejax.config import RopeConfig
from moejax.layers.stack import plan_segments
from moejax.models.nemotron_h import NemotronHConfig, NemotronHForCausalLM
from moejax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

# config.json of Qwen/Qwen3-30B-A3B as published (transformers 4.51 era: rope_theta, num_experts).
QWEN3_30B_A3B_JSON = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_published_config_matches_preset():
    assert Qwen3MoeConfig.from_hf(QWEN3_30B_A3B_JSON) == Qwen3MoeConfig.qwen3_30b_a3b()


def test_preset_parameter_count():
    """30.5B parameters, as Qwen publishes for Qwen3-30B-A3B."""
    cfg = Qwen3MoeConfig.qwen3_30b_a3b()
    model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param)))
    d, e, f, h = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.head_dim
    per_layer = (d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + 2 * h + 2 * d
                 + d * e + 3 * e * d * f)
    assert count == 2 * cfg.vocab_size * d + d + cfg.num_hidden_layers * per_layer == cfg.parameter_count()
    assert 30.4e9 < count < 30.6e9


def jax_leaves(state):
    return [leaf for _, leaf in nnx.to_flat_state(state)]


def test_transformers_5_config_round_trips():
    hf = transformers.Qwen3MoeConfig(num_experts=16, mlp_only_layers=[0], decoder_sparse_step=1,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                      "original_max_position_embeddings": 32768})
    cfg = Qwen3MoeConfig.from_hf(hf.to_dict())
    assert cfg.num_experts == 16 and cfg.mlp_only_layers == (0,)
    assert cfg.rope == RopeConfig(theta=1e6, kind="yarn", factor=4.0, original_max_position_embeddings=32768)
    again = Qwen3MoeConfig.from_hf(transformers.Qwen3MoeConfig(**cfg.to_hf()).to_dict())
    assert again == cfg


def test_segments_scan_repeats():
    assert plan_segments(["moe"] * 48) == [(("moe",), 48)]
    assert plan_segments(["mlp", "moe"] * 3) == [(("mlp", "moe"), 3)]
    assert plan_segments(["mlp", "moe", "moe", "moe", "mlp"]) == [(("mlp",), 1), (("moe",), 3), (("mlp",), 1)]
    kinds = list("MEMEM*EMEM")
    segments = plan_segments(kinds)
    assert [k for unit, reps in segments for _ in range(reps) for k in unit] == kinds


# config.json of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 as published (transformers 4.55 era: a
# hybrid_override_pattern string, Infinity in time_step_limit, RoPE fields the model does not use).
NEMOTRON_3_NANO_JSON = json.loads("""{
  "architectures": ["NemotronHForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "head_dim": 128,
  "hidden_dropout": 0.0, "hidden_size": 2688,
  "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
  "initializer_range": 0.02, "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
  "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_proj_bias": false, "max_position_embeddings": 262144,
  "mlp_bias": false, "mlp_hidden_act": "relu2", "model_type": "nemotron_h", "moe_intermediate_size": 1856,
  "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8, "n_routed_experts": 128,
  "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": true, "num_attention_heads": 32,
  "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2, "num_logits_to_keep": 1,
  "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": true, "residual_in_fp32": false,
  "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": null, "ssm_state_size": 128,
  "tie_word_embeddings": false, "time_step_floor": 0.0001, "time_step_limit": [0.0, Infinity],
  "time_step_max": 0.1, "time_step_min": 0.001, "topk_group": 1, "torch_dtype": "bfloat16",
  "transformers_version": "4.55.4", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "use_mamba_kernels": true, "vocab_size": 131072
}""")


def test_nemotron_published_config_matches_preset():
    cfg = NemotronHConfig.from_hf(NEMOTRON_3_NANO_JSON)
    assert cfg == NemotronHConfig.nemotron_3_nano_30b_a3b()
    assert [cfg.layer_kinds.count(k) for k in ("mamba", "moe", "attention")] == [23, 23, 6]
    assert cfg.dt_limits == (0.0, math.inf)


def test_nemotron_layer_kinds_both_naming_schemes():
    base = {k: v for k, v in NEMOTRON_3_NANO_JSON.items() if k not in ("hybrid_override_pattern", "num_hidden_layers")}
    new = NemotronHConfig.from_hf({**base, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]})
    old = NemotronHConfig.from_hf({**base, "layers_block_type": ["mamba", "moe", "attention", "mlp"]})
    pattern = NemotronHConfig.from_hf({**base, "hybrid_override_pattern": "ME*-"})
    assert new.layer_kinds == old.layer_kinds == pattern.layer_kinds == ("mamba", "moe", "attention", "mlp")


def test_nemotron_transformers_5_config_round_trips():
    """transformers 5 writes layers_block_type and {"__float__": "Infinity"}; to_hf goes back through it."""
    hf = transformers.NemotronHConfig(hybrid_override_pattern="ME*-ME", n_routed_experts=8, n_group=2,
                                      topk_group=1, moe_latent_size=32, mamba_num_heads=4, n_groups=2)
    cfg = NemotronHConfig.from_hf(json.loads(hf.to_json_string()))
    assert cfg.layer_kinds == ("mamba", "moe", "attention", "mlp", "mamba", "moe")
    assert cfg.time_step_limit == (0.0, math.inf) and cfg.moe_latent_size == 32
    again = NemotronHConfig.from_hf(json.loads(transformers.NemotronHConfig(**cfg.to_hf()).to_json_string()))
    assert again == cfg


def test_nemotron_preset_parameter_count():
    """~31.6B parameters (NVIDIA quotes 31.6B total for Nemotron-3-Nano-30B-A3B)."""
    cfg = NemotronHConfig.nemotron_3_nano_30b_a3b()
    model = nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param)))
    d, inner, e = cfg.hidden_size, cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.n_routed_experts
    conv = inner + 2 * cfg.n_groups * cfg.ssm_state_size
    mamba = d * (inner + conv + cfg.mamba_num_heads) + conv * (cfg.conv_kernel + 1) + 3 * cfg.mamba_num_heads \
        + inner + inner * d
    attention = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    moe = d * e + e + 2 * e * d * cfg.moe_intermediate_size + 2 * d * cfg.moe_shared_expert_intermediate_size
    per_kind = {"mamba": mamba, "attention": attention, "moe": moe, "mlp": 2 * d * cfg.intermediate_size}
    expected = 2 * cfg.vocab_size * d + d + sum(per_kind[k] + d for k in cfg.layer_kinds)
    assert count == expected == cfg.parameter_count()
    assert 31.4e9 < count < 31.8e9


@pytest.mark.torch
@pytest.mark.parametrize("overrides", [dict(attention_bias=True, tie_word_embeddings=True, mlp_only_layers=[1]),
                                       dict(decoder_sparse_step=2)])
def test_qwen3_parameter_count_variants(overrides):
    pytest.importorskip("torch")  # moejax.parity.fixtures builds transformers models
    from moejax.models.qwen3_moe import tiny_reference_config as tiny_qwen3_config

    cfg = Qwen3MoeConfig.from_hf(tiny_qwen3_config(**overrides).to_dict(), "test")
    model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param))) == cfg.parameter_count()


@pytest.mark.torch
@pytest.mark.parametrize("overrides", [{}, dict(use_conv_bias=False), dict(moe_latent_size=None)])
def test_nemotron_parameter_count_variants(overrides):
    pytest.importorskip("torch")  # moejax.parity.fixtures builds transformers models
    from moejax.models.nemotron_h import tiny_reference_config as tiny_nemotron_h_config

    cfg = NemotronHConfig.from_hf(tiny_nemotron_h_config(**overrides).to_dict(), "test")
    model = nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param))) == cfg.parameter_count()


PUBLISHED = {
    # allenai/OLMoE-1B-7B-0924's config.json fields.
    "olmoe": {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": None, "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu",
              "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 1024,
              "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
              "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
              "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True,
              "vocab_size": 50304},
    # openai/gpt-oss-20b's config.json fields (MXFP4 experts).
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
                "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
                "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
                "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
                "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
                "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
                "output_router_logits": False, "pad_token_id": 199999,
                "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                                                                   "model.layers.*.mlp.router", "model.embed_tokens",
                                                                   "lm_head"], "quant_method": "mxfp4"},
                "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                        "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                        "truncate": False},
                "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
                "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
                "vocab_size": 201088},
}


@pytest.mark.parametrize("model_type", sorted(PUBLISHED))
def test_published_configs_of_the_new_architectures(model_type):
    """The published checkpoints' config.json read as their plan presets describe them, and written back to a
    config transformers reads as the same model."""
    import transformers

    from moejax.models import config_class, presets

    cfg = config_class(model_type).from_hf(PUBLISHED[model_type], "config.json")
    preset = presets()[{"olmoe": "olmoe-1b-7b", "gpt_oss": "gpt-oss-20b"}[model_type]]()
    assert cfg == preset
    again = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert config_class(model_type).from_hf(again.to_dict(), "again") == cfg


def test_olmoe_head_dim_must_cover_hidden():
    from moejax.errors import ConfigError
    from moejax.models.olmoe import OlmoeConfig

    d = PUBLISHED["olmoe"] | {"head_dim": 128}
    assert OlmoeConfig.from_hf(d).head_dim == 128
    with pytest.raises(ConfigError, match="head_dim=96 with num_attention_heads=16 does not cover hidden_size=2048"):
        OlmoeConfig.from_hf(PUBLISHED["olmoe"] | {"head_dim": 96})
