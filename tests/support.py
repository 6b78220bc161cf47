"""Shared pieces of the parity tests (importable from any test folder: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moejax.parity.fixtures import run_reference

# The two architectures of the heavy checks: both in the full suite, Qwen3-MoE alone in the quick loop.
QUICK_ARCHS = ("qwen3_moe", pytest.param("nemotron_h", marks=pytest.mark.slow))
LOGITS_TOL, ROUTER_TOL = 1e-4, 1e-5


def log_softmax(logits):
    """log softmax over the last axis, in float64 (numpy)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], seq: int, side: str):
    """Token ids [b, seq] and mask, each row `lengths[i]` real tokens padded on `side` with id 0."""
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, n in enumerate(lengths):
        cols = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[row, cols] = rng.integers(1, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def assert_parity(model, reference, ids, mask, logits_tol=LOGITS_TOL, router_tol=ROUTER_TOL):
    """Content tokens only: logits and raw router logits within tolerance, chosen expert sets identical."""
    ref_logits, ref_routers, ref_ids = run_reference(reference, ids, mask)
    out = model(ids, mask, return_router_logits=True)
    content = mask.astype(bool)
    diff = np.abs(np.asarray(out.logits) - ref_logits)[content].max()
    assert diff <= logits_tol, f"logits differ by {diff}"
    assert len(out.router_logits) == len(ref_routers) == len(ref_ids) > 0
    for layer, (ours, ref, ours_ids, want_ids) in enumerate(
            zip(out.router_logits, ref_routers, out.router_expert_ids, ref_ids, strict=True)):
        assert np.asarray(ours).dtype == np.float32
        diff = np.abs(np.asarray(ours) - ref)[content].max()
        assert diff <= router_tol, f"MoE layer {layer}: router logits differ by {diff}"
        np.testing.assert_array_equal(np.sort(np.asarray(ours_ids), axis=-1)[content], want_ids[content],
                                      err_msg=f"MoE layer {layer}: selected experts differ")


def tie_forcing(model, run_a, run_b) -> tuple[dict, int]:
    """Two collect(keep_routing=True) runs of the same chunks (a: the reference computation, b: another order of
    summation): asserts that every token whose expert set (or first expert) differs is a proven near tie on a's
    selection scores (moejax.parity.ties), and returns ({chunk: (mask [L, n], a's experts [L, n, k])}, flips):
    forced into b's computation, a's choices at those tokens make the two runs comparable like for like."""
    from moejax.parity.ties import OTHER, classify_flips, router_rules

    rules = router_rules(model)
    forced, flips = {}, 0
    for chunk, (a, b) in enumerate(zip(run_a.routing, run_b.routing, strict=True)):
        mask = np.zeros(a.expert_ids.shape[:2], bool)
        for layer, rule in enumerate(rules):
            sets = classify_flips(rule, a.router_logits[layer], a.expert_ids[layer], b.router_logits[layer],
                                  b.expert_ids[layer])
            first = classify_flips(dataclasses.replace(rule, k=1), a.router_logits[layer], a.expert_ids[layer][:, :1],
                                   b.router_logits[layer], b.expert_ids[layer][:, :1])
            for found in (sets, first):
                assert not (found.kind == OTHER).any(), (
                    f"chunk {chunk}, MoE layer {layer}: tokens {found.token[found.kind == OTHER]} route differently "
                    "and are not near ties")
                mask[layer, found.token] = True
        if mask.any():
            forced[chunk] = (mask, np.where(mask[..., None], a.expert_ids, 0))
            flips += int(mask.sum())
    return forced, flips


def assert_same_statistics(run_a, run_b, rtol: float = 1e-5) -> None:
    """Two LangRuns of the same chunks: counts identical, float sums within rtol."""
    for name in ("topk_counts", "top1_counts", "tokens", "pairs"):
        np.testing.assert_array_equal(getattr(run_a, name), getattr(run_b, name), err_msg=name)
    for name in ("prob_sums", "entropy_sums_bits", "pair_jaccard_sums"):
        np.testing.assert_allclose(getattr(run_a, name), getattr(run_b, name), rtol=rtol, atol=1e-6, err_msg=name)


def forward_up_to_ties(reference, other, ids, mask):
    """Both models' forward passes on the same tokens, with `other` run again where its routing differs from
    `reference`'s: every such token must be a proven near tie (on reference's scores), and reference's experts are
    forced there. Returns (reference's output, other's output, tokens forced) so that the outputs compare like for
    like at every token."""
    from moejax.models.common import ForcedRouting
    from moejax.parity.ties import OTHER, classify_flips, router_rules

    want = reference(ids, mask, return_router_logits=True)
    got = other(ids, mask, return_router_logits=True)
    content = np.asarray(mask, bool)
    expert_ids = np.stack([np.asarray(e) for e in want.router_expert_ids])
    forced = ForcedRouting(np.zeros_like(expert_ids), np.zeros(expert_ids.shape[:-1], bool))
    for layer, rule in enumerate(router_rules(reference)):
        flips = classify_flips(rule, np.asarray(want.router_logits[layer])[content], expert_ids[layer][content],
                               np.asarray(got.router_logits[layer])[content],
                               np.asarray(got.router_expert_ids[layer])[content])
        assert not (flips.kind == OTHER).any(), f"MoE layer {layer}: routing differs beyond a near tie"
        rows, cols = (where[flips.token] for where in np.nonzero(content))
        forced.mask[layer, rows, cols] = True
        forced.expert_ids[layer, rows, cols] = expert_ids[layer, rows, cols]
    if forced.mask.any():
        got = other(ids, mask, return_router_logits=True, forced_routing=forced)
    return want, got, int(forced.mask.sum())


def assert_forward_equals(reference, other, ids, mask, bound: float = 1e-5):
    """forward_up_to_ties, then: logits and every MoE layer's router logits within `bound` at the unpadded tokens,
    the chosen experts identical."""
    want, got, _ = forward_up_to_ties(reference, other, ids, mask)
    content = np.asarray(mask, bool)
    assert np.abs(np.asarray(got.logits) - np.asarray(want.logits))[content].max() <= bound
    for layer, (a, b) in enumerate(zip(got.router_logits, want.router_logits, strict=True)):
        assert np.abs(np.asarray(a) - np.asarray(b))[content].max() <= bound, f"MoE layer {layer}"
    for layer, (a, b) in enumerate(zip(got.router_expert_ids, want.router_expert_ids, strict=True)):
        np.testing.assert_array_equal(np.asarray(a)[content], np.asarray(b)[content], err_msg=f"MoE layer {layer}")
