"""The vocabulary split over "tensor" on 8 simulated CPU devices: the embedding table and the LM head hold vocab/tensor
rows each, the logits leave the forward split over the vocabulary, and nothing in the forward, the train step or
the evaluation scoring makes the full-vocabulary logits (or the table) whole on a device. Each device reduces
its own share: the embedding lookup is a masked local lookup and a [b, t, d] all-reduce, the loss [b, t]
all-reduces (moejax.training.losses.next_token_loss).

Run in the 8-device worker (tests/multidevice/conftest.py). The compiled programs are read as XLA's HLO text:
a collective whose result has a dimension of the vocabulary's size, or a gather-like collective (all-gather,
all-to-all, collective-permute) at least as large as a device's tokens times the vocabulary, would be the logits,
the table or the head made whole; test_hlo_check_catches_a_gather shows the check finds one. The vocabulary (520)
is sized apart from every other dimension of the tiny models.

Bounds: float32 logits within 1e-5 of one device, relative to their largest magnitude (test_sharded.py's bound
for logits of ~5; the tied Qwen table as the head gives logits of ~50, observed ~1.5e-5 apart on every mesh,
expert=8 too: the split matmuls and the expert all-reduce sum in another order); the loss within 1e-6
relative (a mean of float32 cross-entropies).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import moejax

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from support import forward_up_to_ties

from moejax.evaluation.harness import _score
from moejax.models.common import jitted_forward
from moejax.parallel.mesh import batch_sharding, make_mesh, on_mesh
from moejax.parity.fixtures import make_checkpoint
from moejax.training.config import TrainConfig
from moejax.training.losses import next_token_loss
from moejax.training.step import BATCH_FIELDS, init_state, make_train_step

pytestmark = [pytest.mark.torch, pytest.mark.multidevice, pytest.mark.slow]

VOCAB = 520  # 8 * 65: splits over tensor=8, and no other dimension of the tiny models has this size
# Eight query heads split over tensor=8; Nemotron-H's shared expert 24 wide so that it splits too.
SHAPES = {"qwen3_moe": dict(num_attention_heads=8, tie_word_embeddings=True),
          "nemotron_h": dict(num_attention_heads=8, moe_shared_expert_intermediate_size=24)}
MESHES = {"tensor=8": lambda: make_mesh("tensor=8"),
          "jax.make_mesh Explicit tensor=2,expert=2,data=2": lambda: jax.make_mesh(
              (2, 2, 2), ("tensor", "expert", "data"), axis_types=(AxisType.Explicit,) * 3)}
COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(?:-start)?\(")
SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def whole_vocabulary(hlo: str, gathered_limit: int) -> list[str]:
    """The collectives of a compiled program that make the vocabulary whole: a result with a VOCAB-sized dimension,
    or an all-gather / all-to-all / collective-permute result of gathered_limit elements or more."""
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match is None:
            continue
        shapes = [[int(d) for d in dims.split(",") if d] for dims in SHAPE.findall(match.group(1))]
        if any(VOCAB in s for s in shapes) or (match.group(2) not in ("all-reduce", "reduce-scatter")
                                               and any(np.prod(s) >= gathered_limit for s in shapes)):
            found.append(line.strip()[:200])
    return found


def assert_close(got, want) -> None:
    """Within 1e-5 of want's largest magnitude (at least 1)."""
    want = np.asarray(want)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def logits_limit(mesh, batch: int, seq: int) -> int:
    """A device's tokens times the vocabulary: the size of its logits made whole."""
    spec = batch_sharding(mesh, (batch,)).spec[0] or ()
    return batch // int(np.prod([mesh.shape[a] for a in spec])) * seq * VOCAB


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = {}
    for arch, shape in SHAPES.items():
        out[arch] = tmp_path_factory.mktemp(arch) / "model"
        make_checkpoint(arch, out[arch], seed=31, vocab_size=VOCAB, **shape)
    return out


def load(paths, arch, mesh=None):
    return moejax.from_pretrained(paths[arch], mesh=mesh, **({"dt_floor": "time_step_min"} if arch == "nemotron_h"
                                                              else {}))


