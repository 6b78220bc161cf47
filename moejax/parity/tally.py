"""What a parity run accumulates over its batches: each side's outputs against the float32 reference's, per token,
per block and per MoE layer, as running sums and per-token figures (for means, quantiles and maxima)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.parity.ties import EXACT_TIE, OTHER, differing


@dataclasses.dataclass
class Outputs:
    """One side's outputs for a batch's content tokens (n of them, in row-major order): logits [n, V], the
    embeddings [n, d] (the reference's input to block 0; None where not recorded), per block its output [n, d],
    per MoE layer the raw router logits [n, E] and the chosen experts [n, k]."""

    logits: np.ndarray
    hidden: list[np.ndarray]
    router_logits: list[np.ndarray]
    router_ids: list[np.ndarray]
    embedded: np.ndarray | None = None


def moejax_outputs(out, content: np.ndarray) -> Outputs:
    """A moejax CausalLMOutput's first len(content) rows, content tokens only."""
    rows = len(content)

    def take(a):
        return np.asarray(a[:rows])[content]

    return Outputs(take(out.logits).astype(np.float32), [take(h).astype(np.float32) for h in out.hidden_states],
                   [take(r) for r in out.router_logits], [take(i) for i in out.router_expert_ids])


def token_kl(ref_nv: np.ndarray, got_nv: np.ndarray, rows: int = 64) -> np.ndarray:
    """Per row KL(softmax(ref) || softmax(got)) in nats, computed in float64 a few rows at a time."""
    out = np.empty(len(ref_nv))
    for i in range(0, len(ref_nv), rows):
        lp = _log_softmax(ref_nv[i:i + rows].astype(np.float64))
        lq = _log_softmax(got_nv[i:i + rows].astype(np.float64))
        out[i:i + rows] = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_relative(ref_nd: np.ndarray, got_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(||got - ref||^2, ||ref||^2) per row, in float64."""
    ref_nd = ref_nd.astype(np.float64)
    return ((got_nd.astype(np.float64) - ref_nd) ** 2).sum(-1), (ref_nd ** 2).sum(-1)


def relative(sq_diff: float, sq_ref: float) -> float:
    """sqrt(sq_diff / sq_ref): 0 only for two zero signals, NaN whenever either sum is."""
    if math.isnan(sq_diff) or math.isnan(sq_ref):
        return float("nan")
    return (sq_diff / sq_ref) ** 0.5 if sq_ref > 0 else (0.0 if sq_diff == 0 else float("inf"))


def max_nan(a: float, b: float) -> float:
    """The larger of two figures, NaN if either is (a NaN difference must never read as 0)."""
    return float("nan") if math.isnan(a) or math.isnan(b) else max(a, b)


STATISTICS = ("mean", "median", "p99", "max")


def statistic(values: np.ndarray, name: str) -> float:
    """mean, median, p99 (the 99th percentile) or max of per-token figures; NaN if any is NaN or there are none."""
    if not len(values) or np.isnan(values).any():
        return float("nan")
    if name == "mean":
        return float(values.mean())
    if name == "max":
        return float(values.max())
    return float(np.quantile(values, 0.5 if name == "median" else 0.99))


def _clean(values: list[np.ndarray], clean: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values)[np.concatenate(clean)] if values else np.zeros(0)


@dataclasses.dataclass
class BlockTally:
    """One block's output over the tokens compared: running sums, and each token's relative difference."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    tokens: int = 0
    token_relative: list = dataclasses.field(default_factory=list)
    clean: list = dataclasses.field(default_factory=list)  # per token: in the statistics (no routing flip so far)

    def add(self, ref_nd: np.ndarray, got_nd: np.ndarray, clean: np.ndarray | None = None) -> None:
        self.tokens += len(ref_nd)
        sq_diff_n, sq_ref_n = token_relative(ref_nd, got_nd)
        self.sq_diff += float(sq_diff_n.sum())
        self.sq_ref += float(sq_ref_n.sum())
        self.max_abs = max_nan(self.max_abs, float(np.sqrt(sq_diff_n.max(initial=0.0))))
        self.token_relative.append(np.sqrt(sq_diff_n / np.maximum(sq_ref_n, 1e-300)))
        self.clean.append(np.ones(len(ref_nd), bool) if clean is None else np.asarray(clean, bool))

    @property
    def relative(self) -> float:
        """||h - h_ref|| / ||h_ref|| over all the tokens' entries."""
        return relative(self.sq_diff, self.sq_ref)

    def per_token(self) -> np.ndarray:
        """The clean tokens' relative differences."""
        return _clean(self.token_relative, self.clean)

    def stat(self, name: str) -> float:
        """A statistic (STATISTICS) of the clean tokens' own relative differences."""
        return statistic(self.per_token(), name)


@dataclasses.dataclass
class UpdateTally:
    """One block run alone on the reference's own input (the implementation check): its error against the
    reference's output, relative to the block's update (output - input, the part the block computes; the input
    itself is the same on both sides)."""

    sq_err: float = 0.0
    sq_update: float = 0.0
    tokens: int = 0
    token_err: list = dataclasses.field(default_factory=list)

    def add(self, input_nd: np.ndarray, ref_nd: np.ndarray, got_nd: np.ndarray) -> None:
        sq_err_n, _ = token_relative(ref_nd, got_nd)
        sq_update_n = ((ref_nd.astype(np.float64) - input_nd) ** 2).sum(-1)
        self.sq_err += float(sq_err_n.sum())
        self.sq_update += float(sq_update_n.sum())
        self.tokens += len(ref_nd)
        self.token_err.append(np.sqrt(sq_err_n))

    @property
    def relative(self) -> float:
        """||error|| / ||update|| over every token."""
        return relative(self.sq_err, self.sq_update)

    @property
    def token_max(self) -> float:
        """The largest token's error over the update's root-mean-square per token: a rare error at a few tokens,
        on a scale that a token with a tiny update of its own cannot inflate."""
        if not self.tokens:
            return float("nan")
        worst = statistic(np.concatenate(self.token_err), "max")
        return relative(worst ** 2, self.sq_update / self.tokens)


@dataclasses.dataclass
class RouterTally:
    """Running figures for one MoE layer over every content token: router-logit differences, identical expert
    sets (per group too), Jaccard, top-K counts of each side, and the flips by kind."""

    experts: int
    max_abs: float = 0.0
    sum_abs: float = 0.0
    entries: int = 0
    sq_diff: float = 0.0
    sq_ref: float = 0.0
    same_sets: dict = dataclasses.field(default_factory=dict)  # group -> tokens with identical sets
    tokens: dict = dataclasses.field(default_factory=dict)  # group -> tokens
    jaccard_sum: float = 0.0
    ties: int = 0  # flips proven near ties, exact ones included
    exact_ties: int = 0
    other_flips: int = 0
    forced: int = 0  # tokens whose reference experts were forced into moejax's routing
    token_relative: list = dataclasses.field(default_factory=list)  # per token ||z - z_ref|| / ||z_ref||
    clean: list = dataclasses.field(default_factory=list)  # per token: in the statistics (no routing flip before)
    counts_ref: np.ndarray = None
    counts_got: np.ndarray = None

    def __post_init__(self):
        self.counts_ref = np.zeros(self.experts, np.int64)
        self.counts_got = np.zeros(self.experts, np.int64)

    def add(self, groups_n: np.ndarray, logits_ref_ne, ids_ref_nk, logits_got_ne, ids_got_nk, flips=None,
            clean: np.ndarray | None = None) -> None:
        """Adds n content tokens; `flips` (moejax.parity.ties.Flips) classifies those whose sets differ; `clean`:
        the tokens the per-token statistics include."""
        diff_ne = np.abs(logits_got_ne.astype(np.float64) - logits_ref_ne)
        self.max_abs = max_nan(self.max_abs, float(diff_ne.max(initial=0.0)))
        self.sum_abs += float(diff_ne.sum())
        self.entries += diff_ne.size
        sq_diff_n, sq_ref_n = token_relative(logits_ref_ne, logits_got_ne)
        self.sq_diff += float(sq_diff_n.sum())
        self.sq_ref += float(sq_ref_n.sum())
        self.token_relative.append(np.sqrt(sq_diff_n / np.maximum(sq_ref_n, 1e-300)))
        self.clean.append(np.ones(len(sq_diff_n), bool) if clean is None else np.asarray(clean, bool))
        ref_ne, got_ne = _membership(ids_ref_nk, self.experts), _membership(ids_got_nk, self.experts)
        shared_n = (ref_ne & got_ne).sum(-1)
        k = ids_ref_nk.shape[-1]
        same_n = ~differing(ids_ref_nk, ids_got_nk)
        self.jaccard_sum += float((shared_n / (2 * k - shared_n)).sum())
        for group in np.unique(groups_n):
            here = groups_n == group
            self.same_sets[group] = self.same_sets.get(group, 0) + int(same_n[here].sum())
            self.tokens[group] = self.tokens.get(group, 0) + int(here.sum())
        self.counts_ref += ref_ne.sum(0)
        self.counts_got += got_ne.sum(0)
        if flips is not None:
            self.ties += int(flips.ties.sum())
            self.exact_ties += int((flips.kind == EXACT_TIE).sum())
            self.other_flips += int((flips.kind == OTHER).sum())

    @property
    def total(self) -> int:
        return sum(self.tokens.values())

    @property
    def relative(self) -> float:
        return relative(self.sq_diff, self.sq_ref)

    def agreement(self, group: str | None = None) -> float:
        """Tokens with identical expert sets, over every content token (of `group`); ties count as different."""
        if group is None:
            return sum(self.same_sets.values()) / max(self.total, 1)
        return self.same_sets.get(group, 0) / max(self.tokens.get(group, 0), 1)

    def stat(self, name: str) -> float:
        """A statistic (STATISTICS) of the clean tokens' relative router-logit differences."""
        return statistic(_clean(self.token_relative, self.clean), name)

    @property
    def misses(self) -> int:
        """Tokens routed to another expert set."""
        return self.total - sum(self.same_sets.values())

    @property
    def near_tie_rate(self) -> float:
        """Near ties beyond exact ones, per content token."""
        return (self.ties - self.exact_ties) / max(self.total, 1)


def _membership(ids_nk: np.ndarray, experts: int) -> np.ndarray:
    member = np.zeros((len(ids_nk), experts), bool)
    np.put_along_axis(member, np.asarray(ids_nk, np.int64), True, axis=-1)
    return member


class LogitTally:
    """Output logits against the reference's over the tokens compared: per-token KL, top-1 agreement, relative
    difference (||dz|| / ||z|| per token), and the largest |dz| over the largest |z| of all."""

    def __init__(self):
        self.kl_n, self.top1_n, self.group_n, self.relative_n, self.clean_n = [], [], [], [], []
        self.max_abs_diff, self.max_abs_ref = 0.0, 0.0

    def add(self, groups_n: np.ndarray, ref_nv: np.ndarray, got_nv: np.ndarray,
            clean: np.ndarray | None = None) -> None:
        self.clean_n.append(np.ones(len(ref_nv), bool) if clean is None else np.asarray(clean, bool))
        self.kl_n.append(token_kl(ref_nv, got_nv))
        finite = np.isfinite(ref_nv).all(-1) & np.isfinite(got_nv).all(-1)
        self.top1_n.append((ref_nv.argmax(-1) == got_nv.argmax(-1)) & finite)
        self.group_n.append(groups_n)
        sq_diff_n, sq_ref_n = token_relative(ref_nv, got_nv)
        self.relative_n.append(np.sqrt(sq_diff_n / np.maximum(sq_ref_n, 1e-300)))
        self.max_abs_diff = max_nan(self.max_abs_diff,
                                    float(np.abs(got_nv.astype(np.float64) - ref_nv).max(initial=0.0)))
        self.max_abs_ref = max(self.max_abs_ref, float(np.abs(ref_nv).max(initial=0.0)))

    @property
    def logits_relative(self) -> float:
        """max |z_moejax - z_ref| / max |z_ref| over every token and vocabulary entry."""
        return relative(self.max_abs_diff ** 2, self.max_abs_ref ** 2)

    def per_token(self) -> tuple[np.ndarray, ...]:
        """(KL, top-1 agreement, group, relative logit difference, clean) per token."""
        if not self.kl_n:
            return np.zeros(0), np.zeros(0, bool), np.zeros(0, object), np.zeros(0), np.zeros(0, bool)
        return tuple(np.concatenate(x) for x in (self.kl_n, self.top1_n, self.group_n, self.relative_n, self.clean_n))


class SideTally:
    """One side's end-to-end outputs against the float32 reference's, accumulated over batches: per block, per MoE
    layer and per token (KL, top-1 agreement, group, logits)."""

    def __init__(self, cfg):
        self.blocks = [BlockTally() for _ in cfg.layer_kinds]
        self.routing = [RouterTally(cfg.num_routed_experts) for _ in cfg.moe_layers]
        self.logits = LogitTally()


class ImplementationTally:
    """The implementation check in float32: moejax's embeddings, each block run alone on the reference's own input
    to it (with its routing), and the head on the reference's last block output, against the reference."""

    def __init__(self, cfg):
        self.embedding = BlockTally()
        self.blocks = [UpdateTally() for _ in cfg.layer_kinds]
        self.routing = [RouterTally(cfg.num_routed_experts) for _ in cfg.moe_layers]
        self.logits = LogitTally()
