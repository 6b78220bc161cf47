"""Paper b's divergence-score correlation and paper c's language-level metrics (moejax.routing.metrics,
moejax.routing.languages), each against an independent computation on small arrays: values worked out by hand
(written as fractions and logarithms below), the mutual-information identity IG = H(L) + H(E) - H(L, E) for
IG(L;E), and scipy's own Jensen-Shannon distance. Bounds: 1e-12 absolute (float64 sums of a few terms). Wrong
inputs on purpose: identical languages, disjoint experts, relabelled languages, constant scores, too few points.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.spatial import distance
from scipy.stats import entropy

from moejax.routing import metrics as M
from moejax.routing.analysis import LangRun, ModelRun
from moejax.routing.languages import Scores, add_language_tables, divergence_from_reference

TOL = 1e-12


def test_jsd_matrix_by_hand_and_against_scipy():
    dist_ge = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    jsd_gg = M.jsd_matrix(dist_ge)
    # m = (0.75, 0.25): KL((.5,.5) || m) = .5 ln(2/3) + .5 ln 2, KL((1,0) || m) = ln(4/3)
    by_hand = (0.5 * math.log(2 / 3) + 0.5 * math.log(2) + math.log(4 / 3)) / 2
    assert jsd_gg[0, 1] == pytest.approx(math.log(2), abs=TOL)  # disjoint supports: the maximum, ln 2
    assert jsd_gg[0, 2] == pytest.approx(by_hand, abs=TOL) and jsd_gg[2, 1] == pytest.approx(by_hand, abs=TOL)
    rng = np.random.default_rng(0)
    dist_ge = rng.dirichlet(np.full(16, 0.3), size=5)
    jsd_gg = M.jsd_matrix(dist_ge)
    for a, b in itertools.product(range(5), repeat=2):
        assert jsd_gg[a, b] == pytest.approx(distance.jensenshannon(dist_ge[a], dist_ge[b]) ** 2, abs=TOL)
    assert np.all(np.diag(jsd_gg) == 0) and np.array_equal(jsd_gg, jsd_gg.T)
    assert np.all((jsd_gg >= 0) & (jsd_gg <= math.log(2) + TOL))


def mutual_information_share(counts_ge):
    """IG / H(L) by the identity I(L;E) = H(L) + H(E) - H(L,E), in bits, from the joint of the pooled counts."""
    joint = np.asarray(counts_ge, float) / np.sum(counts_ge)
    h_l, h_e, h_le = (entropy(p[p > 0], base=2) for p in (joint.sum(1), joint.sum(0), joint.ravel()))
    return (h_l + h_e - h_le) / h_l


def test_information_gain_by_hand():
    # two languages of equal size: H(L) = 1 bit; experts 0 and 2 each serve one language, expert 1 both, and each
    # takes a third of the assignments: H(L|E) = 1/3 bit
    assert M.language_information_gain([[4, 2, 0], [0, 2, 4]]) == pytest.approx(2 / 3, abs=TOL)
    # unequal sizes (8 and 4 assignments): H(L) = H(2/3, 1/3); only expert 1 (a third of the assignments) is mixed
    h = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert M.language_information_gain([[6, 2, 0], [0, 2, 2]]) == pytest.approx((h - 1 / 3) / h, abs=TOL)
    # languages weighted equally: p(g, e) = f_ge / 2 = [[.375, .125, 0], [0, .25, .25]]; H(L) = 1 bit, and expert 1
    # (p .375) splits 1/3 : 2/3
    uniform = 1 - 0.375 * h
    assert M.language_information_gain([[6, 2, 0], [0, 2, 2]], "uniform") == pytest.approx(uniform, abs=TOL)
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts_ge = rng.integers(0, 30, size=(rng.integers(2, 6), rng.integers(2, 12)))
        counts_ge[:, 0] += 1  # every language has tokens
        assert M.language_information_gain(counts_ge) == pytest.approx(mutual_information_share(counts_ge), abs=1e-9)


def test_information_gain_extremes_and_relabelling():
    counts_ge = np.array([[5, 2, 3, 0], [10, 4, 6, 0]])  # the same usage, one language twice the tokens
    for weighting in ("tokens", "uniform"):
        assert M.language_information_gain(counts_ge, weighting) == pytest.approx(0, abs=TOL)
        assert M.language_information_gain([[7, 1, 0, 0], [0, 0, 2, 9], [0, 0, 0, 0]], weighting) == pytest.approx(1)
        assert M.language_information_gain([[3, 4, 5]], weighting) == 0  # one language: nothing to tell
    rng = np.random.default_rng(2)
    counts_ge = rng.integers(0, 50, size=(4, 10))
    for weighting in ("tokens", "uniform"):
        value = M.language_information_gain(counts_ge, weighting)
        assert 0 < value < 1
        assert M.language_information_gain(counts_ge[rng.permutation(4)], weighting) == pytest.approx(value, abs=TOL)
        assert M.language_information_gain(counts_ge[:, rng.permutation(10)], weighting) == pytest.approx(value)
    with pytest.raises(ValueError, match="weighting"):
        M.language_information_gain(counts_ge, "languages")


def test_vocabulary_overlap_by_hand():
    # ids used: {0, 1} and {1, 2}: Jaccard 1/3; frequencies (.75, .25, 0) and (0, 2/7, 5/7): the smaller ones sum to .25
    jaccard, weighted = M.vocabulary_overlap([3, 1, 0, 0], [0, 2, 5, 0])
    assert jaccard == pytest.approx(1 / 3, abs=TOL) and weighted == pytest.approx(0.25, abs=TOL)
    assert M.vocabulary_overlap([0, 2, 5, 0], [3, 1, 0, 0]) == (jaccard, weighted)
    assert M.vocabulary_overlap([1, 2, 3], [10, 20, 30]) == pytest.approx((1, 1), abs=TOL)  # same text, more of it
    assert M.vocabulary_overlap([1, 2, 0, 0], [0, 0, 3, 4]) == (0, 0)
    assert M.vocabulary_overlap([0, 0, 0], [1, 2, 0]) == (0, 0)  # a language with no tokens


def test_correlation_by_hand():
    # deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / 2; with n = 3 the t statistic has one degree of freedom (a
    # Cauchy law), so p = 1 - 2 atan(t) / pi with t = r / sqrt(1 - r^2) = tan(pi / 6): p = 2 / 3
    fit = M.correlation([1, 2, 3], [1, 3, 2])
    assert fit["n"] == 3
    assert fit["pearson_r"] == pytest.approx(0.5, abs=TOL) and fit["pearson_p"] == pytest.approx(2 / 3, abs=1e-9)
    assert fit["spearman_rho"] == pytest.approx(0.5, abs=TOL) and fit["spearman_p"] == pytest.approx(2 / 3, abs=1e-9)
    fit = M.correlation([0.1, 0.4, 0.2, 0.3], [0.9, 0.3, 0.7, 0.5])  # y = 1.1 - 2x: exactly -1
    assert fit["pearson_r"] == pytest.approx(-1, abs=TOL) and fit["spearman_rho"] == pytest.approx(-1, abs=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy ConstantInputWarning: a constant side is caught first
        for x, y in (([1, 2], [2, 1]), ([1, 2, 3], [5, 5, 5]), ([4, 4, 4, 4], [1, 2, 3, 4])):
            fit = M.correlation(x, y)
            assert fit["n"] == len(x) and all(math.isnan(fit[k]) for k in fit if k != "n"), (x, y)


def lang_run(counts_cle, mean_prob_cle):
    """A LangRun from per-chunk top-K counts and mean routing probabilities [C, L, E] (tokens: the first layer's
    counts / K with K = 2)."""
    chunks, layers, _ = counts_cle.shape
    tokens_c = counts_cle[:, 0].sum(-1) // 2
    return LangRun(topk_counts=counts_cle, top1_counts=counts_cle // 2,
                   prob_sums=mean_prob_cle * tokens_c[:, None, None], entropy_sums_bits=np.ones((chunks, layers)),
                   tokens=tokens_c, pair_jaccard_sums=np.zeros(layers), pairs=np.zeros(1), tokenization={})


def synthetic(langs, chunks, seed=3, layers=3, experts=6):
    """A ModelRun whose languages have different numbers of chunks (no alignment), its pairs rows, vocabularies."""
    rng = np.random.default_rng(seed)
    runs = {}
    for lang, n in zip(langs, chunks, strict=True):
        counts = 2 * rng.integers(0, 6, size=(n, layers, experts))
        counts[:, :, 0] += 4  # every chunk has tokens
        runs[lang] = lang_run(counts, rng.dirichlet(np.ones(experts), size=(n, layers)))
    run = ModelRun(name="m", path="p", model_type="qwen3_moe", moe_blocks=tuple(range(layers)), k=2,
                   experts=experts, excluded_ids=[], langs=runs)
    pairs = [{"model": "m", "layer": layer, "block": layer, "lang_a": a, "lang_b": b, "njsd": rng.uniform()}
             for a, b in itertools.combinations(langs, 2) for layer in range(layers)]
    vocab = {lang: rng.integers(0, 3, size=40) for lang in langs}
    return run, pairs, vocab


def test_language_tables_from_unaligned_languages_against_hand_computation():
    """Languages with 2, 5 and 3 chunks (not a parallel corpus): every value from per-language totals only."""
    langs = ["en", "he", "ja"]
    run, pairs, vocab = synthetic(langs, (2, 5, 3))
    tables = {"reference": "en", "pairs": pairs}
    add_language_tables(tables, [run], [vocab], [])
    assert "divergence_scores" not in tables and len(tables["languages"]) == 3
    for row in tables["languages"]:
        layer = row["layer"]
        counts_ge = np.stack([run.langs[lang].topk_counts[:, layer].sum(0) for lang in langs])
        assert row["ig_norm"] == pytest.approx(mutual_information_share(counts_ge), abs=1e-9)
        f_ge = counts_ge / counts_ge.sum(1, keepdims=True)
        jsd = {(a, b): distance.jensenshannon(f_ge[i], f_ge[j]) ** 2
               for (i, a), (j, b) in itertools.combinations(enumerate(langs), 2)}
        assert row["mean_jsd"] == pytest.approx(np.mean(list(jsd.values())), abs=TOL)
        assert row["mean_jsd_no_reference"] == pytest.approx(jsd["he", "ja"], abs=TOL)
        overlap = {pair: M.vocabulary_overlap(vocab[pair[0]], vocab[pair[1]])[0] for pair in jsd}
        assert row["vocab_pairs"] == 3
        assert row["vocab_jsd_pearson_r"] == pytest.approx(np.corrcoef(list(overlap.values()),
                                                                       list(jsd.values()))[0, 1], abs=1e-9)
        # jsd_pbar: each chunk's mean probabilities, averaged over the language's chunks (chunks weigh the same)
        importance = {lang: np.mean([r.prob_sums[c, layer] / r.tokens[c] for c in range(len(r.tokens))], axis=0)
                      for lang, r in run.langs.items()}
        for pair_row in (r for r in pairs if r["layer"] == layer):
            pair = pair_row["lang_a"], pair_row["lang_b"]
            assert pair_row["jsd"] == pytest.approx(jsd[pair], abs=TOL)
            assert pair_row["jsd_pbar"] == pytest.approx(
                distance.jensenshannon(importance[pair[0]], importance[pair[1]]) ** 2, abs=TOL)
            assert pair_row["vocab_jaccard"] == overlap[pair]


def test_divergence_score_correlation_of_an_unaligned_corpus():
    """Without parallel text the divergence is the pairs table's njsd_pooled (build_tables names the column); the
    scores file may name a language by another code (jpn_Jpan for ja); the reference's own score is not used."""
    langs = ["en", "he", "ja", "ar"]
    run, pairs, vocab = synthetic(langs, (4, 2, 3, 5))
    for row in pairs:
        row["njsd_pooled"] = row.pop("njsd")
    scores = Scores(path="s.csv", label=None, what="acc", by_lang={"en": 0.9, "he": 0.6, "jpn_Jpan": 0.2, "ar": 0.5})
    tables = {"reference": "en", "pairs": pairs, "divergence": "njsd_pooled"}
    add_language_tables(tables, [run], [vocab], [scores])
    assert tables["scores"] == {"m": {"file": "s.csv", "score": "acc", "divergence": "njsd_pooled",
                                      "values": {"en": 0.9, "he": 0.6, "ja": 0.2, "ar": 0.5}}}
    assert [r["layer"] for r in tables["divergence_scores"]] == [0, 1, 2]
    for row in tables["divergence_scores"]:
        divergence = [next(p["njsd_pooled"] for p in pairs if p["layer"] == row["layer"] and p["lang_a"] == "en"
                           and p["lang_b"] == lang) for lang in ("he", "ja", "ar")]
        assert row["langs"] == "he ja ar" and row["n"] == 3
        assert row["pearson_r"] == pytest.approx(np.corrcoef(divergence, [0.6, 0.2, 0.5])[0, 1], abs=1e-12)


