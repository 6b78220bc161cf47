"""The CPT train step on a tiny Qwen3-MoE: a memorisable batch is learned (float32 and bfloat16 compute), the
parameter mask freezes what it should bit-for-bit, and a non-finite loss leaves the state untouched.
Sharded steps are checked against one device in tests/multidevice/sharded_checks.py; the losses and
gradients against transformers in tests/test_losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from moejax.errors import DataError
from moejax.parity.fixtures import make_checkpoint
from moejax.training.config import TrainConfig
from moejax.training.step import _dotted, init_state, learning_rate, make_train_step, schedule, step_numbers

pytestmark = pytest.mark.torch

@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("train") / "model", seed=1)[1]


def train(path, cfg, steps, ids, mask=None):
    model = moejax.from_pretrained(path)
    graphdef, state, tx = init_state(model, cfg)
    step = make_train_step(graphdef, tx, cfg, model.config)
    mask = np.ones_like(ids) if mask is None else mask
    history = []
    for _ in range(steps):
        state, metrics = step(state, {"input_ids": ids, "segment_ids": mask, "labels": ids})
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return state, history


BATCH = np.random.default_rng(0).integers(1, 97, (2, 16))


@pytest.mark.parametrize("dtype, factor", [("float32", 0.02), ("bfloat16", 0.1)])
@pytest.mark.slow
def test_memorises_a_batch(path, dtype, factor):
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=60, compute_dtype=dtype, lb_coef=1e-2,
                      z_coef=1e-3)
    state, history = train(path, cfg, 60, BATCH)
    assert all(h["finite"] for h in history)
    assert history[-1]["loss"] < factor * history[0]["loss"]
    assert history[0]["lr"] == 0.0 and history[5]["lr"] == pytest.approx(1e-2)
    assert int(state.step) == 60
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # master weights stay float32


@pytest.mark.slow
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


@pytest.mark.slow
def test_non_finite_loss_leaves_the_state(path):
    cfg = TrainConfig(compute_dtype="float32")
    model = moejax.from_pretrained(path)
    model.embed_vd[...] = model.embed_vd[...].at[int(BATCH[0, 3])].set(jnp.nan)
    graphdef, state, tx = init_state(model, cfg)
    step = make_train_step(graphdef, tx, cfg, model.config)
    before = jax.tree.map(np.array, state)  # the step donates `state`
    new, metrics = step(state, {"input_ids": BATCH, "labels": BATCH})
    assert not bool(metrics["finite"]) and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return make_checkpoint("nemotron_h", tmp_path_factory.mktemp("train") / "nemotron", seed=2)[1]


@pytest.mark.slow
def test_nemotron_memorises_a_batch_with_its_sigmoid_balance_loss(nemotron):
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=60, compute_dtype="float32", lb_coef=1e-2)
    _, history = train(nemotron, cfg, 60, BATCH)
    assert all(h["finite"] for h in history)
    assert history[-1]["loss"] < 0.05 * history[0]["loss"]
    assert 0.5 < history[0]["aux_loss"] < 3  # sum_e f_e P_e: 1 when balanced


@pytest.mark.slow
def test_aux_loss_free_bias_update(nemotron):
    """With a zero learning rate only the correction biases move: each MoE layer's by rate * sign(mean load -
    load), the loads counted here from the model's own routing of the batch."""
    rate = 1e-3
    cfg = TrainConfig(learning_rate=0.0, warmup_steps=1, compute_dtype="float32", lb_coef=0.0,
                      bias_update_rate=rate)
    model = moejax.from_pretrained(nemotron)
    out = model(BATCH, return_router_logits=True)
    loads = [np.bincount(np.asarray(ids).ravel(), minlength=8) for ids in out.router_expert_ids]
    state, _ = train(nemotron, cfg, 1, BATCH)
    before = {_dotted(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
    moved = 0
    for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name, value = _dotted(p), np.asarray(v)
        if not name.endswith("correction_e"):
            assert np.array_equal(value, before[name].astype(np.float32)), name
            continue
        s, u = (int(i) for i in name.split(".")[2:4])
        for r, layer in enumerate(model.layers.layer_ids[s][u]):
            load = loads[model.config.moe_layers.index(layer)]
            want = before[name][r] + rate * np.sign(load.mean() - load)
            np.testing.assert_allclose(value[r], want, rtol=0, atol=1e-7)
            moved += 1
    assert moved == len(model.config.moe_layers)
    with pytest.raises(ValueError, match="needs a sigmoid router"):
        qwen = moejax.from_pretrained(make_checkpoint("qwen3_moe", nemotron.parent / "q", seed=3)[1])
        graphdef, _, tx = init_state(qwen, cfg)
        make_train_step(graphdef, tx, cfg, qwen.config)


@pytest.mark.slow
def test_remat_and_accumulation_give_the_same_step(path):
    """remat recomputes the same values; two accumulated micro-batches of 2 rows give the gradient of one batch of
    4 (without the balance terms, which are not additive over micro-batches). Each variant's step is taken from
    the plain run's state before every one of three steps, so what is compared is one step on equal inputs:
    loss, gradient norm and the routing (expert counts), not three steps over which Adam's sign-like first
    updates would amplify float noise into different trajectories."""
    ids = np.random.default_rng(1).integers(1, 97, (4, 16))
    batch = {"input_ids": ids, "labels": ids}
    base = dict(learning_rate=1e-2, warmup_steps=1, total_steps=10, compute_dtype="float32", lb_coef=0.0)
    steps = {}
    for name, extra in {"plain": {}, "remat": {"remat": "full"}, "dots": {"remat": "dots"},
                        "accum": {"accum_steps": 2}}.items():
        cfg = TrainConfig(**base, **extra)
        graphdef, state, tx = init_state(moejax.from_pretrained(path), cfg)
        steps[name] = make_train_step(graphdef, tx, cfg, moejax.load_config(path))
    for _ in range(3):
        taken = {name: step(jax.tree.map(jnp.copy, state), batch) for name, step in steps.items()}
        want = taken["plain"][1]
        for name in ("remat", "dots", "accum"):
            got = taken[name][1]
            np.testing.assert_array_equal(got["expert_counts"], want["expert_counts"], err_msg=name)
            assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5), name
            assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-4), name
        state = taken["plain"][0]
    with pytest.raises(DataError, match="not divisible by accum_steps"):
        train(path, TrainConfig(**base, accum_steps=3), 1, ids)


