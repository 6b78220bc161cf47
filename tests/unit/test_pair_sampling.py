"""Routing consistency's token pairs (paper b: 500 per sequence): distinct pairs of distinct tokens, drawn without
replacement, all of them when a chunk has fewer."""

from __future__ import annotations

import numpy as np

from moejax.routing.analysis import sample_pairs


def test_pairs_are_distinct_and_of_distinct_tokens():
    pairs = sample_pairs(200, 500, np.random.default_rng(0))
    assert pairs.shape == (500, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all() and (pairs >= 0).all() and (pairs < 200).all()
    assert len({tuple(p) for p in pairs}) == 500  # without replacement


def test_a_short_chunk_gives_every_pair_once():
    pairs = sample_pairs(10, 500, np.random.default_rng(1))
    real = pairs[pairs[:, 0] != pairs[:, 1]]
    assert len(real) == 45 == len({tuple(p) for p in real})  # 10 * 9 / 2
    assert (pairs[45:] == 0).all()  # the rest pair a token with itself: ignored by the statistics


def test_the_seed_decides():
    a, b = (sample_pairs(50, 100, np.random.default_rng(s)) for s in (3, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_pairs(50, 100, np.random.default_rng(4)))
