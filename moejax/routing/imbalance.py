"""Statistics of the controlled-imbalance experiment (experiments.controlled_imbalance, docs/studies.md): paper A's
routing metrics of a minority language against the majority, per MoE layer, from each trained model's routing over
held-out text, with a hierarchical bootstrap: training seeds, then each run's held-out sequences.

Shape letters: q held-out sequences, l MoE layers, e experts, r mixing ratios, b rows of a bootstrap (row 0: the data
as measured; rows 1..: resamples), j the seed slots of a row (as many as there are training seeds).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from moejax.routing import metrics as M

LSI_THETA = 0.1  # paper A's threshold between a language's own experts and shared ones
METRICS = {
    "entropy_minority": "usage entropy of the minority's top-K assignments (bits)",
    "entropy_majority": "usage entropy of the majority's top-K assignments (bits)",
    "entropy_gap": "minority minus majority usage entropy (bits): below 0, the minority is the more concentrated",
    "gini_minority": "Gini coefficient of the minority's top-K counts",
    "gini_majority": "Gini coefficient of the majority's top-K counts",
    "gini_gap": "minority minus majority Gini: above 0, the minority's load is the more unequal",
    "lsi_minority": f"share of the experts specific to the minority (LSI > {LSI_THETA:g})",
    "lsi_shared": f"share of the experts shared by both languages (|LSI| <= {LSI_THETA:g})",
    "jsd": "JS divergence of the two languages' expert-usage distributions f (nats)",
    "topk_overlap": "|A ∩ B| / K of the two languages' K most-used experts",
}
_CHUNK = 100  # bootstrap rows computed at once: bounds the [b, l, e] temporaries


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """One trained model's routing over the held-out text, per side: the top-K counts, the summed routing
    probabilities and the content-token count of each held-out sequence (moejax.routing.analysis.LangRun's
    topk_counts, prob_sums and tokens); k is the model's top-K."""

    minority_counts_qle: np.ndarray
    minority_probs_qle: np.ndarray
    minority_tokens_q: np.ndarray
    majority_counts_qle: np.ndarray
    majority_probs_qle: np.ndarray
    majority_tokens_q: np.ndarray
    k: int

    def save(self, path: Path) -> None:
        """As .npz (one array per field), written atomically."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{field.name: np.asarray(getattr(self, field.name)) for field in dataclasses.fields(self)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        with np.load(path) as saved:
            return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name != "k"},
                       k=int(saved["k"]))


def top_k_overlap(f_a: np.ndarray, f_b: np.ndarray, k: int) -> np.ndarray:
    """|A ∩ B| / K of each side's K most-used experts over the last axis [..., e] -> [...] (ties to the lower expert
    index, as metrics.top_experts)."""
    def members(f):
        chosen = np.zeros(f.shape, bool)
        np.put_along_axis(chosen, np.argsort(-f, axis=-1, kind="stable")[..., :k], True, axis=-1)
        return chosen

    return (members(f_a) & members(f_b)).sum(axis=-1) / k


def layer_metrics(minority_counts_le, minority_pbar_le, majority_counts_le, majority_pbar_le, k: int,
                  theta: float = LSI_THETA) -> dict[str, np.ndarray]:
    """METRICS [..., l] from each side's pooled top-K counts and mean routing probabilities [..., l, e]."""
    f_min, f_maj = M.usage_fractions(minority_counts_le, k), M.usage_fractions(majority_counts_le, k)
    entropy_min, entropy_maj = M.usage_entropy_bits(f_min), M.usage_entropy_bits(f_maj)
    gini_min, gini_maj = M.gini(minority_counts_le), M.gini(majority_counts_le)
    lsi_le = M.lsi(minority_pbar_le, majority_pbar_le)
    return {"entropy_minority": entropy_min, "entropy_majority": entropy_maj, "entropy_gap": entropy_min - entropy_maj,
            "gini_minority": gini_min, "gini_majority": gini_maj, "gini_gap": gini_min - gini_maj,
            "lsi_minority": (lsi_le > theta).mean(axis=-1), "lsi_shared": (np.abs(lsi_le) <= theta).mean(axis=-1),
            "jsd": np.maximum(M.js_divergence(f_min, f_maj), 0.0),  # rounding can dip below 0
            "topk_overlap": top_k_overlap(f_min, f_maj, k)}


