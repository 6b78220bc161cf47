"""Generation with caches against transformers' `generate`, against moejax's own forward pass, and its sampler
against a numpy reference.

Greedy decoding equals transformers token for token (float32, random checkpoints written by save_pretrained with
every parameter refilled): a batch of 3 left-padded prompts whose lengths cross the 8-token SSD chunks (one ends
exactly on a chunk boundary), 24 new tokens, and an end-of-sequence id that stops one row early while the others
run on. Each decode step's logits equal a full forward pass's logits at that position, and the Mamba-2 one-token
recurrence equals the chunked SSD continued by one token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from flax import nnx
from support import QUICK_ARCHS, padded_batch

import moejax
from moejax.errors import DataError
from moejax.layers.attention import Attention
from moejax.layers.ssd import ssd_chunked, ssd_step
from moejax.models.generation import Sampler
from moejax.parity.fixtures import make_checkpoint

pytestmark = pytest.mark.torch
OVERRIDES = {"nemotron_h": {"dt_floor": "time_step_min"}, "qwen3_moe": {}}
# Prompt lengths: 19 and 13 end mid-chunk, 16 exactly on a chunk boundary (the SSD chunk is 8 tokens).
LENGTHS, NEW = [19, 16, 13], 24
# Greedy choices may differ only where the reference's two best logits are this close (a tie of the argmax, which
# another order of summation can flip); from such a step on, that row is no longer comparable.
ARGMAX_TIE = 1e-5


@pytest.fixture(scope="module", params=["qwen3_moe", "nemotron_h"])
def checkpoint(request, tmp_path_factory):
    reference, path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    return reference, moejax.from_pretrained(path, **OVERRIDES[request.param])


def prompts(seed: int = 0):
    return padded_batch(np.random.default_rng(seed), 97, LENGTHS, max(LENGTHS), "left")


def reference_generate(reference, ids, mask, eos, new: int = NEW):
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
    return out.sequences.numpy(), torch.stack(out.scores, dim=1).double().numpy()


def assert_same_tokens(ref_sequences, ref_scores, ours, prompt: int):
    """Token for token, except from a step where the reference's argmax is a proven tie (then the row stops being
    compared); returns the rows compared to the end."""
    assert ours.shape == ref_sequences.shape, f"shapes {ours.shape} vs {ref_sequences.shape}"
    np.testing.assert_array_equal(ours[:, :prompt], ref_sequences[:, :prompt])
    whole = []
    for row in range(ours.shape[0]):
        differ = np.flatnonzero(ours[row, prompt:] != ref_sequences[row, prompt:])
        if not len(differ):
            whole.append(row)
            continue
        step = differ[0]
        scores = ref_scores[row, step]
        gap = scores[ref_sequences[row, prompt + step]] - scores[ours[row, prompt + step]]
        assert gap <= ARGMAX_TIE, (f"row {row}, new token {step}: moejax chose {ours[row, prompt + step]}, "
                                   f"transformers {ref_sequences[row, prompt + step]} (logit gap {gap:.3g})")
    return whole


@pytest.mark.parametrize("checkpoint", QUICK_ARCHS, indirect=True)
def test_greedy_equals_transformers(checkpoint):
    reference, model = checkpoint
    ids, mask = prompts()
    prompt = ids.shape[1]
    free = model.generate(ids, mask, max_new_tokens=NEW)
    ref_free, ref_scores = reference_generate(reference, ids, mask, None)
    assert len(assert_same_tokens(ref_free, ref_scores, free.sequences, prompt)) == 3
    # An end-of-sequence id one row produces part-way while another row never does.
    new = free.sequences[:, prompt:]
    eos = next(int(t) for t in new[1, 3:NEW - 4] if t not in new[0] and t not in new[1, :3])
    stopped = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    ref_stopped, ref_scores = reference_generate(reference, ids, mask, eos)
    assert assert_same_tokens(ref_stopped, ref_scores, stopped.sequences, prompt) == [0, 1, 2]
    row1 = stopped.sequences[1, prompt:]
    at = int(np.flatnonzero(row1 == eos)[0])
    assert at < NEW - 1 and (row1[at + 1:] == 0).all(), "the row that produced the end-of-sequence id is padded"
    assert eos not in stopped.sequences[0, prompt:]


@pytest.mark.slow
def test_greedy_with_a_sliding_window_equals_transformers(tmp_path):
    """Qwen3-MoE with use_sliding_window (6 tokens): prompts of 13-19 tokens and 24 new ones decode far past the
    window, each step seeing only its last 6 tokens, as transformers' generate does."""
    reference, path = make_checkpoint("qwen3_moe", tmp_path, seed=5, use_sliding_window=True, sliding_window=6)
    model = moejax.from_pretrained(path)
    assert model.config.sliding_window == 6
    ids, mask = prompts(2)
    ours = model.generate(ids, mask, max_new_tokens=NEW).sequences
    ref_sequences, ref_scores = reference_generate(reference, ids, mask, None)
    assert len(assert_same_tokens(ref_sequences, ref_scores, ours, ids.shape[1])) == 3
    full = model.generate(ids, mask, max_new_tokens=NEW)  # the window matters: without it the tokens differ
    unwindowed = moejax.from_pretrained(path)
    unwindowed.config = dataclasses.replace(unwindowed.config, sliding_window=None)
    for _, attn in nnx.iter_graph(unwindowed):
        if isinstance(attn, Attention):
            attn.window = None
    assert not np.array_equal(unwindowed.generate(ids, mask, max_new_tokens=NEW).sequences, full.sequences)


