"""The near-tie rule (moejax.parity.ties) against a plain numpy implementation of the boundary test, and what it
must guarantee: a flip produced by logit noise within delta is never called an error, and a flip produced by a
wrong selection (exact logits) is never called a tie.

The naive implementation below restates the rule token by token with loops, from the definitions alone: the
reference's selection scores (softmax, the raw logits of a top-k-then-softmax router, or sigmoid plus correction
bias with the group limit), its k-th selected score tau, the largest logit difference delta, windows
tau (e^{4 delta} - 1), 2 delta (raw logits) and delta / 2 (delta for group scores) plus floors of 8 (16 for groups)
float32 unit roundoffs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moejax.parity.ties import EXACT_TIE, OTHER, TIE, RouterRule, classify_flips

U = 2.0 ** -24


def naive(kind, k, bias, n_group, topk_group, z_ref, ids_ref, z_got, ids_got, max_logit_diff=math.inf):
    """{token: kind} for every token whose sets differ."""
    out = {}
    for t in range(len(z_ref)):
        ref, got = set(ids_ref[t].tolist()), set(ids_got[t].tolist())
        if ref == got:
            continue
        z = [float(v) for v in z_ref[t]]
        if kind == "softmax":
            top = max(z)
            exps = [math.exp(v - top) for v in z]
            s = [v / sum(exps) for v in exps]
        elif kind == "topk_softmax":
            s = z
        else:
            s = [1 / (1 + math.exp(-v)) + float(b) for v, b in zip(z, bias, strict=True)]
        delta = max(abs(float(a) - float(b)) for a, b in zip(z_got[t], z_ref[t], strict=True))
        tau = min(s[e] for e in ref)
        if kind == "softmax":
            floor, window = 8 * U * tau, tau * (math.exp(4 * delta) - 1) + 8 * U * tau
        elif kind == "topk_softmax":  # two raw logits, each moved by at most delta
            floor = 8 * U * max(1.0, abs(tau))
            window = 2 * delta + floor
        else:
            floor = 8 * U * max(1.0, abs(tau))
            window = delta / 2 + floor
        verdict = None
        if kind == "sigmoid" and n_group > 1:
            size = len(s) // n_group
            group_score = [sum(sorted(s[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
            chosen = []
            for e in ids_ref[t]:
                if e // size not in chosen:
                    chosen.append(e // size)
            for g in sorted(range(n_group), key=lambda g: -group_score[g]):
                if len(chosen) < topk_group and g not in chosen:
                    chosen.append(g)
            added = {e // size for e in got} - set(chosen)
            if added:
                gamma = min(group_score[g] for g in chosen)
                gfloor = 16 * U * max(2.0, abs(gamma))
                gap = max(abs(group_score[g] - gamma) for g in added)
                verdict = OTHER if gap > delta + gfloor else EXACT_TIE if gap <= gfloor else TIE
        if verdict is None:
            gap = max(abs(s[e] - tau) for e in ref ^ got)
            verdict = OTHER if gap > window else EXACT_TIE if gap <= floor else TIE
        if verdict != OTHER and delta > max_logit_diff:
            verdict = OTHER
        out[t] = verdict
    return out


def sigmoid_choice(z, bias, k, n_group, topk_group):
    """Nemotron-H's selection in float64 (the reference algorithm)."""
    s = 1 / (1 + np.exp(-z)) + bias
    if n_group > 1:
        grouped = s.reshape(len(s), n_group, -1)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, -1, kind="stable")[:, :topk_group]
        mask = np.zeros_like(group_score, bool)
        np.put_along_axis(mask, keep, True, -1)
        s = np.where(mask[..., None], grouped, -np.inf).reshape(len(s), -1)
    return np.argsort(-s, -1, kind="stable")[:, :k]


def softmax_choice(z, k):
    return np.argsort(-z, -1, kind="stable")[:, :k]


# Repeated bias values, so that equal logits give equal scores (exact ties) under the sigmoid rule too.
RULES = [RouterRule("softmax", 3), RouterRule("sigmoid", 3, np.repeat([-0.125, 0.0, 0.125, 0.25], 2)),
         RouterRule("sigmoid", 4, np.tile([0.0, 0.0, 0.125, 0.125], 4), n_group=4, topk_group=2),
         RouterRule("topk_softmax", 3)]
RULE_IDS = ["softmax", "sigmoid", "sigmoid-groups", "topk-softmax"]


def boundary_logits(rng, tokens, experts):
    """Logits on a coarse grid (many exact ties at the top-k boundary), some moved by ~1e-5 (near ties whose
    score gap exceeds the float floor)."""
    z = np.round(rng.normal(size=(tokens, experts)) * 8) / 8
    return z + np.where(rng.random(z.shape) < 0.5, rng.normal(size=z.shape) * 1e-5, 0.0)


