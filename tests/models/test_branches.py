"""Documents laid out as trees (a shared trunk, then branches that each see the trunk and themselves only), and the
lm-eval backend's loglikelihoods that use them.

A tree row's logits equal those of each branch run as a document of its own after the trunk (float32, within 1e-5:
the same keys in another order of summation); the same row with every token on the trunk (branches that see each
other) does not. The backend's loglikelihoods and greedy flags equal a numpy log-softmax over each request run alone
(within 1e-4 per request, the tolerance the lm-eval comparison holds it to), with a shared trunk (Qwen3-MoE) or,
for a model that cannot read a tree (Nemotron-H's Mamba-2 layers, a sliding window), each context run once into a
cache and its continuations continued from it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra: the random checkpoints come from transformers

from support import log_softmax

import moejax
from moejax.parity.fixtures import make_checkpoint

pytestmark = pytest.mark.torch
OVERRIDES = {"nemotron_h": {"dt_floor": "time_step_min"}, "qwen3_moe": {}}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    _, path = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen"), seed=4, byte_tokenizer=True)
    return path


def forward(model, ids, segments, positions, branches=None):
    return np.asarray(model.forward(np.asarray([ids], np.int32), np.asarray([segments], np.int32),
                                    np.asarray([positions], np.int32), False, branch_ids_bt=None if branches is None
                                    else np.asarray([branches], np.int32)).logits[0])


def alone(model, sequences, width: int = 48):
    """Each sequence's logits, run as a document of its own (right-padded rows of one width: one compilation)."""
    ids, mask = np.zeros((len(sequences), width), np.int32), np.zeros((len(sequences), width), np.int32)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    logits = np.asarray(model(ids, mask).logits)
    return [logits[row, :len(tokens)] for row, tokens in enumerate(sequences)]


def test_tree_row_equals_separate_documents(qwen):
    model = moejax.from_pretrained(qwen)
    assert model.reads_branches
    rng = np.random.default_rng(0)
    other, trunk = list(rng.integers(3, 259, 9)), list(rng.integers(3, 259, 7))
    branches = [list(rng.integers(3, 259, n)) for n in (4, 1, 5)]
    # Another document first, so the tree is the row's second segment.
    ids = other + trunk + sum(branches, [])
    segments = [1] * len(other) + [2] * (len(ids) - len(other))
    branch_ids = [0] * (len(other) + len(trunk)) + sum(([j + 1] * len(b) for j, b in enumerate(branches)), [])
    positions = (list(range(len(other))) + list(range(len(trunk)))
                 + sum((list(range(len(trunk), len(trunk) + len(b))) for b in branches), []))
    tree = forward(model, ids, segments, positions, branch_ids)
    flat = forward(model, ids, segments, positions, [0] * len(ids))  # every token on the trunk: branches see each other
    start = len(other) + len(trunk)
    first, *wholes = alone(model, [other] + [trunk + b for b in branches])
    np.testing.assert_allclose(tree[:len(other)], first, atol=1e-5, rtol=0)
    for b, whole in zip(branches, wholes, strict=True):
        np.testing.assert_allclose(tree[len(other):len(other) + len(trunk)], whole[:len(trunk)], atol=1e-5, rtol=0)
        np.testing.assert_allclose(tree[start:start + len(b)], whole[len(trunk):], atol=1e-5, rtol=0)
        if b is not branches[0]:
            assert np.abs(flat[start:start + len(b)] - whole[len(trunk):]).max() > 1e-2
        start += len(b)


def test_models_that_cannot_read_a_tree(tmp_path):
    _, path = make_checkpoint("nemotron_h", tmp_path / "nemotron", seed=1)
    nemotron = moejax.from_pretrained(path, dt_floor="time_step_min")
    _, path = make_checkpoint("qwen3_moe", tmp_path / "window", seed=1, use_sliding_window=True, sliding_window=6)
    windowed = moejax.from_pretrained(path)
    for model in (nemotron, windowed):
        assert not model.reads_branches
        with pytest.raises(ValueError, match="cannot read a document laid out as a tree"):
            forward(model, [5, 6, 7], [1, 1, 1], [0, 1, 2], [0, 1, 1])