@pytest.mark.parametrize("checkpoint", QUICK_ARCHS, indirect=True)
def test_decode_logits_equal_forward(checkpoint):
    _, model = checkpoint
    ids, mask = prompts(1)
    out = model.generate(ids, mask, max_new_tokens=NEW, return_logits=True)
    whole_mask = np.concatenate([mask, np.ones((len(ids), NEW), mask.dtype)], axis=1)
    positions = np.maximum(np.cumsum(whole_mask, axis=1) - 1, 0)
    full = np.asarray(model(out.sequences, whole_mask, position_ids=positions).logits)
    prompt = ids.shape[1]
    # The logits each new token came from are the forward pass's at the position before it.
    np.testing.assert_allclose(out.logits, full[:, prompt - 1:-1], atol=1e-4, rtol=0)


def test_callbacks_see_the_loops_tokens(checkpoint):
    """on_token and stop make the decode loop stop after every token (to bring it to the host): the tokens are those
    of the single loop on the device. stop ends generation once every row is done; with an end-of-sequence id, a row
    that is done is padded from the next token on (transformers' StoppingCriteria with its unfinished_sequences)."""
    _, model = checkpoint
    ids, mask = prompts(3)
    prompt = ids.shape[1]
    whole = model.generate(ids, mask, max_new_tokens=NEW).sequences
    seen = []
    streamed = model.generate(ids, mask, max_new_tokens=NEW, on_token=lambda token_b: seen.append(token_b.copy()))
    np.testing.assert_array_equal(streamed.sequences, whole)
    np.testing.assert_array_equal(np.stack(seen, axis=1), whole[:, prompt:])
    done_after = np.array([3, 5, 7])  # new tokens after which each row is done

    def stop(new_bn):
        return new_bn.shape[1] >= done_after

    unpadded = model.generate(ids, mask, max_new_tokens=NEW, stop=stop).sequences
    np.testing.assert_array_equal(unpadded, whole[:, :prompt + 7])
    eos = next(t for t in range(97) if t not in whole[:, prompt:])  # never produced: only `stop` ends rows
    padded = model.generate(ids, mask, max_new_tokens=NEW, stop=stop, eos_token_id=eos, pad_token_id=0).sequences
    want = whole[:, :prompt + 7].copy()
    for row, n in enumerate(done_after):
        want[row, prompt + n:] = 0
    np.testing.assert_array_equal(padded, want)


@pytest.mark.parametrize("chunk", [8, pytest.param(16, marks=pytest.mark.slow)])
def test_ssd_step_continues_chunked(chunk):
    rng = np.random.default_rng(0)
    b, t, h, p, g, n = 2, 21, 4, 6, 2, 5
    x = rng.normal(size=(b, t + 1, h, p)).astype(np.float32)
    dt = rng.uniform(0.05, 0.6, (b, t + 1, h)).astype(np.float32)
    a = -rng.uniform(0.5, 2.0, h).astype(np.float32)
    bm, cm = (rng.normal(size=(b, t + 1, g, n)).astype(np.float32) for _ in range(2))
    chunked = jax.jit(ssd_chunked, static_argnums=5)  # compiled whole, as the model runs it
    y_all, state_all = chunked(x, dt, a, bm, cm, chunk)
    _, state_t = chunked(x[:, :t], dt[:, :t], a, bm[:, :t], cm[:, :t], chunk)
    y_next, state_next = jax.jit(ssd_step)(jnp.asarray(x[:, t]), jnp.asarray(dt[:, t]), a, jnp.asarray(bm[:, t]),
                                           jnp.asarray(cm[:, t]), state_t)
    np.testing.assert_allclose(np.asarray(y_next), np.asarray(y_all)[:, t], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state_next), np.asarray(state_all), atol=1e-5, rtol=1e-5)


