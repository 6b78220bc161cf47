"""Nemotron-H parity with transformers.NemotronHForCausalLM (version pinned in pyproject.toml).

Tiny checkpoints written by save_pretrained (keys backbone.*, experts one tensor each) with every
parameter and the correction-bias buffer refilled from a seeded normal (A_log, dt_bias, D, conv and
correction bias scaled so each path changes the output). Bounds as for Qwen3 (conftest): logits
1e-4, router logits 1e-5, chosen expert sets identical; observed ~3e-6 and ~3e-6.

transformers' PyTorch Mamba-2 path floors dt at time_step_min whatever time_step_limit says; these
parity tests load with dt_floor="time_step_min" to compute the same thing (see test_dt_floor).
Its multi-chunk path agrees with the sequential oracle at this version (tests/test_ssd.py), so the
3.5-chunk case is compared with transformers directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from safetensors.numpy import load_file, save_file
from support import assert_parity, padded_batch

import moejax
import moejax.layers.mamba2 as mamba2
from moejax.layers.ssd import ssd_sequential
from moejax.parity.fixtures import make_checkpoint, run_reference

pytestmark = pytest.mark.torch

MATCH_TRANSFORMERS = {"dt_floor": "time_step_min"}

CASES = {
    "all-kinds-rightpad": dict(overrides={}, lengths=[7, 5], seq=7, side="right"),
    "one-chunk-leftpad": dict(overrides={}, lengths=[8, 3, 6], seq=8, side="left"),
    "3.5-chunks": dict(overrides={}, lengths=[28, 19], seq=28, side="right"),
    "plain-moe-sharded": dict(
        overrides=dict(moe_latent_size=None, n_group=1, topk_group=1, n_groups=1, use_conv_bias=False,
                       hybrid_override_pattern="M*EM-E"),
        save=dict(max_shard_size="30KB"), lengths=[13, 13], seq=13, side="right"),
    "four-groups-left": dict(
        overrides=dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, mamba_num_heads=8,
                       mamba_head_dim=6, n_groups=4, hybrid_override_pattern="EM*EM"),
        lengths=[11, 4], seq=11, side="left"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_parity(tmp_path, name):
    case = CASES[name]
    reference, path = make_checkpoint("nemotron_h", tmp_path, seed=len(name), **case.get("save", {}),
                                      **case["overrides"])
    if "save" in case:
        assert (path / "model.safetensors.index.json").exists()
    model = moejax.from_pretrained(path, **MATCH_TRANSFORMERS)
    ids, mask = padded_batch(np.random.default_rng(0), 97, case["lengths"], case["seq"], case["side"])
    assert_parity(model, reference, ids, mask)


def test_in_memory_names_and_fused_experts(tmp_path):
    """model.* keys (transformers >= 5 in memory) and fused expert tensors load like backbone.* per-expert ones."""
    reference, path = make_checkpoint("nemotron_h", tmp_path, seed=2)
    tensors = load_file(path / "model.safetensors")
    renamed = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in tensors.items()}
    cfg = reference.config
    for layer in (1, 5):  # the "E" blocks of the tiny pattern ME*-ME
        p = f"model.layers.{layer}.mixer.experts."
        for proj in ("up_proj", "down_proj"):
            renamed[p + proj] = np.stack([renamed.pop(f"{p}{e}.{proj}.weight") for e in range(cfg.n_routed_experts)])
    renamed["mtp.layers.0.ignored.weight"] = np.zeros(3, np.float32)
    save_file(renamed, path / "model.safetensors")
    ids, mask = padded_batch(np.random.default_rng(1), 97, [9, 6], 9, "right")
    assert_parity(moejax.from_pretrained(path, **MATCH_TRANSFORMERS), reference, ids, mask)


@pytest.mark.slow
def test_chunk_size_invariance(tmp_path):
    """The same weights give the same outputs with chunk_size 8, 16 and 64 (bound 1e-5: float32 reordering)."""
    _, path = make_checkpoint("nemotron_h", tmp_path, seed=3)
    ids, mask = padded_batch(np.random.default_rng(2), 97, [45, 30], 45, "right")
    outs = [moejax.from_pretrained(path, chunk_size=c)(ids, mask, return_router_logits=True) for c in (8, 16, 64)]
    for other in outs[1:]:
        np.testing.assert_allclose(np.asarray(other.logits), np.asarray(outs[0].logits), atol=1e-5, rtol=0)
        for a, b in zip(other.router_logits, outs[0].router_logits, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_mixer_chunked_scan_matches_sequential_oracle(tmp_path, monkeypatch):
    """Whole model over 3.5 chunks: chunked SSD vs the step-by-step recurrence (bound 1e-5)."""
    _, path = make_checkpoint("nemotron_h", tmp_path, seed=4, hybrid_override_pattern="MMEM")
    ids, mask = padded_batch(np.random.default_rng(3), 97, [28, 17], 28, "left")
    chunked = np.asarray(moejax.from_pretrained(path)(ids, mask).logits)

    def sequential(x, dt, a, b, c, chunk_size, initial_state_bhpn=None, runs_bt=None):
        return ssd_sequential(x, dt, a, b, c, initial_state_bhpn, runs_bt)

    monkeypatch.setattr(mamba2, "ssd_chunked", sequential)
    oracle = np.asarray(moejax.from_pretrained(path)(ids, mask).logits)
    content = mask.astype(bool)
    assert np.abs(chunked - oracle)[content].max() <= 1e-5


@pytest.mark.slow
def test_mixer_output_matches_sequential_oracle(monkeypatch):
    """One Mamba2Mixer over 3.5 chunks with padding, random weights: chunked SSD vs recurrence (bound 1e-5)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    mixer = mamba2.Mamba2Mixer(32, 4, 8, 16, 2, 4, 8, conv_bias=True, eps=1e-5, dt_limits=(0.0, float("inf")),
                               rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 4)
    for name, key in zip(("dt_bias_gr", "a_log_gr", "d_gr", "conv_bias_gc"), keys, strict=True):
        var = getattr(mixer, name)
        var.set_value(jax.random.normal(key, var.shape) * 0.5)
    x_btd = jax.random.normal(jax.random.key(2), (2, 28, 32))
    valid_bt = jnp.ones((2, 28), jnp.int32).at[1, :5].set(0)

    def run():  # jitted (one program, not one per operation); a new function each call, so each call traces anew
        return np.asarray(nnx.jit(lambda mixer, x, valid: mixer(x, valid))(mixer, x_btd, valid_bt))

    chunked = run()

    def sequential(x, dt, a, b, c, chunk_size, initial_state_bhpn=None, runs_bt=None):
        return ssd_sequential(x, dt, a, b, c, initial_state_bhpn, runs_bt)

    monkeypatch.setattr(mamba2, "ssd_chunked", sequential)
    oracle = run()
    assert np.abs(oracle).max() > 0.1
    np.testing.assert_allclose(chunked, oracle, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.slow
def test_padding_invariance(tmp_path, side):
    """Content logits do not change when padding is added: padding is zeroed before the conv and the scan."""
    _, path = make_checkpoint("nemotron_h", tmp_path, seed=5)
    model = moejax.from_pretrained(path)
    rng = np.random.default_rng(4)
    ids, _ = padded_batch(rng, 97, [12], 12, "right")
    alone = np.asarray(model(ids).logits)[0]
    padded_ids, mask = padded_batch(rng, 97, [12, 19], 19, side)
    content = slice(7, 19) if side == "left" else slice(0, 12)
    padded_ids[0, content] = ids[0]
    np.testing.assert_allclose(np.asarray(model(padded_ids, mask).logits)[0, content], alone, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dt_floor(tmp_path):
    """transformers clamps dt to [time_step_min, inf); the config's time_step_limit says [0, inf).

    With dt_bias pushing softplus(dt) far below time_step_min, moejax's default (the config's limit,
    as the published model's kernels do) differs from transformers, and dt_floor="time_step_min"
    restores agreement: the floor is the only difference.
    """
    reference, path = make_checkpoint("nemotron_h", tmp_path, seed=6, time_step_min=0.05)
    ids, mask = padded_batch(np.random.default_rng(5), 97, [10], 10, "right")
    ref_logits, *_ = run_reference(reference, ids, mask)
    default = moejax.from_pretrained(path)
    assert default.config.dt_limits == (0.0, float("inf"))
    assert np.abs(np.asarray(default(ids, mask).logits) - ref_logits).max() > 1e-3
    assert_parity(moejax.from_pretrained(path, **MATCH_TRANSFORMERS), reference, ids, mask)


def test_config_overrides_are_checked(tmp_path):
    _, path = make_checkpoint("nemotron_h", tmp_path, seed=7)
    with pytest.raises(moejax.ConfigError, match=r"has no field\(s\) \['chunk'\]"):
        moejax.from_pretrained(path, chunk=8)
    with pytest.raises(moejax.ConfigError, match=r"dt_floor='none' is not one of"):
        moejax.from_pretrained(path, dt_floor="none")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["layers_block_type"][0] == "linear_attention"
