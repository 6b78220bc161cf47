"""Shared pieces of the parity tests."""

from __future__ import annotations

import numpy as np
import torch


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], seq: int, side: str):
    """Token ids [b, seq] and mask, each row `lengths[i]` real tokens padded on `side` with id 0."""
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, n in enumerate(lengths):
        cols = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[row, cols] = rng.integers(1, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def reference_topk(router_logits: np.ndarray, k: int) -> np.ndarray:
    """The experts transformers selects from its router logits: top-k of the float32 softmax."""
    probs = torch.softmax(torch.from_numpy(router_logits).float(), dim=-1)
    return torch.topk(probs, k, dim=-1).indices.numpy()
