"""The routing metrics of docs/metrics.md, as pure numpy functions of routing statistics.

Inputs are the reductions `moejax.routing.stats` accumulates in the forward pass: top-K counts c_e,
top-1 counts, sums of routing probabilities, summed per-token selection entropy and token counts,
per layer (and per chunk). Each function states the variant it computes; options are arguments.
Logarithms: entropies of usage are in bits, JS divergence in nats, as docs/metrics.md defines them.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

LSI_THETAS = (0.05, 0.1, 0.2, 0.3)


def usage_fractions(counts_e: np.ndarray, k: int) -> np.ndarray:
    """f_e = c_e / (K |T|), from top-K counts [..., E] (each token adds K); sums to 1."""
    counts_e = np.asarray(counts_e, np.float64)
    total = counts_e.sum(axis=-1, keepdims=True)
    return np.divide(counts_e, total, out=np.zeros_like(counts_e), where=total > 0)


def usage_entropy_bits(f_e: np.ndarray) -> np.ndarray:
    """H = -sum_e f_e log2 f_e, in bits (0 log 0 = 0)."""
    f_e = np.asarray(f_e, np.float64)
    logs = np.log2(np.where(f_e > 0, f_e, 1.0))
    return -(f_e * logs).sum(axis=-1)


def usage_entropy_normalized(f_e: np.ndarray) -> np.ndarray:
    """H / log2 E, in [0, 1]."""
    return usage_entropy_bits(f_e) / np.log2(np.shape(f_e)[-1])


def gini(counts_e: np.ndarray) -> np.ndarray:
    """G = 2 sum_i i x_i / (n sum x) - (n + 1) / n over counts sorted ascending (i from 1); 0 = equal load.

    Pass top-1 counts for the `top1` variant. A layer with no tokens has G = 0.
    """
    x = np.sort(np.asarray(counts_e, np.float64), axis=-1)
    n = x.shape[-1]
    i = np.arange(1, n + 1)
    total = x.sum(axis=-1)
    g = 2 * (i * x).sum(axis=-1) / np.where(total > 0, n * total, 1.0) - (n + 1) / n
    return np.where(total > 0, g, 0.0)


def active_experts(f_e: np.ndarray, theta: float = 0.0) -> np.ndarray:
    """#{e : f_e > theta}; theta 0 counts experts that got any token."""
    return (np.asarray(f_e) > theta).sum(axis=-1)


