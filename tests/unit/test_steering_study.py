"""experiments/steering.py's scoring of lm-eval samples: each (metric, filter) is a score of its own over the
documents, so MGSM's strict-match and flexible-extract are never averaged together nor tested as 2N items."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.steering import item_scores, mcnemar_exact, metric_filters, paired_row


def samples(strict: list[int], flexible: list[int]) -> list[dict]:
    """lm-eval's log: one sample per filter per document, interleaved as it writes them."""
    out = []
    for doc, (s, f) in enumerate(zip(strict, flexible, strict=True)):
        out += [{"doc_id": doc, "filter": "strict-match", "exact_match": s},
                {"doc_id": doc, "filter": "flexible-extract", "exact_match": f}]
    return out[::-1]  # not in document order


def test_filters_are_scored_apart():
    base = samples([0, 0, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1])
    steered = samples([1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1])
    results = {"exact_match,strict-match": 0.33, "exact_match_stderr,strict-match": 0.2,
               "exact_match,flexible-extract": 0.83, "exact_match_stderr,flexible-extract": 0.1, "alias": "mgsm_en"}
    pairs = metric_filters(results)
    assert pairs == [("exact_match", "strict-match"), ("exact_match", "flexible-extract")]
    rows = {name: paired_row("mgsm_en", metric, name, item_scores(base, metric, name),
                             item_scores(steered, metric, name)) for metric, name in pairs}
    assert rows["strict-match"]["items"] == rows["flexible-extract"]["items"] == 6  # not 12 pseudo-items
    strict = rows["strict-match"]
    assert strict["base"] == pytest.approx(2 / 6) and strict["steered"] == pytest.approx(5 / 6)
    assert rows["flexible-extract"]["difference"] == 0 and rows["flexible-extract"]["p_value"] == 1.0
    # McNemar on the strict filter's 6 items: 3 gained, 0 lost -> p = 2 * (1/2)^3.
    assert rows["strict-match"]["p_value"] == pytest.approx(mcnemar_exact(np.array([0, 0, 1, 0, 1, 0]),
                                                                         np.array([1, 1, 1, 1, 1, 0]))) == 0.25


def test_two_filters_without_naming_one_is_an_error():
    with pytest.raises(ValueError, match="12 samples for 6 documents"):
        item_scores(samples([0] * 6, [1] * 6), "exact_match")
    # A task with one filter ("none") needs no name.
    one = [{"doc_id": d, "filter": "none", "acc": d % 2} for d in range(4)]
    np.testing.assert_array_equal(item_scores(one, "acc"), [0, 1, 0, 1])
