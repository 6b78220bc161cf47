"""Routing statistics and metrics against an independent recomputation from transformers' raw router logits.

The reference side takes the PyTorch model's router logits (output_router_logits) and the experts its
routers chose (forward hooks), and computes every quantity in float64 with numpy/scipy
(scipy.stats.entropy, scipy.spatial.distance.cosine/jensenshannon, a pairwise-difference Gini).
moejax's side reduces in the jitted forward (float32 sums over <= 40 tokens) and applies
moejax.routing.metrics. Bound: 1e-6 relative (float32 accumulation over a few dozen terms).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from scipy import stats as sps
from scipy.spatial import distance
from support import QUICK_ARCHS, padded_batch

import moejax
from moejax.parity.fixtures import make_checkpoint, run_reference
from moejax.routing import metrics as M
from moejax.routing.stats import chunk_stats

pytestmark = pytest.mark.torch

RTOL = 1e-6


def pairs_for(rng, lengths, seq, count=6):
    return np.stack([rng.integers(0, seq, (count, 2)) for _ in lengths])


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def routed(request, tmp_path_factory):
    arch = request.param
    reference, path = make_checkpoint(arch, tmp_path_factory.mktemp(arch), seed=21)
    overrides = {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}
    model = moejax.from_pretrained(path, **overrides)
    rng = np.random.default_rng(7)
    ids, mask = padded_batch(rng, 97, [17, 11, 14], 17, "right")
    content = mask.astype(bool).copy()
    content[:, 0] = False  # as if position 0 were a BOS token: it runs, but does not count
    pairs = pairs_for(rng, [17, 11, 14], 17)
    stats = chunk_stats(model, ids, mask, content, pairs)
    _, ref_logits, ref_ids = run_reference(reference, ids, mask)
    k = ref_ids[0].shape[-1]
    return dict(stats=stats, logits=ref_logits, ids=ref_ids, content=content, pairs=pairs, k=k, model=model,
                batch=(ids, mask))


def reference_arrays(routed):
    """Per sequence and layer, in float64 from the raw logits: counts, top-1, prob sums, entropy sums."""
    content = routed["content"]
    out = {"topk": [], "prob": [], "entropy": [], "jaccard": []}
    for logits, chosen in zip(routed["logits"], routed["ids"], strict=True):
        p = torch.softmax(torch.from_numpy(logits), -1).numpy()
        e = p.shape[-1]
        multi = np.zeros(p.shape)
        np.put_along_axis(multi, chosen, 1.0, axis=-1)
        out["topk"].append((multi * content[..., None]).sum(1))
        out["prob"].append((p * content[..., None]).sum(1))
        out["entropy"].append((sps.entropy(p, base=2, axis=-1) * content).sum(1))
        jac = []
        for b, pairs in enumerate(routed["pairs"]):
            total = 0.0
            for i, j in pairs:
                if i != j and content[b, i] and content[b, j]:
                    a, c = set(chosen[b, i]), set(chosen[b, j])
                    total += len(a & c) / len(a | c)
            jac.append(total)
        out["jaccard"].append(np.array(jac))
        assert e == routed["stats"].topk_counts.shape[-1]
    return {name: np.stack(v, axis=1) for name, v in out.items()}


def test_accumulators_match_reference(routed):
    stats, ref = routed["stats"], reference_arrays(routed)
    np.testing.assert_array_equal(np.asarray(stats.topk_counts), ref["topk"])
    np.testing.assert_array_equal(np.asarray(stats.tokens), routed["content"].sum(1))
    np.testing.assert_allclose(np.asarray(stats.prob_sums), ref["prob"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.asarray(stats.entropy_sums_bits), ref["entropy"], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(stats.pair_jaccard_sums), ref["jaccard"], rtol=RTOL)


def gini_pairwise(x):
    x = np.asarray(x, np.float64)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_metrics_match_scipy(routed):
    """Language A = sequences 0-1, language B = sequence 2; every metric from both sides."""
    stats, ref, k = routed["stats"], reference_arrays(routed), routed["k"]
    tokens = np.asarray(stats.tokens)
    a, b = [0, 1], [2]
    for layer in range(ref["topk"].shape[1]):
        counts_a = np.asarray(stats.topk_counts)[a, layer].sum(0)
        counts_b = np.asarray(stats.topk_counts)[b, layer].sum(0)
        ref_a, ref_b = ref["topk"][a, layer].sum(0), ref["topk"][b, layer].sum(0)
        f_a, f_b = M.usage_fractions(counts_a, k), M.usage_fractions(counts_b, k)
        rf_a, rf_b = ref_a / ref_a.sum(), ref_b / ref_b.sum()
        np.testing.assert_allclose(M.usage_entropy_bits(f_a), sps.entropy(rf_a, base=2), rtol=RTOL)
        np.testing.assert_allclose(M.usage_entropy_normalized(f_a),
                                   sps.entropy(rf_a, base=2) / np.log2(len(rf_a)), rtol=RTOL)
        np.testing.assert_allclose(M.gini(counts_a), gini_pairwise(ref_a), rtol=RTOL, atol=1e-12)
        assert M.active_experts(f_a) == (ref_a > 0).sum()
        sel = M.selection_entropy_bits(np.asarray(stats.entropy_sums_bits)[a, layer].sum(), tokens[a].sum())
        np.testing.assert_allclose(sel, ref["entropy"][a, layer].sum() / tokens[a].sum(), rtol=RTOL)
        pbar_a = M.mean_probabilities(np.asarray(stats.prob_sums)[a, layer].sum(0), tokens[a].sum())
        pbar_b = M.mean_probabilities(np.asarray(stats.prob_sums)[b, layer].sum(0), tokens[b].sum())
        rp_a, rp_b = ref["prob"][a, layer].sum(0) / tokens[a].sum(), ref["prob"][b, layer].sum(0) / tokens[b].sum()
        # LSI is a difference quotient: near 0 it inherits the ~1e-7 absolute error of the two means, so
        # its bound is 1e-6 of its [-1, 1] range rather than of its value.
        np.testing.assert_allclose(M.lsi(pbar_a, pbar_b), (rp_a - rp_b) / (rp_a + rp_b), rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(M.cosine(f_a, f_b), 1 - distance.cosine(rf_a, rf_b), rtol=RTOL)
        np.testing.assert_allclose(M.spearman(f_a, f_b), sps.spearmanr(rf_a, rf_b).statistic, rtol=RTOL)
        np.testing.assert_allclose(M.kendall_tau_b(f_a, f_b), sps.kendalltau(rf_a, rf_b).statistic, rtol=RTOL)
        p_seq = M.mean_probabilities(np.asarray(stats.prob_sums)[[0], layer], tokens[[0]])
        q_seq = M.mean_probabilities(np.asarray(stats.prob_sums)[[2], layer], tokens[[2]])
        rp, rq = ref["prob"][0, layer] / tokens[0], ref["prob"][2, layer] / tokens[2]
        jsd = distance.jensenshannon(rp, rq) ** 2
        floor = max(np.log(len(rp)) - (sps.entropy(rp) + sps.entropy(rq)) / 2, 1e-6)
        np.testing.assert_allclose(M.normalized_jsd(p_seq, q_seq), jsd / floor, rtol=1e-5)


@pytest.mark.slow
def test_batching_and_padding_invariance(routed):
    """Each sequence alone, unpadded, gives the statistics it got inside the padded batch of three."""
    ids, mask = routed["batch"]
    stats = routed["stats"]
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = chunk_stats(routed["model"], ids[row:row + 1, :n], mask[row:row + 1, :n],
                            routed["content"][row:row + 1, :n], np.minimum(routed["pairs"][row:row + 1], n - 1))
        np.testing.assert_array_equal(np.asarray(alone.topk_counts)[0], np.asarray(stats.topk_counts)[row])
        np.testing.assert_allclose(np.asarray(alone.prob_sums)[0], np.asarray(stats.prob_sums)[row], rtol=1e-5,
                                   atol=1e-6)


def test_content_mask_excludes_padding_and_specials(routed):
    stats = routed["stats"]
    _, mask = routed["batch"]
    assert (np.asarray(stats.tokens) == mask.sum(1) - 1).all()
    per_token = np.asarray(stats.topk_counts).sum(-1)  # [b, L]: K per counted token
    assert (per_token == routed["k"] * np.asarray(stats.tokens)[:, None]).all()


def test_metric_edge_cases():
    assert M.gini(np.zeros(8)) == 0.0
    assert M.gini(np.ones(8)) == pytest.approx(0.0)
    assert M.gini(np.eye(8)[0]) == pytest.approx(7 / 8)
    assert M.usage_entropy_bits(np.full(128, 1 / 128)) == pytest.approx(7.0)
    assert M.lsi(np.zeros(3), np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert M.lsi_sweep(np.array([0.5, -0.15, 0.07]))[0.1] == {"a_specific": 1, "b_specific": 1, "shared": 1}
    assert M.topk_overlap(np.array([3, 2, 1, 0.0]), np.array([0, 2, 3, 1.0]), 2) == (1 / 3, 0.5)
    assert M.collapse_summary(np.arange(8.0)) == pytest.approx(6.5 - 3.5)
    first, second = M.split_halves(9, seed=1)
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(9)) and len(first) == 4


def test_native_probabilities_are_sigmoid_for_nemotron(routed):
    """--probabilities native: Nemotron-H's sigmoid scores (Qwen3-MoE's native scores are the softmax)."""
    ids, mask = routed["batch"]
    native = chunk_stats(routed["model"], ids, mask, routed["content"], routed["pairs"], "native")
    content = routed["content"][..., None]
    if routed["model"].config.model_type == "nemotron_h":
        want = [(torch.sigmoid(torch.from_numpy(lg)).numpy() * content).sum(1) for lg in routed["logits"]]
    else:
        want = [(torch.softmax(torch.from_numpy(lg), -1).numpy() * content).sum(1) for lg in routed["logits"]]
    np.testing.assert_allclose(np.asarray(native.prob_sums), np.stack(want, axis=1), rtol=RTOL, atol=1e-6)