def pooled(counts_qle: np.ndarray, probs_qle: np.ndarray, tokens_q: np.ndarray, weights_bq: np.ndarray):
    """(top-K counts, mean routing probabilities) [b, l, e] over the sequences, sequence q counted weights_bq[b, q]
    times."""
    counts_ble = np.einsum("bq,qle->ble", weights_bq, np.asarray(counts_qle, np.float64))
    tokens_bl = np.broadcast_to((weights_bq @ np.asarray(tokens_q, np.float64))[:, None], counts_ble.shape[:2])
    return counts_ble, M.mean_probabilities(np.einsum("bq,qle->ble", weights_bq, probs_qle), tokens_bl)


def resampled_metrics(held_out: HeldOut, minority_bq: np.ndarray, majority_bq: np.ndarray,
                      theta: float = LSI_THETA) -> dict[str, np.ndarray]:
    """METRICS [b, l] of one model, its held-out sequences weighted by each bootstrap row's multiplicities."""
    rows = []
    for start in range(0, len(minority_bq), _CHUNK):
        part = slice(start, start + _CHUNK)
        minority = pooled(held_out.minority_counts_qle, held_out.minority_probs_qle, held_out.minority_tokens_q,
                          minority_bq[part])
        majority = pooled(held_out.majority_counts_qle, held_out.majority_probs_qle, held_out.majority_tokens_q,
                          majority_bq[part])
        rows.append(layer_metrics(*minority, *majority, held_out.k, theta))
    return {name: np.concatenate([r[name] for r in rows]) for name in METRICS}


def sequence_weights(q: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[1 + draws, q]: row 0 all ones (the sequences as measured), then how often each of q sequences is drawn in
    each of `draws` resamples of q with replacement."""
    return np.vstack([np.ones((1, q)), rng.multinomial(q, np.full(q, 1.0 / q), size=draws)]).astype(np.float64)


def seed_draws(n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[1 + draws, n]: which of n training seeds fills each of n slots; row 0 every seed once (as trained), then
    `draws` resamples of the seeds with replacement."""
    return np.vstack([np.arange(n)[None], rng.integers(0, n, size=(draws, n))])


def hierarchical_metrics(runs: list[HeldOut], seeds_bj: np.ndarray, rng: np.random.Generator, paired: bool,
                         theta: float = LSI_THETA) -> dict[str, np.ndarray]:
    """METRICS [b, j, l] of a hierarchical bootstrap: in row b, slot j holds run seeds_bj[b, j] (runs: one per seed)
    with its held-out sequences resampled anew for that slot (row 0: every run as measured). paired: the two sides'
    sequence q is the same text (parallel held-out lines), so both are resampled with the same draw."""
    first = runs[0]
    q_min, q_maj = len(first.minority_tokens_q), len(first.majority_tokens_q)
    rows, slots = seeds_bj.shape
    out = {name: np.empty((rows, slots, first.minority_counts_qle.shape[1])) for name in METRICS}
    for j in range(slots):
        minority_bq = sequence_weights(q_min, rows - 1, rng)
        majority_bq = minority_bq if paired else sequence_weights(q_maj, rows - 1, rng)
        for n, run in enumerate(runs):
            chosen = np.flatnonzero(seeds_bj[:, j] == n)
            if len(chosen):
                values = resampled_metrics(run, minority_bq[chosen], majority_bq[chosen], theta)
                for name in METRICS:
                    out[name][chosen, j] = values[name]
    return out


def slopes(x_r: np.ndarray, y_rjb: np.ndarray) -> np.ndarray:
    """[b]: the least-squares slope of y on x over every (ratio r, slot j) point of each bootstrap row b."""
    x_rjb = np.broadcast_to(np.asarray(x_r, np.float64)[:, None, None], y_rjb.shape)
    dx_rjb = x_rjb - x_rjb.mean(axis=(0, 1))
    return (dx_rjb * (y_rjb - y_rjb.mean(axis=(0, 1)))).sum(axis=(0, 1)) / (dx_rjb ** 2).sum(axis=(0, 1))


def percentile_interval(values_b: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval over the leading axis, from the resamples (rows 1..; row 0 is the
    estimate, not a resample)."""
    tail = (1 - level) / 2
    low, high = np.quantile(values_b[1:], [tail, 1 - tail], axis=0)
    return low, high


def layer_groups(layers: int, deep_fraction: float) -> dict[str, np.ndarray]:
    """MoE layer indices of the early, middle and deep groups: deep the last max(1, round(layers * deep_fraction)),
    early the first max(1, round(layers / 3)) before them, middle the rest; a group left with no layer (a model of
    one or two MoE layers) is left out."""
    deep = min(max(1, round(layers * deep_fraction)), layers)
    early = min(max(1, round(layers / 3)), layers - deep)
    groups = {"early": np.arange(early), "middle": np.arange(early, layers - deep),
              "deep": np.arange(layers - deep, layers)}
    return {name: idx for name, idx in groups.items() if len(idx)}