def test_packed_documents_do_not_see_each_other(path):
    """A row packing two documents (segment ids 1, 2; positions restarting) gives the second document the
    logits it has alone."""
    model = moejax.from_pretrained(path)
    first, second = BATCH[0, :7], BATCH[1, :9]
    packed = np.concatenate([first, second])[None]
    segments = np.array([[1] * 7 + [2] * 9])
    positions = np.array([list(range(7)) + list(range(9))])
    together = np.asarray(model(packed, segments, position_ids=positions).logits)[0, 7:]
    alone = np.asarray(model(second[None]).logits)[0]
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    leaky = np.asarray(model(packed, np.ones_like(segments), position_ids=positions).logits)[0, 7:]
    assert np.abs(leaky - alone).max() > 1e-2  # without the segments the second document sees the first


@pytest.mark.parametrize("settings", [dict(learning_rate=1e-2, warmup_steps=5, total_steps=60),
                                      dict(learning_rate=3e-4, warmup_steps=0, total_steps=7, min_lr_ratio=0.0),
                                      dict(learning_rate=1.0, total_steps=1000),
                                      dict(learning_rate=2e-5, warmup_steps=40, total_steps=20, min_lr_ratio=0.5)])
def test_learning_rate_from_numbers_is_the_schedule(path, settings):
    """The step's learning rate, computed from its numbers as data, is optax's schedule (to float32 rounding) at
    every step of the warmup, the cosine and past its end; a wrong warmup or floor is caught."""
    cfg = TrainConfig(**settings).resolved(moejax.load_config(path))
    counts = np.arange(cfg.total_steps + cfg.warmup_steps + 10, dtype=np.int32)
    at = jax.jit(learning_rate)
    want = np.asarray([schedule(cfg)(int(n)) for n in counts])
    np.testing.assert_allclose(np.asarray(at(step_numbers(cfg), counts)), want, rtol=2e-6,
                               atol=1e-6 * cfg.learning_rate)
    assert want[0] == 0.0 and want[-1] == pytest.approx(cfg.learning_rate * cfg.min_lr_ratio, rel=1e-6)
    for wrong in ({"warmup": np.int32(cfg.warmup_steps + 2)}, {"min_lr_ratio": np.float32(cfg.min_lr_ratio + 0.2)}):
        assert not np.allclose(np.asarray(at(step_numbers(cfg) | wrong, counts)), want, rtol=1e-3, atol=0)


