"""The collapse summary's bootstrap confidence interval over chunks (moejax.routing.analysis.collapse_intervals)."""

from __future__ import annotations

import numpy as np

from moejax.routing import metrics as M
from moejax.routing.analysis import LangRun, collapse_intervals, layer_metrics


def run_of(counts_cle: np.ndarray, k: int) -> LangRun:
    c, layers, _ = counts_cle.shape
    tokens = counts_cle[:, 0].sum(-1) // k
    return LangRun(topk_counts=counts_cle, top1_counts=counts_cle // k, prob_sums=np.zeros(counts_cle.shape),
                   entropy_sums_bits=np.zeros((c, layers)), tokens=tokens, pair_jaccard_sums=np.zeros((c, layers)),
                   pairs=np.zeros(c), tokenization={})


def collapsing(chunks: int, rng, k: int = 2, layers: int = 8, experts: int = 16) -> np.ndarray:
    """Chunks from a population whose deep layers (the last quarter) route to few experts (a collapse), each chunk
    varying around it (a Dirichlet draw about the population's distribution, then its tokens)."""
    mid = np.full(experts, 1.0 / experts)
    deep = 0.6 ** np.arange(experts)
    deep /= deep.sum()
    counts = np.zeros((chunks, layers, experts), np.int64)
    for c in range(chunks):
        for layer in range(layers):
            p = mid if layer < layers * 3 // 4 else deep
            counts[c, layer] = rng.multinomial(40 * k, rng.dirichlet(30 * p + 1e-3))
    return counts


def point(run: LangRun, k: int) -> dict[str, float]:
    per_layer = layer_metrics(run, k)
    return {name: M.collapse_summary(per_layer[name]) for name in ("usage_entropy_bits", "gini")}


def test_identical_chunks_give_a_point_interval():
    counts = np.repeat(collapsing(1, np.random.default_rng(0)), 30, axis=0)
    run = run_of(counts, 2)
    ci, value = collapse_intervals(run, 2, seed=0, draws=200), point(run, 2)
    for name in ci:
        np.testing.assert_allclose(ci[name], [value[name], value[name]], rtol=0, atol=1e-12)


def test_interval_holds_the_estimate_and_narrows_with_more_chunks():
    """(Gini's interval is bias-corrected too, and the plug-in Gini of few tokens is biased low for a collapse, so
    its interval may lie above its own estimate; entropy's holds it here.)"""
    rng = np.random.default_rng(1)
    small, large = run_of(collapsing(20, rng), 2), run_of(collapsing(320, rng), 2)
    ci_small, ci_large = collapse_intervals(small, 2, seed=0), collapse_intervals(large, 2, seed=0)
    low, high = ci_small["usage_entropy_bits"]
    assert low <= point(small, 2)["usage_entropy_bits"] <= high
    for name, (low, high) in ci_small.items():
        width_small, width_large = high - low, ci_large[name][1] - ci_large[name][0]
        assert 0 < width_large < 0.5 * width_small  # 16x the chunks: about a quarter the width
    assert ci_large["usage_entropy_bits"][1] < 0 < ci_large["gini"][0]  # a real collapse is told apart from none
    assert collapse_intervals(small, 2, seed=0) == ci_small  # seeded: the same interval again


def test_interval_covers_the_population_value():
    """Coverage over repeated samples from one population: the 95% interval holds the population's collapse in
    most of them (a wrong interval, e.g. one from a single chunk's spread, fails this)."""
    rng = np.random.default_rng(2)
    population = run_of(collapsing(4000, rng), 2)
    truth = point(population, 2)["usage_entropy_bits"]
    hits = 0
    for trial in range(40):
        picked = rng.choice(4000, 60, replace=False)
        sample = run_of(population.topk_counts[picked], 2)
        low, high = collapse_intervals(sample, 2, seed=trial, draws=300)["usage_entropy_bits"]
        hits += low <= truth <= high
    assert hits >= 32, hits  # nominal 95%: at least 80% of 40 trials
