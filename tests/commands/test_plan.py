"""`moejax plan` on the full-size presets, compiled from shapes on simulated CPU devices (the command
reruns itself in a subprocess with the device count the mesh needs): the parameter count equals the
analytic count from the config, the per-device parameter bytes are the shard shapes' bytes, and the
verdict and exit status follow the HBM comparison. `--train` on a small model: float32 master bytes and
AdamW's mu and nu, exact."""

from __future__ import annotations

import json
import math

import pytest

from moejax.cli import main
from moejax.loading import load_config
from moejax.models.nemotron_h import NemotronHConfig
from moejax.models.qwen3_moe import Qwen3MoeConfig

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from moejax.models.qwen3_moe import tiny_reference_config as tiny_qwen3_config

GiB = 1024 ** 3



pytestmark = pytest.mark.torch

@pytest.mark.parametrize("model, config, experts_per_device", [
    ("qwen3-30b-a3b", Qwen3MoeConfig.qwen3_30b_a3b(), 32),
    ("nemotron-3-nano-30b-a3b", NemotronHConfig.nemotron_3_nano_30b_a3b(), 32),
])
@pytest.mark.slow
def test_presets_fit_v5p_8(model, config, experts_per_device, tmp_path, capfd):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", model, "--topology", "v5p-8", "--json", str(out)]) == 0
    printed = capfd.readouterr().out
    assert f"parameters: {config.parameter_count():,} (analytic count from the config: " \
           f"{config.parameter_count():,})" in printed
    assert "mesh expert=4 on v5p-8" in printed and "FITS" in printed
    plan = json.loads(out.read_text())
    assert plan["parameters"] == plan["parameters_analytic"] == config.parameter_count()
    # Experts split four ways, everything else replicated: the bf16 bytes one device holds.
    e = config.num_experts if hasattr(config, "num_experts") else config.n_routed_experts
    expert_params = sum(3 if hasattr(config, "num_experts") else 2 for _ in config.moe_layers) * e \
        * config.hidden_size * config.moe_intermediate_size
    assert e // 4 == experts_per_device
    correction = len(config.moe_layers) * e * 2 if not hasattr(config, "num_experts") else 0  # float32 bias
    assert plan["parameter_bytes_per_device"] == 2 * (config.parameter_count() - expert_params) \
        + 2 * expert_params // 4 + correction
    assert plan["per_device_bytes"] < plan["hbm_bytes"] == 95 * GiB


@pytest.mark.slow
def test_does_not_fit_exits_1(capfd):
    assert main(["plan", "--model", "qwen3-30b-a3b", "--topology", "v5e-4"]) == 1
    assert "DOES NOT FIT" in capfd.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5p-8", "--mesh", "expert=8"], "has 8 devices, v5p-8 has 4 chips"),
    (["--mesh", "expert=3"], "does not divide over mesh axis expert=3"),
    (["--remat", "full", "--topology", "v5p-8"], "plan the train step: add --train"),
    ([], "give --mesh, --topology or both"),
])
@pytest.mark.slow
def test_bad_plans(args, message, capfd):
    assert main(["plan", "--model", "qwen3-30b-a3b", *args]) == 2
    assert message in capfd.readouterr().err


@pytest.mark.slow
def test_train_step_bytes_and_does_not_fit(tmp_path, capfd):
    """One compile: a small Qwen3-MoE with an 8M-token vocabulary, so its replicated embedding and head (805M
    parameters) overflow a v5e-4 chip once float32 weights, mu, nu and the step's new state are counted."""
    tiny_qwen3_config(vocab_size=2 ** 23).save_pretrained(tmp_path / "model")
    config = load_config(tmp_path / "model")
    out = tmp_path / "plan.json"
    assert main(["plan", "--train", "--model", str(tmp_path / "model"), "--topology", "v5e-4", "--batch", "4",
                 "--seq", "32", "--remat", "full", "--accum-steps", "2", "--json", str(out)]) == 1
    printed = capfd.readouterr().out
    assert "train step (AdamW, float32 master weights, bfloat16 compute, remat full, 2 micro-batches)" in printed
    assert "mesh expert=4 on v5e-4" in printed and "DOES NOT FIT" in printed
    plan = json.loads(out.read_text())
    assert plan["parameters"] == plan["parameters_analytic"] == config.parameter_count()
    assert plan["parameter_bytes"] == 4 * config.parameter_count()
    # Experts split four ways, everything else replicated, all float32.
    experts = 3 * len(config.moe_layers) * config.num_experts * config.hidden_size * config.moe_intermediate_size
    params = 4 * (config.parameter_count() - experts + experts // 4)
    assert plan["parameter_bytes_per_device"] == params
    # AdamW's mu and nu, one float32 each per parameter; plus two int32 step counts (the train state's and Adam's,
    # which also drives the learning-rate schedule).
    assert plan["optimizer_bytes_per_device"] == 2 * params + 2 * 4
    assert plan["compute_copy_bytes"] == params // 2
    assert plan["per_device_bytes"] > plan["hbm_bytes"] == 16 * GiB


@pytest.mark.slow
def test_plan_lays_out_tensor_and_the_expert_exchange(tmp_path, capfd):
    """Nemotron-3-Nano on expert=4,tensor=2: the vocabulary and the Mamba-2 groups split over tensor, and the
    exchange asked for (all_to_all) is costed by the ragged formula next to the all-gather."""
    from moejax.parallel.hlo import device_share, exchange_bytes

    config = NemotronHConfig.nemotron_3_nano_30b_a3b()
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "nemotron-3-nano-30b-a3b", "--mesh", "expert=4,tensor=2", "--batch", "2",
                 "--seq", "512", "--expert-exchange", "all_to_all", "--json", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "vocabulary split over tensor (65,536 of 131,072 rows per device)" in printed
    assert "Mamba-2 mixer split over tensor (4 of 8 B/C groups, 32 heads per device)" in printed
    plan = json.loads(out.read_text())
    tokens = 2 * 512 // 4  # per device: the batch over data, fsdp and expert
    args = (4, tokens, config.expert_input_size, config.num_experts_per_tok, 2)
    assert plan["expert_exchange"] == "all_to_all"
    assert plan["all_gather_bytes_per_moe_layer"] == exchange_bytes("all_gather", *args) == 3 * tokens * (
        2 * config.expert_input_size * 2 + 8 * config.num_experts_per_tok)
    ragged = exchange_bytes("ragged", *args, experts=config.n_routed_experts)
    assert plan["exchange_bytes_per_moe_layer"] == int(ragged)
    assert 0 < ragged < plan["all_gather_bytes_per_moe_layer"]
    assert device_share(128, 4, 6) == pytest.approx(1 - math.comb(96, 6) / math.comb(128, 6))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["olmoe-1b-7b", "GPT-OSS-20B"])
def test_new_architecture_presets(model, tmp_path, capfd):
    """OLMoE-1B-7B and GPT-OSS-20B by name (any case): the exact parameter count equals the config's analytic one,
    and each fits a v5p-8 in bfloat16."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", model, "--topology", "v5p-8", "--json", str(out)]) == 0
    assert "FITS" in capfd.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["parameters"] == plan["parameters_analytic"]
    assert plan["parameters"] == {"olmoe-1b-7b": 6_919_161_856, "gpt-oss-20b": 20_914_757_184}[model.lower()]