def choose(rule, z):
    if rule.kind in ("softmax", "topk_softmax"):  # the softmax keeps the logits' order
        return softmax_choice(z, rule.k)
    return sigmoid_choice(z, rule.correction_e, rule.k, rule.n_group, rule.topk_group)


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("noise", [1e-4, 1e-2, 0.3])
def test_rule_equals_the_naive_boundary_test(rule, noise):
    """Random logits, the other side's logits moved by noise of several sizes (small: mostly ties; large:
    mostly other flips) and chosen by the same algorithm: every classification equals the loop version's."""
    rng = np.random.default_rng(int(noise * 1e6) + rule.k)
    experts = len(rule.correction_e) if rule.correction_e is not None else 8
    z_ref = boundary_logits(rng, 4000, experts)
    z_got = z_ref + rng.uniform(-noise, noise, z_ref.shape)
    ids_ref, ids_got = choose(rule, z_ref), choose(rule, z_got)
    flips = classify_flips(rule, z_ref, ids_ref, z_got, ids_got)
    want = naive(rule.kind, rule.k, rule.correction_e if rule.correction_e is not None else np.zeros(experts),
                 rule.n_group, rule.topk_group, z_ref, ids_ref, z_got, ids_got)
    assert sorted(want) == flips.token.tolist() and len(want) > 0
    assert [want[t] for t in flips.token] == flips.kind.tolist()


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_noise_within_delta_is_always_a_tie(rule):
    """Soundness: both sides' selections made by the correct algorithm from logits that differ by at most 1e-4
    (summation noise, scaled up), at tokens full of exact and near ties: no flip is ever called an error."""
    rng = np.random.default_rng(1)
    experts = len(rule.correction_e) if rule.correction_e is not None else 8
    z_ref = boundary_logits(rng, 20000, experts)
    z_got = z_ref + rng.uniform(-1e-4, 1e-4, z_ref.shape)
    ids_ref, ids_got = choose(rule, z_ref), choose(rule, z_got)
    flips = classify_flips(rule, z_ref, ids_ref, z_got, ids_got)
    kinds = flips.kind.tolist()
    assert len(kinds) > 50 and set(kinds) == {TIE, EXACT_TIE}


@pytest.mark.parametrize("wrong", ["bias_scaled", "groups_ignored", "k_plus_one_dropped"])
def test_wrong_selection_with_exact_logits_is_never_a_tie(wrong):
    """Completeness: the same logits on both sides, a wrong selection on one: every flip is an error."""
    rule = RULES[2]
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5000, 16))
    ids_ref = choose(rule, z)
    if wrong == "bias_scaled":
        ids_got = sigmoid_choice(z, 2 * rule.correction_e, rule.k, rule.n_group, rule.topk_group)
    elif wrong == "groups_ignored":
        ids_got = sigmoid_choice(z, rule.correction_e, rule.k, 1, 1)
    else:  # the k-th expert replaced by the (k+1)-th
        ids_got = sigmoid_choice(z, rule.correction_e, rule.k + 1, rule.n_group, rule.topk_group)[:, [0, 1, 2, 4]]
    flips = classify_flips(rule, z, ids_ref, z + rng.uniform(-1e-7, 1e-7, z.shape), ids_got)
    assert len(flips.token) > 50
    tie_share = np.mean(flips.kind != OTHER)
    assert tie_share < 0.01, tie_share


def test_flip_beyond_the_logit_bound_is_not_a_tie():
    """A token whose router logits already differ by more than the bound cannot be a near tie."""
    rule = RouterRule("softmax", 1)
    z_ref = np.array([[1.0, 1.0, -3.0]])
    z_got = np.array([[1.0, 1.0 + 2e-3, -3.0]])
    ids_ref, ids_got = np.array([[0]]), np.array([[1]])
    assert classify_flips(rule, z_ref, ids_ref, z_got, ids_got).kind.tolist() == [EXACT_TIE]
    assert classify_flips(rule, z_ref, ids_ref, z_got, ids_got, max_logit_diff=1e-3).kind.tolist() == [OTHER]
    # the same gap, but now explained only by delta: a near tie within e^{4 delta} - 1
    z_ref = np.array([[1.0 + 1e-3, 1.0, -3.0]])
    flips = classify_flips(rule, z_ref, ids_ref, z_ref + np.array([[0, 2e-3, 0]]), ids_got)
    assert flips.kind.tolist() == [TIE] and flips.gap[0] <= flips.window[0]
    assert classify_flips(rule, z_ref, ids_ref, z_ref + np.array([[0, 1e-4, 0]]), ids_got).kind.tolist() == [OTHER]


@pytest.mark.parametrize("noise", [1e-7, 1e-3])
def test_wrong_top_k_of_logits_is_never_a_tie(noise):
    """GPT-OSS's rule (top-k of the raw logits): the k-th expert replaced by the (k+1)-th, with the logits equal up to
    float32 noise or up to bfloat16-sized noise, is an error at almost every flipped token, never a tie by default."""
    rule = RouterRule("topk_softmax", 4)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5000, 16))
    ids_ref = softmax_choice(z, rule.k)
    ids_got = softmax_choice(z, rule.k + 1)[:, [0, 1, 2, 4]]
    flips = classify_flips(rule, z, ids_ref, z + rng.uniform(-noise, noise, z.shape), ids_got)
    assert len(flips.token) == 5000
    assert np.mean(flips.kind != OTHER) < (0.01 if noise < 1e-5 else 0.02)
