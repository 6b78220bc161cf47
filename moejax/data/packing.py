"""Sequences of different lengths into rows of one width: each sequence a segment of its own (segment ids 1, 2, ...
along a row, 0 for padding) that the models run as if it were alone, so a whole corpus compiles one shape and rows
come out nearly full. Used by the routing analysis and the evaluation backend."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# Powers of two and 1.5x powers of two: padding stays under a third of a sequence (~15% on average)
# while a corpus compiles at most a dozen shapes.
BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)

# Packed rows hold at least this many tokens, so that short sequences (sentences, paragraphs of a few hundred tokens)
# share rows: measured on the analysis benchmark (250-500-token chunks), rows of 1024 come out ~90% full against
# ~70% for rows fitted to the longest chunk, while attention (the only cost that grows with the row) stays small.
MIN_ROW = 1024


def bucket(length: int) -> int:
    """The smallest bucket holding `length` tokens (multiples of the largest beyond it)."""
    for size in BUCKETS:
        if length <= size:
            return size
    return -(-length // BUCKETS[-1]) * BUCKETS[-1]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each sequence sits: rows of `width` tokens, each holding sequences [(index, start), ...] back to back;
    `slots` segment slots per row (a power of two at least the fullest row's sequence count)."""

    rows: list[list[tuple[int, int]]]
    width: int
    slots: int


def pack(lengths: list[int], min_row: int = MIN_ROW) -> Layout:
    """Sequences into rows of one width (the bucket of the longest, at least min_row), first fit in decreasing
    order of length: so a corpus compiles one shape, and rows come out nearly full."""
    width = bucket(max(max(lengths), min_row))
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append((i, width - free[row]))
        free[row] -= lengths[i]
    return Layout(rows, width, 1 << (max(len(r) for r in rows) - 1).bit_length())


def one_per_row(lengths: list[int]) -> list[Layout]:
    """Unpacked: each sequence alone in a row padded to its length bucket, one layout per bucket."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [Layout([[(i, 0)] for i in members], width, 1)
            for width, members in itertools.groupby(order, key=lambda i: bucket(lengths[i]))]


def passes(rows: list, batch_size: int):
    """Rows (a layout's, or anything run a row each) in forward passes of batch_size rows -> (rows of the pass, the
    pass's row count): the last pass takes the next power of two of the rows left (one shape more, at most), not a
    whole batch of empty rows."""
    for start in range(0, len(rows), batch_size):
        taken = rows[start:start + batch_size]
        yield taken, min(batch_size, 1 << (len(taken) - 1).bit_length())


def segment_positions(segment_ids_bt: np.ndarray) -> np.ndarray:
    """[b, t] int32: each token's position within its segment (a run of equal segment ids), from 0."""
    segment_ids_bt = np.asarray(segment_ids_bt)
    columns_t = np.arange(segment_ids_bt.shape[1])
    starts_bt = np.ones(segment_ids_bt.shape, bool)
    starts_bt[:, 1:] = segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]
    first_bt = np.maximum.accumulate(np.where(starts_bt, columns_t, 0), axis=1)
    return (columns_t - first_bt).astype(np.int32)


def positions(segment_ids_bt, position_ids_bt=None, *, packed: bool = True) -> np.ndarray:
    """The position ids [b, t] int32 of a forward pass, derived one way for every entry point (model(...), training,
    the routing statistics, lm-eval scoring): the given ones; else, for packed rows (segment ids numbering the
    documents of a row), each token's position within its document; else (transformers' 0/1 attention mask)
    0, 1, ... along the row, padding included, as transformers' forward numbers them."""
    segment_ids_bt = np.asarray(segment_ids_bt)
    if position_ids_bt is not None:
        return np.asarray(position_ids_bt, np.int32)
    if packed:
        return segment_positions(segment_ids_bt)
    return np.broadcast_to(np.arange(segment_ids_bt.shape[1], dtype=np.int32), segment_ids_bt.shape)