def test_relabelled_languages_change_nothing():
    """The same languages listed in another order give the same value for every language pair and layer."""
    run, pairs, vocab = synthetic(["en", "he", "ja", "ar"], (3, 4, 2, 5))
    tables = {"reference": "en", "pairs": pairs}
    add_language_tables(tables, [run], [vocab], [])
    order = ["ja", "ar", "en", "he"]
    shuffled = ModelRun(**{**run.__dict__, "langs": {lang: run.langs[lang] for lang in order}})
    shuffled_pairs = [{**r, "lang_a": a, "lang_b": b} for r in pairs for a, b in itertools.combinations(order, 2)
                      if {a, b} == {r["lang_a"], r["lang_b"]}]
    other = {"reference": "en", "pairs": [{k: v for k, v in r.items() if k in ("model", "layer", "block", "lang_a",
                                                                                 "lang_b", "njsd")}
                                          for r in shuffled_pairs]}
    add_language_tables(other, [shuffled], [vocab], [])
    for first, second in zip(tables["languages"], other["languages"], strict=True):
        for key in first:
            assert first[key] == pytest.approx(second[key], abs=1e-12), key
    by_pair = {(r["layer"], frozenset((r["lang_a"], r["lang_b"]))): r for r in other["pairs"]}
    for row in pairs:
        twin = by_pair[row["layer"], frozenset((row["lang_a"], row["lang_b"]))]
        for key in ("jsd", "jsd_pbar", "vocab_jaccard", "vocab_weighted"):
            assert row[key] == pytest.approx(twin[key], abs=TOL), key


def test_divergence_from_reference_reads_either_order():
    rows = [{"model": "m", "layer": 0, "lang_a": "en", "lang_b": "he", "njsd": 0.2},
            {"model": "m", "layer": 0, "lang_a": "ja", "lang_b": "en", "njsd": 0.4},
            {"model": "m", "layer": 0, "lang_a": "he", "lang_b": "ja", "njsd": 0.9},
            {"model": "x", "layer": 0, "lang_a": "en", "lang_b": "he", "njsd": 0.7}]
    assert divergence_from_reference(rows, "m", "en") == {"he": {0: 0.2}, "ja": {0: 0.4}}
