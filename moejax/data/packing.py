"""Sequences of different lengths into rows of one width: each sequence a segment of its own (segment ids 1, 2, ...
along a row, 0 for padding) that the models run as if it were alone, so a whole corpus compiles one shape and rows
come out nearly full. Used by the routing analysis and the evaluation backend."""

from __future__ import annotations

import dataclasses
import itertools

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


def passes(layout: Layout, batch_size: int):
    """The layout's rows in forward passes of batch_size rows -> (rows of the pass, the pass's row count): the last
    pass takes the next power of two of the rows left (one shape more, at most), not a whole batch of empty rows."""
    for start in range(0, len(layout.rows), batch_size):
        rows = layout.rows[start:start + batch_size]
        yield rows, min(batch_size, 1 << (len(rows) - 1).bit_length())
