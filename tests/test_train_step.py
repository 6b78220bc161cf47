"""The CPT train step on a tiny Qwen3-MoE: a memorisable batch is learned (float32 and bfloat16 compute), the
parameter mask freezes what it should bit-for-bit, and a non-finite loss leaves the state untouched.
Sharded steps are checked against one device in tests/multidevice/sharded_checks.py; the losses and
gradients against transformers in tests/test_losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.reference import make_checkpoint
from moejax.training.step import TrainConfig, _dotted, init_state, make_train_step


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("train") / "model", seed=1)[1]


def train(path, cfg, steps, ids, mask=None):
    model = moejax.from_pretrained(path)
    graphdef, state, tx = init_state(model, cfg)
    step = make_train_step(graphdef, tx, cfg, model.config.num_experts_per_tok)
    mask = np.ones_like(ids) if mask is None else mask
    history = []
    for _ in range(steps):
        state, metrics = step(state, ids, mask, ids)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


BATCH = np.random.default_rng(0).integers(1, 97, (2, 16))


@pytest.mark.parametrize("dtype, factor", [("float32", 0.02), ("bfloat16", 0.1)])
def test_memorises_a_batch(path, dtype, factor):
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=60, compute_dtype=dtype, lb_coef=1e-2,
                      z_coef=1e-3)
    state, history = train(path, cfg, 60, BATCH)
    assert all(h["finite"] for h in history)
    assert history[-1]["loss"] < factor * history[0]["loss"]
    assert history[0]["lr"] == 0.0 and history[5]["lr"] == pytest.approx(1e-2)
    assert int(state.step) == 60
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # master weights stay float32


def test_parameter_mask_freezes_the_rest(path):
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, compute_dtype="float32",
                      trainable=r"mlp\.experts\.")
    state, _ = train(path, cfg, 3, BATCH)
    before = moejax.from_pretrained(path)
    _, original, _ = init_state(before, cfg)
    trained = {_dotted(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    for p, v in jax.tree_util.tree_flatten_with_path(original.params)[0]:
        name = _dotted(p)
        changed = not np.array_equal(trained[name], np.asarray(v))
        assert changed == ("mlp.experts." in name), name
    with pytest.raises(ValueError, match="matches no parameter"):
        init_state(before, TrainConfig(trainable="no_such_parameter"))


def test_non_finite_loss_leaves_the_state(path):
    cfg = TrainConfig(compute_dtype="float32")
    model = moejax.from_pretrained(path)
    model.embed_vd[...] = model.embed_vd[...].at[int(BATCH[0, 3])].set(jnp.nan)
    graphdef, state, tx = init_state(model, cfg)
    step = make_train_step(graphdef, tx, cfg, model.config.num_experts_per_tok)
    new, metrics = step(state, BATCH, np.ones_like(BATCH), BATCH)
    assert not bool(metrics["finite"]) and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_nemotron_training_is_refused_clearly(tmp_path):
    _, nemotron = make_checkpoint("nemotron_h", tmp_path / "n", seed=2)
    with pytest.raises(ValueError, match="training nemotron_h is not implemented yet"):
        init_state(moejax.from_pretrained(nemotron), TrainConfig())
