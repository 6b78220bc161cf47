"""`moejax plan`'s compute and time estimate: the active matmul weights of each published shape against a count
from its config written out here, and the time formula on given numbers."""

from __future__ import annotations

import pytest

from moejax.models import abstract_model
from moejax.parallel.topologies import TOPOLOGIES
from moejax.planning import ASSUMED_MFU, flops_per_token, presets, time_estimate


def routed_weights(cfg) -> int:
    """Routed expert weights from the config: per MoE layer E x (matrices x input x ffn) (+ biases for GPT-OSS)."""
    d_in, f, e = cfg.expert_input_size, cfg.expert_ffn_size, cfg.num_routed_experts
    if cfg.model_type == "nemotron_h":
        per_expert = 2 * d_in * f
    elif cfg.model_type == "gpt_oss":
        per_expert = 3 * d_in * f + 2 * f + d_in  # gate, up, down and their biases
    else:
        per_expert = 3 * d_in * f
    return len(cfg.moe_layers) * e * per_expert


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "nemotron-3-nano-30b-a3b", "olmoe-1b-7b", "gpt-oss-20b"])
def test_active_weights_of_the_published_shapes(name):
    cfg = presets()[name]()
    got = flops_per_token(cfg, abstract_model(cfg), seq=2048)
    routed = routed_weights(cfg)
    want = (cfg.parameter_count() - cfg.vocab_size * cfg.hidden_size - routed
            + routed * cfg.num_experts_per_tok / cfg.num_routed_experts)
    assert got["active_matmul_parameters"] == pytest.approx(want, rel=1e-9)
    attention = 2 * cfg.attention_width * 2048 * cfg.attention_layers
    assert got["forward_flops_per_token"] == pytest.approx(2 * want + attention, rel=1e-9)
    # The "A3B" models pass about 3 B weights per token (the published active counts include the input embedding).
    if name.endswith("a3b"):
        assert 2.8e9 < got["active_matmul_parameters"] + cfg.vocab_size * cfg.hidden_size < 3.9e9


def test_time_formula():
    flops = {"forward_flops_per_token": 1e9}
    chip = TOPOLOGIES["v5p-8"]
    forward = time_estimate(flops, 1000, chip, train=False)
    assert forward["step_s_at_peak"] == pytest.approx(1e12 / (4 * 459e12))
    assert forward["step_s_assumed"] == pytest.approx(forward["step_s_at_peak"] / ASSUMED_MFU)
    train = time_estimate(flops, 1000, chip, train=True)
    assert train["flops_per_step"] == 3 * forward["flops_per_step"]
    assert time_estimate(flops, 1000, chip, train=True, remat="full")["flops_per_step"] == 4e12
    assert time_estimate(flops, 1000, None, train=False)["step_s_at_peak"] is None
