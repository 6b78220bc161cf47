"""Config parsing: both config.json generations, the published preset, and the layer pattern rules."""

from __future__ import annotations

import numpy as np
import transformers
from flax import nnx

from moejax.config import Qwen3MoeConfig, RopeConfig
from moejax.layers.stack import plan_segments
from moejax.models.qwen3_moe import Qwen3MoeForCausalLM

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
    assert count == 2 * cfg.vocab_size * d + d + cfg.num_hidden_layers * per_layer
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