def batch(rng, rows=4, seq=32):
    ids = rng.integers(0, VOCAB, (rows, seq))
    mask = np.ones((rows, seq), np.int64)
    mask[1, 25:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_vocab_split_forward_equals_one_device(paths, arch, mesh_name):
    """Embedding rows and LM-head columns split over tensor (Qwen ties them: one table serves both), the logits
    leave the forward split over the vocabulary, the compiled forward makes none of them whole, and the logits
    equal one device's."""
    mesh = MESHES[mesh_name]()
    tensor = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))["tensor"]
    sharded = load(paths, arch, mesh)
    params = {path[-1]: var[...] for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    assert params["embed_vd"].sharding.shard_shape(params["embed_vd"].shape) == (VOCAB // tensor, 48)
    if arch == "nemotron_h":
        assert params["lm_head_dv"].sharding.shard_shape(params["lm_head_dv"].shape) == (48, VOCAB // tensor)
    else:
        assert "lm_head_dv" not in params

    ids, mask = batch(np.random.default_rng(1))
    want, got, _ = forward_up_to_ties(load(paths, arch), sharded, ids, mask)
    assert got.logits.sharding.shard_shape(got.logits.shape)[-1] == VOCAB // tensor
    assert_close(np.asarray(got.logits)[mask.astype(bool)], np.asarray(want.logits)[mask.astype(bool)])

    graphdef, state = nnx.split(sharded)
    with on_mesh(state) as place:
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
        hlo = jitted_forward.lower(graphdef, state, *place(ids.astype(np.int32), mask.astype(np.int32), positions),
                                   False, False).compile().as_text()
    assert not whole_vocabulary(hlo, logits_limit(sharded.embed_vd[...].sharding.mesh, *ids.shape))


def test_train_step_loss_does_not_gather_the_logits(paths):
    """The real train step (AdamW, balance and z-loss) on data=2,expert=2,tensor=2: its compiled program makes
    neither the logits, nor the tied table, nor their gradients whole, and its cross-entropy equals one device's
    next_token_loss."""
    rows, seq = 4, 32
    ids, _ = batch(np.random.default_rng(2), rows, seq)
    labels = np.where(np.arange(seq) % 9 == 4, -100, ids)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, compute_dtype="float32", lb_coef=1e-2,
                      z_coef=1e-3)
    model = load(paths, "qwen3_moe", make_mesh("data=2,expert=2,tensor=2"))
    graphdef, state, tx = init_state(model, cfg)
    step = make_train_step(graphdef, tx, cfg, model.config)
    full = {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(seq), ids.shape), "lang_ids": np.zeros(rows)}
    with on_mesh(state.params) as place:
        placed = dict(zip(BATCH_FIELDS, place(*(np.asarray(full[k], np.int32) for k in BATCH_FIELDS)), strict=True))
        hlo = step.jitted.lower(state, placed).compile().as_text()
    mesh = model.embed_vd[...].sharding.mesh
    assert not whole_vocabulary(hlo, logits_limit(mesh, rows, seq - 1))
    _, metrics = step(state, {"input_ids": ids, "labels": labels})
    want = next_token_loss(load(paths, "qwen3_moe")(ids).logits, jnp.asarray(labels))
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)


def test_hlo_check_catches_a_gather():
    """The check above is not vacuous: a loss that makes its vocabulary-split logits whole (a replicated sharding
    constraint before next_token_loss) is found; next_token_loss alone is not."""
    rows, seq = 4, 32
    mesh = make_mesh("data=2,expert=2,tensor=2")
    logits = jax.device_put(np.random.default_rng(3).standard_normal((rows, seq, VOCAB), np.float32),
                            NamedSharding(mesh, PartitionSpec(("data", "expert"), None, "tensor")))
    labels = jax.device_put(np.random.default_rng(4).integers(0, VOCAB, (rows, seq)), batch_sharding(mesh, (rows,)))

    def gathering(logits_btv, labels_bt):
        return next_token_loss(jax.lax.with_sharding_constraint(logits_btv, NamedSharding(mesh, PartitionSpec())),
                               labels_bt)

    limit = logits_limit(mesh, rows, seq - 1)
    for loss, gathers in ((next_token_loss, False), (gathering, True)):
        hlo = jax.jit(jax.value_and_grad(loss)).lower(logits, labels).compile().as_text()
        assert bool(whole_vocabulary(hlo, limit)) == gathers, loss.__name__


def test_eval_scoring_does_not_gather_the_logits(paths):
    """lm-eval's in-jit scoring (target log-probabilities, greedy argmax, extra tokens' log-probabilities) on
    data=2,expert=2,tensor=2: no logits made whole, and the same numbers as one device (the logits' bound)."""
    rng = np.random.default_rng(5)
    ids, _ = batch(rng)
    inputs = (ids.astype(np.int32), np.ones_like(ids, np.int32), np.broadcast_to(np.arange(32, dtype=np.int32),
                                                                                 ids.shape),
              rng.integers(0, VOCAB, ids.shape).astype(np.int32), rng.random(ids.shape) < 0.2,
              rng.integers(0, VOCAB, (*ids.shape, 4)).astype(np.int32))
    outputs = []
    for mesh in (None, make_mesh("data=2,expert=2,tensor=2")):
        graphdef, state = nnx.split(load(paths, "qwen3_moe", mesh))
        with on_mesh(state) as place:
            placed = place(*inputs)
            if mesh is not None:
                hlo = _score.lower(graphdef, state, *placed, None).compile().as_text()
                assert not whole_vocabulary(hlo, logits_limit(mesh, *ids.shape))
            outputs.append(jax.device_get(_score(graphdef, state, *placed, None)))
    (target, greedy, extra), (target_m, greedy_m, extra_m) = outputs
    assert_close(target_m, target)
    assert_close(extra_m, extra)
    np.testing.assert_array_equal(greedy_m, greedy)


def test_uneven_vocabulary_is_replicated(tmp_path):
    """A vocabulary that tensor does not divide (259, the byte-level one): the table and the head are replicated
    over tensor, and the model loads on tensor=8 and equals one device."""
    path = tmp_path / "model"
    make_checkpoint("qwen3_moe", path, seed=32, vocab_size=259, num_attention_heads=8)
    sharded = moejax.from_pretrained(path, mesh=make_mesh("tensor=8"))
    for table in (sharded.embed_vd[...], sharded.lm_head_dv[...]):
        assert table.sharding.shard_shape(table.shape) == table.shape
    ids, mask = batch(np.random.default_rng(6))
    want, got, _ = forward_up_to_ties(moejax.from_pretrained(path), sharded, ids % 259, mask)
    assert_close(np.asarray(got.logits)[mask.astype(bool)], np.asarray(want.logits)[mask.astype(bool)])
    assert got.logits.shape[-1] == 259

