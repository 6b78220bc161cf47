"""Packed rows are exact for both architectures: each document of a row gets what it gets alone.

A row of three documents (segment ids 1, 2, 3; positions restarting) against each document run alone: logits and
router logits within 1e-5, chosen experts identical, for Qwen3-MoE (attention masked per document) and Nemotron-H
(also the Mamba-2 convolution and SSD state stopping at each boundary). The documents' lengths put boundaries at odd
places of the 8-token SSD chunks, one document is shorter than the 4-tap convolution, and one starts exactly at a
chunk boundary. The chunked SSD with segments equals the sequential recurrence with its state reset at each
boundary, the gradient of a packed Nemotron-H loss equals the sum of the documents' own, and the routing analysis
writes the same statistics packed and unpacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from support import QUICK_ARCHS, assert_same_statistics, tie_forcing

import moejax
from moejax.data.corpus import chunk, read_corpus
from moejax.data.mixture import IGNORE_INDEX
from moejax.data.packing import segment_positions
from moejax.data.tokenize import HFTokenizer
from moejax.layers.mamba2 import segment_runs
from moejax.layers.ssd import ssd_chunked, ssd_sequential
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer
from moejax.routing.analysis import ModelRun, build_tables, collect

pytestmark = pytest.mark.torch
OVERRIDES = {"nemotron_h": {"dt_floor": "time_step_min"}, "qwen3_moe": {}}
# 13 + 3 = 16: the third document starts exactly at a chunk boundary (chunk 8); the second (3 tokens) is shorter
# than the convolution (4 taps); 13 and 21 end mid-chunk.
LENGTHS = (13, 3, 21)


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    make_checkpoint(request.param, path, seed=31, vocab_size=259)
    save_byte_tokenizer(path)
    return path, moejax.from_pretrained(path, **OVERRIDES[request.param])


def packed_row(rng):
    docs = [rng.integers(3, 259, n) for n in LENGTHS]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)])[None]
    return docs, np.concatenate(docs)[None], segments


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_chunked_ssd_with_segments_equals_the_recurrence_with_resets(chunk_size):
    rng = np.random.default_rng(chunk_size)
    batch, time, heads, head_dim, groups, state = 2, 70, 4, 3, 2, 5
    x = jnp.asarray(rng.normal(size=(batch, time, heads, head_dim)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.05, 0.6, (batch, time, heads)), jnp.float32)
    a = -jnp.asarray(rng.uniform(0.3, 1.5, heads), jnp.float32)
    b, c = (jnp.asarray(rng.normal(size=(batch, time, groups, state)), jnp.float32) for _ in range(2))
    # Boundaries at 1 (a one-token document), at chunk multiples, mid-chunk, and a padding run at the end.
    segments = np.zeros((batch, time), np.int32)
    for row, cuts in enumerate(([0, 1, 8, 16, 29, 45, 64], [0, 7, 24, 25, 48, 66])):
        for i, (start, stop) in enumerate(zip(cuts, cuts[1:] + [time], strict=True)):
            segments[row, start:stop] = i + 1
    segments[1, 66:] = 0
    runs = segment_runs(jnp.asarray(segments))
    initial = jnp.asarray(rng.normal(size=(batch, heads, head_dim, state)), jnp.float32)
    y_chunked, final_chunked = jax.jit(ssd_chunked, static_argnums=5)(x, dt, a, b, c, chunk_size, initial, runs)
    sequential = jax.jit(ssd_sequential)  # compiled whole, as the model runs it, not operation by operation
    y_oracle, final_oracle = sequential(x, dt, a, b, c, initial, runs)
    np.testing.assert_allclose(np.asarray(y_chunked), np.asarray(y_oracle), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final_chunked), np.asarray(final_oracle), rtol=0, atol=1e-5)
    # The reset really happens: without the runs the outputs after the first boundary differ.
    unsegmented, _ = sequential(x, dt, a, b, c, initial)
    assert np.abs(np.asarray(unsegmented)[:, 8:] - np.asarray(y_oracle)[:, 8:]).max() > 1e-2


def test_each_document_of_a_packed_row_gets_what_it_gets_alone(model):
    _, m = model
    docs, row, segments = packed_row(np.random.default_rng(0))
    packed = m(row, segment_ids=segments, return_router_logits=True)
    start = 0
    for doc in docs:
        span = slice(start, start + len(doc))
        alone = m(doc[None], return_router_logits=True)
        assert np.abs(np.asarray(packed.logits)[0, span] - np.asarray(alone.logits)[0]).max() <= 1e-5
        for ours, theirs, ours_ids, their_ids in zip(packed.router_logits, alone.router_logits,
                                                     packed.router_expert_ids, alone.router_expert_ids, strict=True):
            assert np.abs(np.asarray(ours)[0, span] - np.asarray(theirs)[0]).max() <= 1e-5
            np.testing.assert_array_equal(np.sort(np.asarray(ours_ids)[0, span], -1),
                                          np.sort(np.asarray(their_ids)[0], -1))
        start += len(doc)
    # Without the segments, the later documents see the earlier ones.
    leaky = m(row, position_ids=np.concatenate([np.arange(n) for n in LENGTHS])[None]).logits
    assert np.abs(np.asarray(leaky)[0, LENGTHS[0]:] - np.asarray(packed.logits)[0, LENGTHS[0]:]).max() > 1e-3


def test_changing_one_document_leaves_the_others(model):
    _, m = model
    _, row, segments = packed_row(np.random.default_rng(1))
    changed = row.copy()
    changed[0, LENGTHS[0] - 1] = (changed[0, LENGTHS[0] - 1] + 1) % 259
    a = np.asarray(m(row, segment_ids=segments).logits)
    b = np.asarray(m(changed, segment_ids=segments).logits)
    assert np.abs(a[0, LENGTHS[0]:] - b[0, LENGTHS[0]:]).max() <= 1e-6
    assert np.abs(a[0, LENGTHS[0] - 1] - b[0, LENGTHS[0] - 1]).max() > 1e-3


def _summed_loss(graphdef, params, ids, segments, positions, labels):
    """The summed next-token cross-entropy of a row (labels IGNORE_INDEX where not predicted)."""
    model = nnx.merge(graphdef, params)
    logits = model.forward(ids, segments, positions, False).logits[:, :-1]
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid)


# Float32 bound on the packed gradient, relative to each parameter's largest entry. Observed: 0.6-1.4e-5, uniform over
# every parameter at or below the deepest Mamba-2 layer (its backward through the SSD sums dt * A over the packed
# row's longer chunks than over each document alone, and everything below inherits that rounding), under 1e-6 above
# it. A state or an attention that leaks across a document boundary moves the gradient by orders of magnitude more
# (checked below), so the bound still separates a packing error from rounding.
GRADIENT_BOUND = 3e-5


def _worst_relative_error(got_tree, want_tree) -> tuple[float, str]:
    worst = (0.0, "")
    for (key, got), want in zip(jax.tree_util.tree_flatten_with_path(got_tree)[0], jax.tree.leaves(want_tree),
                                strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(float(np.abs(want).max()), 1e-12)
        worst = max(worst, (float(np.abs(got - want).max()) / scale, jax.tree_util.keystr(key)))
    return worst


@pytest.mark.slow
def test_packed_nemotron_gradient_is_the_sum_of_the_documents(tmp_path):
    path = tmp_path / "model"
    make_checkpoint("nemotron_h", path, seed=8, vocab_size=259)
    model = moejax.from_pretrained(path, **OVERRIDES["nemotron_h"])
    graphdef, params = nnx.split(model)
    docs, row, segments = packed_row(np.random.default_rng(2))
    starts = np.cumsum((0, *LENGTHS[:-1]))
    labels = row.copy()
    labels[0, starts[1:]] = IGNORE_INDEX  # a document's first token is not predicted from the one before
    summed_grad = jax.jit(jax.grad(_summed_loss, argnums=1), static_argnums=0)

    def grad(graphdef, params, ids, segments, labels):
        return summed_grad(graphdef, params, ids, segments, jnp.asarray(segment_positions(np.asarray(segments))),
                           labels)

    packed = grad(graphdef, params, jnp.asarray(row), jnp.asarray(segments), jnp.asarray(labels))
    # Each document alone in its own row, right-padded to the longest (the padding unlabelled, so one program serves
    # every document), one row at a time.
    width = max(LENGTHS)
    separate = []
    for doc in docs:
        alone = np.zeros((1, width), np.int64)
        alone[0, :len(doc)] = doc
        alone_labels = np.where(np.arange(width) < len(doc), alone, IGNORE_INDEX)
        separate.append(grad(graphdef, params, jnp.asarray(alone), jnp.asarray(alone_labels != IGNORE_INDEX, jnp.int32),
                             jnp.asarray(alone_labels)))
    summed = jax.tree.map(lambda *g: sum(np.asarray(x, np.float64) for x in g), *separate)
    error, where = _worst_relative_error(packed, summed)
    assert error <= GRADIENT_BOUND, where
    # The check itself: the same row packed without its segment ids (one document: the Mamba-2 state, the
    # convolution and attention all cross the boundaries) fails it by far.
    leaky = grad(graphdef, params, jnp.asarray(row), jnp.ones_like(jnp.asarray(segments)), jnp.asarray(labels))
    assert _worst_relative_error(leaky, summed)[0] > 100 * GRADIENT_BOUND


@pytest.mark.slow
def test_analysis_packed_equals_unpacked(model):
    """The sample corpus's sentences packed many to a row, and one per row: the same statistics (counts exact,
    float sums within 1e-6 relative) once any near tie that flipped between the two layouts is forced, and the
    same tables."""
    path, m = model
    tokenizer = HFTokenizer(path)
    corpus = chunk({lang: lines[:48] for lang, lines in read_corpus(None, ["en", "he"]).items()}, 30, "paragraph")
    common = dict(exclude_ids=sorted(tokenizer.special_ids), batch_size=4, probabilities="softmax", seed=0,
                  keep_routing=True)
    runs = {}
    for lang, texts in corpus.items():
        report = {}
        packed = collect(m, tokenizer, texts, packed=True, report=report, **common)
        alone = collect(m, tokenizer, texts, packed=False, **common)
        assert report["fill"] > 0.6 and len({width for _, width in report["shapes"]}) == 1
        assert all(rows <= 4 for rows, _ in report["shapes"])
        forced, _ = tie_forcing(m, alone, packed)
        if forced:
            packed = collect(m, tokenizer, texts, packed=True, forced=forced, **common)
        # Counts identical; the float32 sums over a chunk's ~400 tokens are accumulated in another order once packed
        # (another row position, another reduction tree): ~sqrt(400) * 6e-8 ~ 1.2e-6 relative, observed up to
        # 1.19e-6, so the bound is assert_same_statistics' 1e-5 (n * eps for n = 400 is 2.4e-5).
        assert_same_statistics(alone, packed)
        runs[lang] = (alone, packed)
    cfg = m.config
    tables = [build_tables([ModelRun("m", str(path), cfg.model_type, cfg.moe_layers, cfg.num_experts_per_tok,
                                     cfg.num_routed_experts, common["exclude_ids"],
                                     {lang: pair[side] for lang, pair in runs.items()})], ["en", "he"], 0)
              for side in (0, 1)]
    for table in ("layers", "experts", "pairs", "lsi"):
        for a, b in zip(tables[0][table], tables[1][table], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    # LSI is a difference quotient near 0: bounded by 1e-6 of its [-1, 1] range.
                    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"{table} {key}")
                else:
                    assert a[key] == b[key], (table, key)
