"""Routing near ties, proven on the reference's own selection scores.

Two computations of the same token (moejax and transformers, two summation orders, packed and unpacked)
may choose different experts where two selection scores are closer than float32 rounding can separate.
Such a flip is legitimate; any other is an error. A flip is classified from the *reference* side's
numbers: its selection scores s (float64 from its float32 logits z), its chosen set S and the k-th
selected score tau = min over S of s, and the router-logit difference actually observed at that token,
delta = max_e |z_other[e] - z_ref[e]|.

A flip swaps some a in S for some b outside it, so s'(b) >= s'(a) while s(a) >= tau >= s(b). If each
score can move by at most m(delta), then s(a) - s(b) <= 2 m, so every expert of the symmetric difference
lies within w = 2 m of tau. The window follows from the score function's slope:
- softmax (Qwen3-MoE): a logit change of at most delta changes log p by at most 2 delta, so the pair
  satisfies p(a) / p(b) <= exp(4 delta), and both lie within tau * (exp(4 delta) - 1) of tau;
- sigmoid plus correction bias (Nemotron-H): the sigmoid's slope is at most 1/4, so w = delta / 2; the
  bias is a parameter, the same on both sides. Where the group-limited router picked a different group
  (an expert of the other side's set lies in a group the reference did not select), the group scores
  (sums of the two best choice scores) decide instead: each moves by at most delta / 2, so the group
  must lie within delta of the reference's topk_group-th group score.
Each window gets a floor of a few float32 ulps of the boundary score (both sides round the scores they
compare). A token whose router logits already differ by more than `max_logit_diff` cannot be a near tie:
its flip is the consequence of an error upstream.

An *exact* tie is a flip explained within the floor alone: the reference's own scores cannot order
the experts (identical router rows give identical scores, and transformers' top-k breaks such ties
arbitrarily). Exact ties are properties of the checkpoint; near ties beyond the floor are properties of
rounding, and a rate bound on them (`moejax parity`) catches an error hiding in the window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from moejax.layers.stack import layer_position

UNIT_ROUNDOFF = 2.0 ** -24  # float32
TIE, EXACT_TIE, OTHER = "tie", "exact_tie", "other"


@dataclasses.dataclass(frozen=True)
class RouterRule:
    """How one MoE layer chooses its k experts: "softmax" (probabilities), "topk_softmax" (the raw logits: GPT-OSS
    softmaxes only the k chosen) or "sigmoid" (sigmoid plus the correction bias `correction_e`, within the
    topk_group best of n_group groups)."""

    kind: str
    k: int
    correction_e: np.ndarray | None = None
    n_group: int = 1
    topk_group: int = 1

    def scores(self, logits_ne: np.ndarray) -> np.ndarray:
        """The selection scores, float64 [n, E]."""
        z = np.asarray(logits_ne, np.float64)
        if self.kind == "softmax":
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        if self.kind == "topk_softmax":
            return z
        bias = 0.0 if self.correction_e is None else np.asarray(self.correction_e, np.float64)
        return 1.0 / (1.0 + np.exp(-z)) + bias


@dataclasses.dataclass
class Flips:
    """The tokens (indices into the n compared) whose expert sets differ, with their classification."""

    token: np.ndarray  # [f] int
    kind: np.ndarray  # [f] TIE, EXACT_TIE or OTHER
    gap: np.ndarray  # [f] the largest distance of a differing expert (or group) from the boundary
    window: np.ndarray  # [f] the window it had to lie within
    logit_diff: np.ndarray  # [f] delta, the largest router-logit difference at the token
    boundary: np.ndarray  # [f] tau, the reference's k-th selected score

    @property
    def ties(self) -> np.ndarray:
        return self.kind != OTHER


def differing(ids_a_nk: np.ndarray, ids_b_nk: np.ndarray) -> np.ndarray:
    """[n] bool: the two expert sets differ (order ignored)."""
    return np.any(np.sort(ids_a_nk, axis=-1) != np.sort(ids_b_nk, axis=-1), axis=-1)


def classify_flips(rule: RouterRule, logits_ref_ne, ids_ref_nk, logits_got_ne, ids_got_nk,
                   max_logit_diff: float = np.inf) -> Flips:
    """Every token whose sets differ, classified as a near tie, an exact tie or another flip (module docstring)."""
    ids_ref_nk, ids_got_nk = np.asarray(ids_ref_nk), np.asarray(ids_got_nk)
    tokens = np.flatnonzero(differing(ids_ref_nk, ids_got_nk))
    columns = {name: [] for name in ("kind", "gap", "window", "logit_diff", "boundary")}
    if len(tokens):
        scores = rule.scores(np.asarray(logits_ref_ne)[tokens])
        delta = np.abs(np.asarray(logits_got_ne, np.float64)[tokens]
                       - np.asarray(logits_ref_ne, np.float64)[tokens]).max(-1)
        for row, t in enumerate(tokens):
            kind, gap, window, tau = _classify(rule, scores[row], set(ids_ref_nk[t].tolist()),
                                               set(ids_got_nk[t].tolist()), delta[row])
            if kind != OTHER and not delta[row] <= max_logit_diff:
                kind = OTHER
            for name, value in zip(columns, (kind, gap, window, delta[row], tau), strict=True):
                columns[name].append(value)
    return Flips(token=tokens, kind=np.array(columns["kind"], dtype=object),
                 **{name: np.array(values, np.float64) for name, values in columns.items() if name != "kind"})


def _classify(rule: RouterRule, s_e: np.ndarray, ref: set, got: set, delta: float) -> tuple[str, float, float, float]:
    """(kind, gap, window, tau) for one token's flip."""
    tau = min(s_e[e] for e in ref)
    if rule.kind == "softmax":
        floor = 8 * UNIT_ROUNDOFF * tau
        window = tau * np.expm1(4 * delta) + floor
    elif rule.kind == "topk_softmax":  # each logit moves by at most delta, a difference of two by 2 delta
        floor = 8 * UNIT_ROUNDOFF * max(1.0, abs(tau))
        window = 2 * delta + floor
    else:
        floor = 8 * UNIT_ROUNDOFF * max(1.0, abs(tau))
        window = delta / 2 + floor
    if rule.kind == "sigmoid" and rule.n_group > 1:
        group_e = np.arange(len(s_e)) // (len(s_e) // rule.n_group)
        group_scores = np.sort(s_e.reshape(rule.n_group, -1), axis=-1)[:, -2:].sum(-1)
        chosen = list(dict.fromkeys(int(group_e[e]) for e in ref))
        for g in np.argsort(-group_scores, kind="stable"):
            if len(chosen) >= rule.topk_group:
                break
            if int(g) not in chosen:
                chosen.append(int(g))
        added = sorted({int(group_e[e]) for e in got} - set(chosen))
        if added:  # another group was chosen: the groups' scores decide, then any expert of them may differ
            gamma = min(group_scores[g] for g in chosen)
            group_floor = 16 * UNIT_ROUNDOFF * max(2.0, abs(gamma))
            gap = max(abs(group_scores[g] - gamma) for g in added)
            group_window = delta + group_floor
            kind = (EXACT_TIE if gap <= group_floor else TIE) if gap <= group_window else OTHER
            return kind, gap, group_window, tau
    gap = max(abs(s_e[e] - tau) for e in ref ^ got)
    kind = (EXACT_TIE if gap <= floor else TIE) if gap <= window else OTHER
    return kind, gap, window, tau


def router_rules(model) -> list[RouterRule]:
    """Each MoE layer's selection rule for a moejax model, in MoE-layer order, with its own correction bias
    (sigmoid routers)."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    if cfg.router_kind != "sigmoid":
        return [RouterRule(cfg.router_kind, k) for _ in cfg.moe_layers]
    moe_row = {layer: row for row, layer in enumerate(cfg.moe_layers)}
    biases: dict[int, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        located = layer_position(path)
        if located is None or located[2][-1] != "correction_e":
            continue
        segment, unit, _ = located
        for repeat, layer in enumerate(model.layers.layer_ids[segment][unit]):
            biases[moe_row[layer]] = np.asarray(var[...][repeat], np.float64)
    return [RouterRule("sigmoid", k, biases[row], *cfg.router_groups) for row in range(len(cfg.moe_layers))]