def numpy_allowed(logits, temperature, top_k, top_p):
    """The tokens sampling may pick, written independently: after dividing by the temperature, the top_k highest
    scores (ties with the k-th kept), then the fewest most probable of those whose probability reaches top_p (ties
    with the last kept)."""
    scores = logits.astype(np.float64) / temperature
    keep = np.ones(scores.shape, bool)
    for row, s in enumerate(scores):
        if top_k is not None:
            keep[row] = s >= np.sort(s)[::-1][top_k - 1]
        if top_p is not None:
            p = np.where(keep[row], np.exp(s - s[keep[row]].max()), 0)
            p /= p.sum()
            total, threshold = 0.0, None
            for value in np.sort(p[keep[row]])[::-1]:
                threshold = value
                total += value
                if total >= top_p:
                    break
            keep[row] &= p >= threshold
    return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.9), (1.3, 12, 0.5),
                                                     (1.0, None, 0.3), (2.0, 40, 0.95), (0.5, 1, None)])
def test_sampler_keeps_what_numpy_keeps(temperature, top_k, top_p):
    logits = np.random.default_rng(7).normal(0, 3, (16, 97)).astype(np.float32)
    logits[3, 10:14] = logits[3].max()  # a tie at the top: all four kept together
    ours = np.asarray(Sampler(True, temperature, top_k, top_p).allowed(jnp.asarray(logits)))
    want = numpy_allowed(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(ours, want)
    assert ours.sum(axis=1).min() >= 1
    # Sampled tokens come from the allowed set only.
    for step in range(20):
        picked = np.asarray(Sampler(True, temperature, top_k, top_p)(jnp.asarray(logits), jax.random.key(step)))
        assert want[np.arange(len(logits)), picked].all()


@pytest.mark.parametrize("checkpoint", QUICK_ARCHS, indirect=True)
def test_sampling_is_reproducible(checkpoint):
    _, model = checkpoint
    ids, mask = prompts(2)
    options = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=30, top_p=0.95)
    first = model.generate(ids, mask, seed=11, **options).sequences
    np.testing.assert_array_equal(first, model.generate(ids, mask, seed=11, **options).sequences)
    assert not np.array_equal(first, model.generate(ids, mask, seed=12, **options).sequences)


@pytest.mark.parametrize("change,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),
    (dict(mask_right=True), "padded on the right"),
    (dict(empty_row=True), "has no tokens"),
    (dict(bad_id=True), "outside the model's vocabulary"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in"),
    (dict(do_sample=True, top_k=0), "top_k must be >= 1"),
])
def test_bad_generate_input(checkpoint, change, message):
    _, model = checkpoint
    ids, mask = prompts()
    change = dict(change)
    if change.pop("mask_right", False):
        mask = mask[:, ::-1].copy()
    if change.pop("empty_row", False):
        mask[1] = 0
    if change.pop("bad_id", False):
        ids[0, -1] = 500
    options = dict(max_new_tokens=4) | change
    with pytest.raises(DataError, match=message):
        model.generate(ids, mask, **options)


def test_prompt_beyond_max_positions(tmp_path):
    reference, path = make_checkpoint("qwen3_moe", tmp_path, max_position_embeddings=32)
    model = moejax.from_pretrained(path)
    ids = np.ones((1, 30), np.int64)
    with pytest.raises(DataError, match="exceeds the model's 32 positions"):
        model.generate(ids, max_new_tokens=4)
    assert model.generate(ids, max_new_tokens=2).sequences.shape == (1, 32)


def test_token_comparison_refuses_real_differences():
    """The comparison itself: a different token is accepted only where the reference's two best logits tie."""
    ref = np.array([[5, 6, 1, 2, 3], [5, 6, 4, 4, 4]])
    scores = np.zeros((2, 3, 10))
    scores[0, :, [1, 2, 3]] = 4.0
    scores[1, 0, 4], scores[1, 0, 7] = 3.0, 3.0 - ARGMAX_TIE / 2  # a tie between 4 and 7 at row 1's first step
    scores[1, 1:, 4] = 3.0
    assert assert_same_tokens(ref, scores, ref.copy(), 2) == [0, 1]
    tied = ref.copy()
    tied[1, 2:] = [7, 9, 9]  # differs from the tie on: accepted, the row is no longer compared
    assert assert_same_tokens(ref, scores, tied, 2) == [0]
    for row, step, token in [(0, 0, 8), (0, 2, 9), (1, 1, 7)]:
        wrong = ref.copy()
        wrong[row, 2 + step] = token
        with pytest.raises(AssertionError, match=f"row {row}, new token {step}"):
            assert_same_tokens(ref, scores, wrong, 2)
    with pytest.raises(AssertionError):
        assert_same_tokens(ref, scores, np.concatenate([ref, ref[:, -1:]], axis=1), 2)
    prompt_changed = ref.copy()
    prompt_changed[0, 0] = 9
    with pytest.raises(AssertionError):
        assert_same_tokens(ref, scores, prompt_changed, 2)