def test_segments_layout():
    from moejax.evaluation.harness import _segments

    trees = {(1, 2, 3): {(4, 5): {6, 7}, (8,): {9}, (): {4, 10}}, (11,): {(): {12}}}
    segments, where = _segments(trees)
    assert [s.tokens for s in segments] == [[1, 2, 3, 4, 5, 8], [11]]
    assert segments[0].branches == [0, 0, 0, 1, 1, 2] and segments[0].positions == [0, 1, 2, 3, 4, 3]
    # The trunk's end asks for every first token (4 is asked by a branch and by a one-token continuation alike).
    assert segments[0].asked == {2: [4, 8, 10], 3: [5], 4: [6, 7], 5: [9]} and segments[1].asked == {0: [12]}
    assert where == {((1, 2, 3), (4, 5)): [(0, 2), (0, 3), (0, 4)], ((1, 2, 3), (8,)): [(0, 2), (0, 5)],
                     ((1, 2, 3), ()): [(0, 2)], ((11,), ()): [(1, 0)]}


@pytest.mark.parametrize("arch, batch_size", [  # the quick loop runs the shared trunk; the full suite every case
    ("qwen3_moe", 8), pytest.param("nemotron_h", 8, marks=pytest.mark.slow),
    pytest.param("nemotron_h", 2, marks=pytest.mark.slow),
    pytest.param("qwen3_moe_window", 3, marks=pytest.mark.slow)])
def test_loglikelihoods_equal_each_request_alone(arch, batch_size, qwen, tmp_path):
    """Trees (Qwen3-MoE) or contexts continued from their cache rows (Nemotron-H, a sliding window): contexts of
    several lengths share a left-padded batch, continuations of several lengths a right-padded one, and with a small
    batch_size every batch of contexts needs several passes of continuations."""
    pytest.importorskip("lm_eval")
    from moejax.evaluation.harness import MoejaxLM

    if arch == "qwen3_moe":
        path = qwen
    elif arch == "qwen3_moe_window":
        path = make_checkpoint("qwen3_moe", tmp_path / arch, seed=4, byte_tokenizer=True, use_sliding_window=True,
                               sliding_window=6)[1]
    else:
        path = make_checkpoint(arch, tmp_path / arch, seed=4, byte_tokenizer=True)[1]
    lm = MoejaxLM(pretrained=str(path), max_length=40, batch_size=batch_size, **OVERRIDES.get(arch, {}))
    assert lm.model.reads_branches == (arch == "qwen3_moe")
    rng = np.random.default_rng(1)
    requests = []
    for n in (3, 9, 1):
        context = list(rng.integers(3, 259, n))
        continuations = [list(rng.integers(3, 259, m)) for m in (1, 4, 6, 1)]
        continuations.append(continuations[1][:-1] + [continuations[1][-1] + 1])  # differs in its last token only
        requests += [(None, context, c) for c in continuations]
    requests.append((None, list(rng.integers(3, 259, 38)), list(rng.integers(3, 259, 5))))  # cut to max_length
    # Greedy continuations, so that some flags are true.
    context = list(rng.integers(3, 259, 6))
    greedy = []
    for _ in range(3):
        greedy.append(int(np.argmax(alone(lm.model, [context + greedy])[0][-1])))
    requests += [(None, context, greedy), (None, context, greedy[:1]), (None, context, greedy[:2] + [greedy[2] ^ 1])]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    inputs = [(context + continuation)[-41:-1] for _, context, continuation in requests]
    for (_, _, continuation), logits, (logp, is_greedy) in zip(requests, alone(lm.model, inputs), got, strict=True):
        scores = log_softmax(logits)[len(logits) - len(continuation):]
        want = sum(scores[i, t] for i, t in enumerate(continuation))
        assert abs(logp - want) <= 1e-4, (context, continuation, logp, want)
        assert is_greedy == all(int(np.argmax(scores[i])) == t for i, t in enumerate(continuation))
    assert [g for _, g in got[-3:]] == [True, True, False]
