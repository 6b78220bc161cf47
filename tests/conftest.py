"""Shared pieces of the parity tests."""

from __future__ import annotations

import os

import numpy as np

from moejax.reference import run_reference

LOGITS_TOL, ROUTER_TOL = 1e-4, 1e-5

# The commands the tests run in-process keep no XLA compilation cache in the user's home.
os.environ["MOEJAX_COMPILATION_CACHE"] = ""


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
