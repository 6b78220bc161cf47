"""The architectures added by one file each (moejax/models/olmoe.py, moejax/models/gpt_oss.py) against transformers
5.23, on tiny checkpoints written by save_pretrained with every parameter refilled from a seeded normal (float32):

- logits within 1e-4 and router logits within 1e-5 (the chosen expert sets identical) on padded batches, over
  configs with unusual sizes: OLMoE's head_dim 22 (hidden 44 / 2 heads), top-k 1 and k = E, norm_topk_prob both
  ways, clip_qkv that clips; GPT-OSS with a sliding window shorter than the sequence, YaRN, sinks, biases;
- greedy generation token-identical to transformers' generate (GPT-OSS well past its sliding window);
- an export that transformers loads with every tensor bit-identical to the checkpoint it came from;
- the load-balancing loss equal to transformers' `aux_loss` (output_router_logits=True) to 1e-6.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
import transformers
from support import assert_parity, padded_batch
from test_generation import assert_same_tokens, reference_generate

import moejax
from moejax.export import export_pretrained
from moejax.parity.fixtures import make_checkpoint
from moejax.training.losses import load_balancing_loss

pytestmark = pytest.mark.torch

CASES = {
    ("olmoe", "defaults-leftpad"): dict(overrides={}, lengths=[13, 7], side="left"),
    ("olmoe", "normtopk-tied-bias-rightpad"): dict(
        overrides=dict(norm_topk_prob=True, tie_word_embeddings=True, attention_bias=True), lengths=[11, 4],
        side="right"),
    ("olmoe", "top1-noclip"): dict(overrides=dict(num_experts_per_tok=1, clip_qkv=None), lengths=[9], side="right"),
    ("olmoe", "k-equals-E-mha"): dict(overrides=dict(num_experts_per_tok=8, num_key_value_heads=2, clip_qkv=0.5),
                                      lengths=[10, 10], side="right"),
    ("gpt_oss", "window-yarn-leftpad"): dict(overrides={}, lengths=[17, 9], side="left"),
    ("gpt_oss", "window-rightpad-top1"): dict(overrides=dict(num_experts_per_tok=1, sliding_window=3),
                                              lengths=[14, 6], side="right"),
    ("gpt_oss", "k-equals-E-full-first"): dict(
        overrides=dict(num_experts_per_tok=8, layer_types=["full_attention", "sliding_attention"] * 2),
        lengths=[12], side="right"),
}


@pytest.mark.parametrize("arch,name", sorted(CASES))
def test_float32_parity(tmp_path, arch, name):
    case = CASES[(arch, name)]
    reference, path = make_checkpoint(arch, tmp_path, seed=len(name), **case["overrides"])
    model = moejax.from_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(1), reference.config.vocab_size, case["lengths"],
                             max(case["lengths"]), case["side"])
    assert_parity(model, reference, ids, mask)


ARCHS = sorted({arch for arch, _ in CASES})


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    reference, path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=5,
                                      router_aux_loss_coef=0.05)
    return request.param, reference, path


@pytest.mark.slow
def test_greedy_generation_equals_transformers(checkpoint):
    arch, reference, path = checkpoint
    model = moejax.from_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(2), 97, [15, 9, 12], 15, "left")
    ours = np.asarray(model.generate(ids, mask, max_new_tokens=20).sequences)
    theirs, scores = reference_generate(reference, ids, mask, None, new=20)
    assert len(assert_same_tokens(theirs, scores, ours, ids.shape[1])) >= 2


def test_export_is_bit_identical_in_transformers(checkpoint, tmp_path):
    arch, reference, path = checkpoint
    export_pretrained(moejax.from_pretrained(path), tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    want, got = reference.state_dict(), again.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_load_balancing_loss_equals_transformers(checkpoint):
    arch, reference, path = checkpoint
    ids, mask = padded_batch(np.random.default_rng(3), 97, [12, 7, 12], 12, "right")
    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        output_router_logits=True)
    model = moejax.from_pretrained(path)
    ours = model(ids, mask, return_router_logits=True)
    aux = load_balancing_loss(tuple(jnp.asarray(z) for z in ours.router_logits), model.config.num_experts_per_tok,
                              jnp.asarray(mask))
    assert abs(float(aux) - out.aux_loss.item()) <= 1e-6, (float(aux), out.aux_loss.item())


def test_mxfp4_checkpoint_dequantized_on_load(tmp_path):
    """A GPT-OSS checkpoint whose experts are stored as MXFP4 (*_blocks, *_scales, random codes and scales) loads
    to exactly the weights of the same checkpoint dequantized by transformers' own convert_moe_packed_tensors, and
    its logits equal transformers' on that dequantized checkpoint."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    reference, path = make_checkpoint("gpt_oss", tmp_path / "hf", seed=2, hidden_size=64, intermediate_size=32)
    cfg = reference.config
    tensors = load_file(path / "model.safetensors")
    rng = np.random.default_rng(4)
    quantized = dict(tensors)
    for layer in range(cfg.num_hidden_layers):
        for name, rows, cols in (("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
                                 ("down_proj", cfg.hidden_size, cfg.intermediate_size)):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            blocks = rng.integers(0, 256, (cfg.num_local_experts, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 129, (cfg.num_local_experts, rows, cols // 32), dtype=np.uint8)
            del quantized[key]
            quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
            tensors[key] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                      dtype=torch.float32).numpy()
    (tmp_path / "mxfp4").mkdir()
    (tmp_path / "dequantized").mkdir()
    for name in ("mxfp4", "dequantized"):
        (tmp_path / name / "config.json").write_text((path / "config.json").read_text())
    save_file(quantized, str(tmp_path / "mxfp4" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "dequantized" / "model.safetensors"))
    ours = moejax.from_pretrained(tmp_path / "mxfp4")
    want = moejax.from_pretrained(tmp_path / "dequantized")
    from flax import nnx

    got_state = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    for key, value in nnx.to_flat_state(nnx.state(want, nnx.Param)):
        assert np.array_equal(np.asarray(got_state[key][...]), np.asarray(value[...])), key
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    ids, mask = padded_batch(np.random.default_rng(5), 97, [11, 7], 11, "right")
    assert_parity(ours, theirs, ids, mask)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_analyze_and_parity_from_the_command_line(arch, tmp_path, capsys):
    """`moejax parity` (float32, then the implementation check and calibrated verdict in bfloat16) and
    `moejax analyze` on a tiny checkpoint of the architecture, as a user runs them."""
    import json

    from moejax.cli import main

    make_checkpoint(arch, tmp_path / "model", seed=1, byte_tokenizer=True)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"parity-{dtype}"
        assert main(["parity", "--model", str(tmp_path / "model"), "--dtype", dtype, "--max-tokens", "384",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        assert json.loads((out / "summary.json").read_text())["verdict"] == "pass"
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(tmp_path / "model"), "--out", str(out), "--quiet"]) == 0
    layers = (out / "layers.csv").read_text().splitlines()
    assert len(layers) - 1 == 3 * len(moejax.load_config(tmp_path / "model").moe_layers)  # en, he, ja per layer