def selection_entropy_bits(entropy_sum_bits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """mean_t(-sum_e P_t[e] log2 P_t[e]): the summed per-token entropies over the token count."""
    tokens = np.asarray(tokens, np.float64)
    return np.divide(entropy_sum_bits, tokens, out=np.zeros_like(tokens), where=tokens > 0)


def mean_probabilities(prob_sums_e: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """pbar_e = mean_t P_t[e] from summed probabilities [..., E] and token counts [...]."""
    tokens = np.asarray(tokens, np.float64)[..., None]
    prob_sums_e = np.asarray(prob_sums_e, np.float64)
    return np.divide(prob_sums_e, tokens, out=np.zeros_like(prob_sums_e), where=tokens > 0)


def lsi(pbar_a: np.ndarray, pbar_b: np.ndarray) -> np.ndarray:
    """LSI_e = (pbar_A - pbar_B) / (pbar_A + pbar_B) in [-1, 1]; 0 (shared) where both are 0."""
    a, b = np.asarray(pbar_a, np.float64), np.asarray(pbar_b, np.float64)
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total > 0)


def lsi_categories(lsi_e: np.ndarray, theta: float = 0.1) -> np.ndarray:
    """Per expert: +1 A-specific (LSI > theta), -1 B-specific (LSI < -theta), 0 shared."""
    lsi_e = np.asarray(lsi_e)
    return np.where(lsi_e > theta, 1, np.where(lsi_e < -theta, -1, 0))


def lsi_sweep(lsi_e: np.ndarray, thetas=LSI_THETAS) -> dict[float, dict[str, int]]:
    """Category counts (A-specific, B-specific, shared) at each theta: the sensitivity report."""
    out = {}
    for theta in thetas:
        cats = lsi_categories(lsi_e, theta)
        out[theta] = {"a_specific": int((cats == 1).sum()), "b_specific": int((cats == -1).sum()),
                      "shared": int((cats == 0).sum())}
    return out


def activation_difference(counts_a: np.ndarray, tokens_a, counts_b: np.ndarray, tokens_b) -> np.ndarray:
    """Delta_e = a_e[A] - a_e[B] with a_e = c_e / |T|, the fraction of tokens with e in their top K."""
    return (np.asarray(counts_a, np.float64) / max(float(tokens_a), 1.0)
            - np.asarray(counts_b, np.float64) / max(float(tokens_b), 1.0))


def activation_difference_per_sequence(counts_a_se: np.ndarray, tokens_a_s: np.ndarray, counts_b_se: np.ndarray,
                                       tokens_b_s: np.ndarray) -> np.ndarray:
    """Delta_e with a_e averaged over sequences (paper b's per-sequence variant) rather than pooled."""
    def per_sequence(counts, tokens):
        tokens = np.maximum(np.asarray(tokens, np.float64), 1.0)[:, None]
        return (np.asarray(counts, np.float64) / tokens).mean(axis=0)

    return per_sequence(counts_a_se, tokens_a_s) - per_sequence(counts_b_se, tokens_b_s)


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity of two usage vectors (f by default, pbar as the option); 0 if either is 0."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    norm = np.linalg.norm(u) * np.linalg.norm(v)
    return float(u @ v / norm) if norm > 0 else 0.0


def top_experts(f_e: np.ndarray, k: int) -> np.ndarray:
    """The k most-used experts; ties go to the lower expert index."""
    order = np.lexsort((np.arange(len(f_e)), -np.asarray(f_e)))
    return order[:k]


def topk_overlap(f_a: np.ndarray, f_b: np.ndarray, k: int) -> tuple[float, float]:
    """(Jaccard |A∩B| / |A∪B|, |A∩B| / K) of the two languages' K most-used experts."""
    a, b = set(top_experts(f_a, k).tolist()), set(top_experts(f_b, k).tolist())
    return len(a & b) / len(a | b), len(a & b) / k


def spearman(u: np.ndarray, v: np.ndarray) -> float:
    """Spearman rho with average ranks for ties (scipy.stats.spearmanr)."""
    return float(sps.spearmanr(u, v).statistic)


def kendall_tau_b(u: np.ndarray, v: np.ndarray) -> float:
    """Kendall tau-b (scipy.stats.kendalltau, variant "b")."""
    return float(sps.kendalltau(u, v, variant="b").statistic)


def _entropy_nats(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JSD(p, q) = KL(p||m)/2 + KL(q||m)/2 in nats, m = (p + q)/2, over the last axis."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = (p + q) / 2
    return _entropy_nats(m) - (_entropy_nats(p) + _entropy_nats(q)) / 2


def normalized_jsd(p_se: np.ndarray, q_se: np.ndarray) -> float:
    """mean over aligned pairs i of JSD(p_i, q_i) / max(ln E - (H(p_i) + H(q_i)) / 2, 1e-6), H in nats."""
    p_se, q_se = np.asarray(p_se, np.float64), np.asarray(q_se, np.float64)
    floor = np.maximum(np.log(p_se.shape[-1]) - (_entropy_nats(p_se) + _entropy_nats(q_se)) / 2, 1e-6)
    return float(np.mean(js_divergence(p_se, q_se) / floor))


def chunk_spread(values_c: np.ndarray) -> tuple[float, float]:
    """(mean, sample std) of a per-chunk metric; std 0 for a single chunk."""
    values_c = np.asarray(values_c, np.float64)
    return float(values_c.mean()), float(values_c.std(ddof=1)) if len(values_c) > 1 else 0.0


def gap_exceeds_spread(value_a: float, value_b: float, std_a: float, std_b: float) -> bool:
    """A between-language gap is flagged when it exceeds one std across chunks (the larger of the two)."""
    return abs(value_a - value_b) > max(std_a, std_b)


def split_halves(num_chunks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random split of chunk indices into two halves: the same-language noise floor."""
    order = np.random.default_rng(seed).permutation(num_chunks)
    return np.sort(order[: num_chunks // 2]), np.sort(order[num_chunks // 2:])


def tokenization_stats(texts: list[str], token_counts: list[int]) -> dict[str, float]:
    """Tokens per character and tokens per whitespace-delimited segment over a language's texts."""
    tokens = float(sum(token_counts))
    chars = sum(len(t) for t in texts)
    segments = sum(len(t.split()) for t in texts)
    return {"tokens": tokens, "tokens_per_char": tokens / max(chars, 1),
            "tokens_per_segment": tokens / max(segments, 1)}


def collapse_summary(per_layer: np.ndarray) -> float:
    """Mean over the deepest quarter of MoE layers minus the mean over the middle half."""
    values = np.asarray(per_layer, np.float64)
    n = len(values)
    quarter = max(n // 4, 1)
    middle = values[n // 4: n - n // 4] if n >= 4 else values
    return float(values[n - quarter:].mean() - middle.mean())


# Language-level metrics (paper c) and the correlation with downstream scores (paper b). Shape letters: g indexes
# languages, e experts, v token ids of the vocabulary.


def jsd_matrix(dist_ge: np.ndarray) -> np.ndarray:
    """[G, G] JSD (nats) between every two languages' expert-usage distributions [G, E]; 0 on the diagonal."""
    dist_ge = np.asarray(dist_ge, np.float64)
    return np.maximum(js_divergence(dist_ge[:, None, :], dist_ge[None, :, :]), 0.0)  # rounding can dip below 0


def language_information_gain(counts_ge: np.ndarray, weighting: str = "tokens") -> float:
    """IG(L;E) / H(L) = (H(L) - H(L|E)) / H(L) in [0, 1] from top-K counts [G, E] of one layer (0 if H(L) = 0).

    L is the language and E the expert of one (token, chosen expert) assignment. weighting "tokens" draws the
    assignment from all languages' pooled counts, so p(L = g) is g's share of the assignments (paper c's contingency
    table); "uniform" gives every language the same weight: p(g, e) = f_ge / G, f each language's usage fractions.
    """
    counts_ge = np.asarray(counts_ge, np.float64)
    if weighting == "tokens":
        joint_ge = counts_ge / max(counts_ge.sum(), 1e-300)
    elif weighting == "uniform":  # over the languages that have tokens at all
        counts_ge = counts_ge[counts_ge.sum(axis=1) > 0]
        joint_ge = usage_fractions(counts_ge, 1) / max(counts_ge.shape[0], 1)
    else:
        raise ValueError(f"weighting must be 'tokens' or 'uniform', got {weighting!r}")
    h_lang = float(usage_entropy_bits(joint_ge.sum(axis=1)))
    if h_lang <= 0:
        return 0.0
    p_e = joint_ge.sum(axis=0)
    lang_given_expert_eg = np.divide(joint_ge.T, p_e[:, None], out=np.zeros_like(joint_ge.T), where=p_e[:, None] > 0)
    h_lang_given_expert = float(p_e @ usage_entropy_bits(lang_given_expert_eg))
    return (h_lang - h_lang_given_expert) / h_lang


def vocabulary_overlap(counts_a_v: np.ndarray, counts_b_v: np.ndarray) -> tuple[float, float]:
    """(Jaccard |V_a ∩ V_b| / |V_a ∪ V_b| of the token ids each language used, sum_v min(p_a(v), p_b(v)) of their
    token frequencies) from two languages' token-id counts [V]; each in [0, 1], 0 when a language has no tokens."""
    a, b = np.asarray(counts_a_v, np.float64), np.asarray(counts_b_v, np.float64)
    union = np.count_nonzero((a > 0) | (b > 0))
    jaccard = np.count_nonzero((a > 0) & (b > 0)) / union if union else 0.0
    if a.sum() <= 0 or b.sum() <= 0:
        return float(jaccard), 0.0
    return float(jaccard), float(np.minimum(a / a.sum(), b / b.sum()).sum())


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman rho of x and y [n] with their two-sided p-values (scipy.stats) and n; r, rho and p are
    NaN when n < 3 (no p-value: one degree of freedom is the least) or either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    out = {"n": n, "pearson_r": np.nan, "pearson_p": np.nan, "spearman_rho": np.nan, "spearman_p": np.nan}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pearson, spearman = sps.pearsonr(x, y), sps.spearmanr(x, y)
    out.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
               spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return out
