"""Qwen3-MoE parity with transformers.Qwen3MoeForCausalLM (version pinned in pyproject.toml).

Each case saves a tiny random model with save_pretrained, loads it through moejax.from_pretrained
(the real on-disk path) and compares content tokens only (padding positions are undefined in both).
Tolerances, float32: logits 1e-4 and router logits 1e-5 absolute. Both sides do the same float32
arithmetic in a different order (XLA vs ATen kernels, fused vs looped experts); observed gaps are
~2e-6 (logits) and ~1.5e-6 (router logits), so the bounds leave headroom without hiding a real error,
which shows up as O(0.1).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from safetensors.numpy import load_file, save_file
from support import assert_parity, padded_batch

import moejax
from moejax.parity.fixtures import make_qwen3, run_reference

pytestmark = pytest.mark.torch

CASES = {
    "sharded-normtopk-rightpad": dict(
        overrides=dict(norm_topk_prob=True), save=dict(max_shard_size="20KB"), lengths=[13, 9], seq=13,
        side="right"),
    "tied-nonorm-leftpad": dict(
        overrides=dict(tie_word_embeddings=True, norm_topk_prob=False), lengths=[11, 6, 1], seq=11,
        side="left"),
    "sparse-step-mlp-only-bias": dict(
        overrides=dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], attention_bias=True),
        lengths=[7, 5], seq=7, side="right"),
    "yarn-rope": dict(
        overrides=dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 16}),
        lengths=[29, 17], seq=29, side="left"),
    "sliding-window-leftpad": dict(
        overrides=dict(use_sliding_window=True, sliding_window=5), lengths=[17, 11], seq=17, side="left"),
    "sliding-window-rightpad": dict(
        overrides=dict(use_sliding_window=True, sliding_window=4), lengths=[13, 8], seq=13, side="right"),
    "linear-rope": dict(
        overrides=dict(rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}),
        lengths=[19], seq=19, side="right"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_parity(tmp_path, name):
    case = CASES[name]
    reference, path = make_qwen3(tmp_path, seed=len(name), **case.get("save", {}), **case["overrides"])
    if name.startswith("sharded"):
        assert (path / "model.safetensors.index.json").exists()
    model = moejax.from_pretrained(path)
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, reference.config.vocab_size, case["lengths"], case["seq"], case["side"])
    assert_parity(model, reference, ids, mask)


def test_config_fields_reach_the_model(tmp_path):
    _, path = make_qwen3(tmp_path, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = moejax.load_config(path)
    assert cfg.layer_kinds == ("mlp", "moe", "mlp", "mlp", "mlp", "moe")
    assert cfg.moe_layers == (1, 5)


def test_fused_expert_tensors(tmp_path):
    """Newer transformers may write experts fused (gate_up_proj [E, 2f, d], down_proj [E, d, f])."""
    reference, path = make_qwen3(tmp_path, seed=3)
    tensors = load_file(path / "model.safetensors")
    cfg = reference.config
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gate = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(cfg.num_experts)]
        up = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(cfg.num_experts)]
        down = [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(cfg.num_experts)]
        tensors[p + "gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
        tensors[p + "down_proj"] = np.stack(down)
    save_file(tensors, path / "model.safetensors")
    ids, mask = padded_batch(np.random.default_rng(1), cfg.vocab_size, [12, 8], 12, "right")
    assert_parity(moejax.from_pretrained(path), reference, ids, mask)


def test_float16_on_disk_loads_into_float32(tmp_path):
    reference, path = make_qwen3(tmp_path, seed=5, save_dtype=torch.float16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
    ids, mask = padded_batch(np.random.default_rng(2), reference.config.vocab_size, [10, 10], 10, "right")
    assert_parity(moejax.from_pretrained(path), reference, ids, mask)


def test_bfloat16_weights_run_in_bfloat16(tmp_path):
    """bf16 on disk, bf16 in moejax, against transformers in float32 on the same (bf16-valued) weights.

    Bound: mean per-token KL(reference || moejax) <= 5e-3 nats. bf16 keeps 8 mantissa bits, so each
    layer adds ~0.4% relative error to the activations; the router stays float32 in moejax.
    """
    reference, path = make_qwen3(tmp_path, seed=7, save_dtype=torch.bfloat16)
    model = moejax.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed_vd[...].dtype == jnp.bfloat16
    ids, mask = padded_batch(np.random.default_rng(3), reference.config.vocab_size, [16, 12], 16, "right")
    ref_logits, *_ = run_reference(reference, ids, mask)
    ours = np.asarray(model(ids, mask).logits, dtype=np.float64)
    log_p = torch.log_softmax(torch.from_numpy(ref_logits), -1)
    log_q = torch.log_softmax(torch.from_numpy(ours), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).numpy()[mask.astype(bool)]
    assert kl.mean() <= 5e-3, f"mean KL {kl.mean():.2e}"
    assert kl.mean() > 0, "bf16 run gave float32-identical logits: it did not run in bf16"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(tmp_path, side):
    """Content-token logits do not change when padding is added (bound 1e-5: float32 rounding only;
    left padding also shifts RoPE positions, which rotary attention is invariant to)."""
    reference, path = make_qwen3(tmp_path, seed=11)
    model = moejax.from_pretrained(path)
    rng = np.random.default_rng(4)
    ids, _ = padded_batch(rng, reference.config.vocab_size, [9], 9, "right")
    alone = np.asarray(model(ids).logits)[0]
    padded_ids, mask = padded_batch(rng, reference.config.vocab_size, [9, 14], 14, side)
    content = slice(5, 14) if side == "left" else slice(0, 9)
    padded_ids[0, content] = ids[0]
    padded = np.asarray(model(padded_ids, mask).logits)[0, content]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)


def test_ragged_dot_dispatch_path(tmp_path, monkeypatch):
    """The TPU/GPU dispatch path (jax.lax.ragged_dot), forced on the CPU, meets the same bounds."""
    import moejax.layers.moe as moe

    monkeypatch.setattr(moe, "dispatch_tiles", lambda rows, experts: ())
    reference, path = make_qwen3(tmp_path, seed=13)
    ids, mask = padded_batch(np.random.default_rng(5), reference.config.vocab_size, [10, 7], 10, "left")
    assert_parity(moejax.from_pretrained(path), reference, ids, mask)


@pytest.mark.slow
def test_model_gradients_match_across_dispatch_paths(tmp_path, monkeypatch):
    """jax.grad through the whole model: the CPU path's custom VJP equals ragged_dot's autodiff (1e-5 rel)."""
    import jax
    from flax import nnx

    import moejax.layers.moe as moe

    _, path = make_qwen3(tmp_path, seed=17)
    model = moejax.from_pretrained(path)
    ids = np.random.default_rng(6).integers(0, 97, (2, 9))
    graphdef, params = nnx.split(model)

    def loss(params):
        out = nnx.merge(graphdef, params).forward(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                                                  jnp.broadcast_to(jnp.arange(9), ids.shape), False)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0])

    tiled = jax.jit(jax.grad(loss))(params)
    monkeypatch.setattr(moe, "dispatch_tiles", lambda rows, experts: ())
    ragged = jax.jit(jax.grad(loss))(params)  # traced again: ragged_dot
    for (path_, a), (_, b) in zip(nnx.to_flat_state(ragged), nnx.to_flat_state(tiled), strict=True):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        assert np.abs(a).max() > 0, f"zero gradient for {path_}"
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=str(path_))