@pytest.mark.slow
def test_runs_that_differ_in_numbers_share_one_program(path):
    """Two runs that differ only in the step's numbers (learning rate, schedule, balance and z-loss coefficients)
    run one compiled step, and each gets its own numbers: its learning rate is its schedule's and its total loss
    its own coefficients' sum. A run that differs in what the step computes (remat) gets another program; a custom
    optimizer is used as given."""
    import optax

    runs, params = {}, {}
    for name, settings in {"a": dict(learning_rate=1e-3, warmup_steps=2, total_steps=9, lb_coef=1e-2),
                           "b": dict(learning_rate=5e-2, warmup_steps=1, total_steps=4, lb_coef=0.3, z_coef=1e-2),
                           "remat": dict(learning_rate=1e-3, warmup_steps=2, total_steps=9, remat="full"),
                           "b with constants": dict(learning_rate=5e-2, warmup_steps=1, total_steps=4, lb_coef=0.3,
                                                    z_coef=1e-2)}.items():
        cfg = TrainConfig(compute_dtype="float32", **settings)
        model = moejax.from_pretrained(path)
        graphdef, state, tx = init_state(model, cfg)
        if name == "b with constants":  # the optimizer as a plain optax transformation: its own program, lr constant
            tx = optax.GradientTransformation(tx.init, tx.update)
        step = make_train_step(graphdef, tx, cfg, model.config)
        resolved = cfg.resolved(model.config)
        for n in range(3):
            state, metrics = step(state, {"input_ids": BATCH})
            assert float(metrics["lr"]) == pytest.approx(float(schedule(resolved)(n)), rel=2e-6, abs=1e-12)
            want = metrics["loss"] + resolved.lb_coef * metrics["aux_loss"] + resolved.z_coef * metrics["z_loss"]
            assert float(metrics["total_loss"]) == pytest.approx(float(want), rel=1e-6)
        runs[name], params[name] = step.jitted.program, jax.tree.leaves(state.params)
    assert runs["a"] is runs["b"] and runs["remat"] is not runs["a"] and runs["b with constants"] is not runs["b"]
    # b's updates, made by the program compiled for a, are b's own: those of b's optimizer with its constants (to
    # float32 rounding of the learning rate), and far from a's.
    moved = max(float(np.abs(np.asarray(new) - np.asarray(old)).max()) for new, old in
                zip(params["b"], params["a"], strict=True))
    assert moved > 1e-3
    for got, want in zip(params["b"], params["b with constants"], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * moved)

    cfg = TrainConfig(compute_dtype="float32", learning_rate=1e-3, warmup_steps=2, total_steps=9, lb_coef=1e-2)
    model = moejax.from_pretrained(path)
    graphdef, state, _ = init_state(model, cfg)

    def no_update(grads, opt_state, params):  # a custom optimizer: zero updates, its state kept
        return jax.tree.map(jnp.zeros_like, grads), opt_state

    step = make_train_step(graphdef, optax.GradientTransformation(lambda params: state.opt_state, no_update), cfg,
                           model.config)
    before = jax.tree.map(np.array, state.params)
    state, _ = step(state, {"input_ids": BATCH})
    assert step.jitted.program is not runs["a"]
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old)
