"""The bounds a parity run is judged by, the checks that apply them, and the per-block and per-group tables.

Two parts, whatever moejax's dtype:
- the implementation check, in float32 (each block alone on the reference's own input, the head on its last block
  output): fixed bounds, far below any error that matters, so a wrong moejax fails it even when its run is in
  16 bits;
- the end-to-end comparison in moejax's dtype: in float32 against fixed bounds; in 16 bits calibrated, against
  transformers' own 16-bit error on the same tokens, at the mean, median, 99th percentile and maximum.
"""

from __future__ import annotations

import math

import numpy as np

from moejax.parity.tally import STATISTICS, ImplementationTally, statistic
from moejax.parity.tolerances import Tolerances
from moejax.routing import metrics as M


def _or_inf(bound: float | None) -> float:
    return np.inf if bound is None else bound


def _multiple(bounds: Tolerances, stat: str) -> float | None:
    return getattr(bounds, f"calibration_{stat}")


def layer_rows(cfg, tallies, bounds: Tolerances, unit: float | None) -> list[dict]:
    """layers.csv: per block the implementation check's figures, moejax's end-to-end hidden-state difference and
    per MoE layer its routing figures; calibrated, also the 16-bit reference's per-token statistics and the bounds
    they give."""
    side, reference, impl = tallies.moejax, tallies.reference, tallies.implementation
    rows = []
    moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
    k = cfg.num_experts_per_tok
    for block, kind in enumerate(cfg.layer_kinds):
        tally, update = side.blocks[block], impl.blocks[block]
        row = {"block": block, "kind": kind, "tokens_compared": tally.tokens,
               "impl_update_relative": update.relative, "impl_update_token_max": update.token_max,
               "impl_tokens": update.tokens, "impl_bound": bounds.impl_block_relative,
               "hidden_relative_diff": tally.relative, "hidden_max_abs_diff": tally.max_abs}
        row |= {f"hidden_{s}": tally.stat(s) for s in STATISTICS}
        if reference is None:
            row["hidden_bound"] = bounds.hidden_relative
        else:
            theirs = reference.blocks[block]
            for s in STATISTICS:
                row[f"hidden_{s}_reference"] = theirs.stat(s)
                row[f"hidden_{s}_bound"] = _or_inf(_multiple(bounds, s)) * max(theirs.stat(s), unit)
        if block in moe_index:
            j = moe_index[block]
            r, ir = side.routing[j], impl.routing[j]
            f_ref, f_got = M.usage_fractions(r.counts_ref, k), M.usage_fractions(r.counts_got, k)
            row |= {"moe_layer": j, "impl_router_relative": ir.relative, "impl_router_max_abs": ir.max_abs,
                    "impl_ties": ir.ties, "impl_exact_ties": ir.exact_ties, "impl_other_flips": ir.other_flips,
                    "impl_near_tie_rate": ir.near_tie_rate, "impl_forced_tokens": ir.forced,
                    "router_logit_max_abs_diff": r.max_abs,
                    "router_logit_mean_abs_diff": r.sum_abs / max(r.entries, 1),
                    "router_logit_relative_diff": r.relative,
                    "expert_set_agreement": r.agreement(), "expert_jaccard_mean": r.jaccard_sum / max(r.total, 1)}
            row |= {f"router_logit_{s}": r.stat(s) for s in STATISTICS}
            if reference is None:
                row |= {"ties": r.ties, "exact_ties": r.exact_ties, "near_tie_rate": r.near_tie_rate,
                        "other_flips": r.other_flips, "forced_tokens": r.forced}
            else:
                theirs = reference.routing[j]
                for s in STATISTICS:
                    row[f"router_logit_{s}_reference"] = theirs.stat(s)
                    row[f"router_logit_{s}_bound"] = _or_inf(_multiple(bounds, s)) * max(theirs.stat(s), unit)
                row |= {"expert_set_agreement_reference": theirs.agreement(),
                        "expert_set_agreement_bound": 1 - allowed_misses(bounds.calibration_mean, theirs.misses)
                        / max(r.total, 1)}
            row |= {"usage_entropy_bits_reference": float(M.usage_entropy_bits(f_ref)),
                    "usage_entropy_bits_moejax": float(M.usage_entropy_bits(f_got)),
                    "gini_reference": float(M.gini(r.counts_ref)), "gini_moejax": float(M.gini(r.counts_got))}
        rows.append(row)
    return rows


def allowed_misses(m: float | None, reference_misses: int) -> float:
    """Tokens moejax may get wrong (another argmax, another expert set) where the 16-bit reference got
    `reference_misses` wrong: m times as many, plus three Poisson standard deviations (such misses are rare,
    discrete events, and a short run sees few of them)."""
    if m is None:
        return np.inf
    expected = m * max(reference_misses, 1)
    return expected + 3 * math.sqrt(expected)


def _token_figures(kl_n: np.ndarray, top1_n: np.ndarray, relative_n: np.ndarray, clean_n: np.ndarray) -> dict:
    """The per-token statistics over the clean tokens (no routing flip on either side; all of them in float32), and
    top-1 agreement over every token."""
    figures = {f"kl_{s}": statistic(kl_n[clean_n], s) for s in STATISTICS}
    figures |= {f"logits_{s}": statistic(relative_n[clean_n], s) for s in STATISTICS}
    return figures | {"top1_agreement": float(top1_n.mean()) if len(kl_n) else float("nan"),
                      "tokens_in_statistics": int(clean_n.sum())}


def group_rows(tallies) -> list[dict]:
    """groups.csv: overall and per group, the end-to-end token figures (and, calibrated, the 16-bit reference's),
    the implementation check's head figures, and the mean and worst expert-set agreement over the MoE layers."""
    side, reference, impl = tallies.moejax, tallies.reference, tallies.implementation
    kl_n, top1_n, group_n, rel_n, clean_n = side.logits.per_token()
    theirs = reference.logits.per_token() if reference is not None else None
    impl_kl, impl_top1, _, impl_rel, impl_clean = impl.logits.per_token()
    rows = []
    for group in [None, *dict.fromkeys(group_n)]:
        here = np.ones(len(kl_n), bool) if group is None else group_n == group
        row = {"group": group or "all", "tokens": int(here.sum())}
        row |= _token_figures(kl_n[here], top1_n[here], rel_n[here], clean_n[here])
        if theirs is not None:
            figures = _token_figures(theirs[0][here], theirs[1][here], theirs[3][here], theirs[4][here])
            row |= {f"{name}_reference": value for name, value in figures.items() if name != "tokens_in_statistics"}
        row |= {f"impl_{name}": value for name, value in
                _token_figures(impl_kl[here], impl_top1[here], impl_rel[here], impl_clean[here]).items()
                if name != "tokens_in_statistics"}
        if side.routing:
            agreements = [r.agreement(group) for r in side.routing]
            row |= {"expert_set_agreement_mean": float(np.mean(agreements)),
                    "expert_set_agreement_min": float(np.min(agreements))}
        rows.append(row)
    return rows


def where(row: dict) -> str:
    return f" (block {row['block']}" + (f", MoE layer {row['moe_layer']})" if "moe_layer" in row else ")")


def _check(section: str, name: str, value: float, op: str, bound: float | None, what: str) -> dict:
    """A NaN value fails any bound."""
    passed = True if bound is None else bool(value >= bound if op == ">=" else value <= bound)
    return {"section": section, "check": name, "value": value, "op": op, "tolerance": bound, "what": what,
            "passed": passed}


def _worst(rows: list[dict], column: str, lowest: bool = False) -> dict:
    """The row with the worst value of `column` (the highest, or the lowest), a NaN being the worst of all."""
    def badness(row):
        value = row[column]
        return math.inf if math.isnan(value) else (-value if lowest else value)
    return max(rows, key=badness)


def _ratio(value: float, bound: float) -> float:
    """value / bound, NaN as the worst."""
    return np.inf if np.isnan(value) else value / max(bound, 1e-300)


def _flip_checks(section: str, bounds: Tolerances, moe: list[dict], tokens: int, prefix: str = "") -> list[dict]:
    """Flips that are not proven near ties (none allowed), and near ties at a rate above float32 rounding's."""
    first = next((r for r in moe if r[prefix + "other_flips"]), None)
    checks = [_check(section, prefix + "other_flips", sum(r[prefix + "other_flips"] for r in moe), "<=",
                     bounds.other_flips, "routing flips that are not proven near ties, all MoE layers"
                     + ("" if first is None else f"; the first in{where(first)}: {first[prefix + 'other_flips']}"))]
    # A single near tie in a short run is not a rate: a layer fails with two or more beyond the bound.
    worst = _worst(moe, prefix + "near_tie_rate")
    allowed = None if bounds.tie_rate is None else max(bounds.tie_rate, 1 / max(tokens, 1))
    checks.append(_check(section, prefix + "tie_rate", worst[prefix + "near_tie_rate"], "<=", allowed,
                         f"near ties per token (not exact ties), worst MoE layer{where(worst)}; "
                         f"{sum(r[prefix + 'ties'] for r in moe)} ties in all, forced and compared"))
    return checks


def implementation_checks(bounds: Tolerances, impl: ImplementationTally, rows: list[dict], tokens: int) -> list[dict]:
    """The implementation check's figures against their bounds; per block and per MoE layer by the worst one."""
    section = "implementation"
    checks = [_check(section, "impl_embedding_relative", impl.embedding.relative, "<=",
                     bounds.impl_embedding_relative, "relative difference of the embeddings")]
    worst = _worst(rows, "impl_update_relative")
    checks.append(_check(section, "impl_block_relative", worst["impl_update_relative"], "<=",
                         bounds.impl_block_relative, "each block alone on the reference's input: ||error|| / "
                         f"||update||, worst block{where(worst)}"))
    worst = _worst(rows, "impl_update_token_max")
    checks.append(_check(section, "impl_block_token_max", worst["impl_update_token_max"], "<=",
                         bounds.impl_block_token_max, "each block alone: the worst token's error over the update's "
                         f"RMS, worst block{where(worst)}"))
    moe = [r for r in rows if "moe_layer" in r]
    if moe:
        worst = _worst(moe, "impl_router_relative")
        checks.append(_check(section, "impl_router_relative", worst["impl_router_relative"], "<=",
                             bounds.impl_router_relative, f"relative router-logit difference, worst MoE layer"
                             f"{where(worst)}"))
        checks += _flip_checks(section, bounds, moe, tokens, prefix="impl_")
    checks.append(_check(section, "impl_logits_relative", impl.logits.logits_relative, "<=",
                         bounds.impl_logits_relative, "the head alone on the reference's last block output: "
                         "max |logit difference| / max |logit|"))
    checks.append(_check(section, "impl_tokens_compared", min(r["impl_tokens"] for r in rows), ">=", tokens,
                         "content tokens compared at every block, of all"))
    return checks


def float32_checks(bounds: Tolerances, overall: dict, rows: list[dict], logits_relative: float) -> list[dict]:
    """End to end in float32: each bounded figure against its tolerance; per block and per layer by the worst."""
    section = "end_to_end"
    moe = [r for r in rows if "moe_layer" in r]
    tokens = overall["tokens"]
    checks = [_check(section, "kl_mean", overall["kl_mean"], "<=", bounds.kl_mean,
                     "mean KL(reference || moejax), nats"),
              _check(section, "kl_p99", overall["kl_p99"], "<=", bounds.kl_p99, "99th percentile of the per-token KL"),
              _check(section, "kl_max", overall["kl_max"], "<=", bounds.kl_max, "largest per-token KL, nats"),
              _check(section, "top1_agreement", overall["top1_agreement"], ">=", bounds.top1_agreement,
                     "tokens with the same argmax"),
              _check(section, "logits_relative", logits_relative, "<=", bounds.logits_relative,
                     "max |logit difference| / max |logit|")]
    worst = _worst(rows, "hidden_relative_diff")
    checks.append(_check(section, "hidden_relative", worst["hidden_relative_diff"], "<=", bounds.hidden_relative,
                         "relative hidden-state difference, worst block" + where(worst)))
    if moe:
        for name, column, op, what in (
                ("router_logit_max_abs", "router_logit_max_abs_diff", "<=", "largest |router logit difference|"),
                ("router_logit_relative", "router_logit_relative_diff", "<=", "relative router-logit difference"),
                ("expert_set_agreement", "expert_set_agreement", ">=",
                 "tokens with identical expert sets (ties count as different)")):
            row = _worst(moe, column, lowest=op == ">=")
            checks.append(_check(section, name, row[column], op, getattr(bounds, name),
                                 f"{what}, worst MoE layer{where(row)}"))
        checks += _flip_checks(section, bounds, moe, tokens)
    checks.append(_check(section, "tokens_compared", min(r["tokens_compared"] for r in rows), ">=", tokens,
                         "content tokens compared at every block, of all"))
    return checks


def calibrated_checks(bounds: Tolerances, unit: float, overall: dict, rows: list[dict]) -> list[dict]:
    """End to end in 16 bits: each per-token error statistic (mean, median, 99th percentile, maximum) of moejax
    against the float32 truth within its multiple of the 16-bit reference's own on the same tokens: per block the
    tokens' relative hidden-state differences, per MoE layer their relative router-logit differences (the worst
    block or layer against its bound), the output logits' relative difference, and the per-token KL (which grows as
    the square of a logit error: the squared multiple, floored at the unit roundoff squared). Misses (argmax,
    expert sets) within the mean multiple plus Poisson noise."""
    section = "end_to_end"
    tokens = overall["tokens"]
    moe = [r for r in rows if "moe_layer" in r]
    checks = []
    for s in STATISTICS:
        m = _multiple(bounds, s)
        ref_kl = overall[f"kl_{s}_reference"]
        checks.append(_check(section, f"kl_{s}", overall[f"kl_{s}"], "<=", None if m is None else
                             m * m * max(ref_kl, unit * unit), f"{s} per-token KL against the float32 truth, nats "
                             f"(16-bit reference: {ref_kl:.3g})"))
        ref = overall[f"logits_{s}_reference"]
        checks.append(_check(section, f"logits_{s}", overall[f"logits_{s}"], "<=", None if m is None else
                             m * max(ref, unit), f"{s} per-token relative logit difference (16-bit reference: "
                             f"{ref:.3g})"))
        worst = max(rows, key=lambda r, s=s: _ratio(r[f"hidden_{s}"], r[f"hidden_{s}_bound"]))
        checks.append(_check(section, f"hidden_{s}", worst[f"hidden_{s}"], "<=",
                             None if m is None else worst[f"hidden_{s}_bound"],
                             f"{s} per-token relative hidden-state difference, worst block against its bound"
                             f"{where(worst)} (16-bit reference: {worst[f'hidden_{s}_reference']:.3g})"))
        if moe:
            worst = max(moe, key=lambda r, s=s: _ratio(r[f"router_logit_{s}"], r[f"router_logit_{s}_bound"]))
            checks.append(_check(section, f"router_logit_{s}", worst[f"router_logit_{s}"], "<=",
                                 None if m is None else worst[f"router_logit_{s}_bound"],
                                 f"{s} per-token relative router-logit difference, worst MoE layer{where(worst)} "
                                 f"(16-bit reference: {worst[f'router_logit_{s}_reference']:.3g})"))
    ref_misses = round((1 - overall["top1_agreement_reference"]) * tokens)
    checks.append(_check(section, "top1_agreement", overall["top1_agreement"], ">=",
                         1 - allowed_misses(bounds.calibration_mean, ref_misses) / max(tokens, 1),
                         f"tokens with the float32 truth's argmax (16-bit reference: "
                         f"{overall['top1_agreement_reference']:.4f})"))
    if moe:
        worst = max(moe, key=lambda r: _ratio(1 - r["expert_set_agreement"], 1 - r["expert_set_agreement_bound"]))
        checks.append(_check(section, "expert_set_agreement", worst["expert_set_agreement"], ">=",
                             worst["expert_set_agreement_bound"], f"tokens with the float32 truth's expert set, worst "
                             f"MoE layer{where(worst)} (16-bit reference: "
                             f"{worst['expert_set_agreement_reference']:.4f})"))
    checks.append(_check(section, "tokens_compared", min(r["tokens_compared"] for r in rows), ">=", tokens,
                         "content tokens compared at every block, of all"))
    return checks


def first_wrong_block(rows: list[dict], bounds: Tolerances) -> dict | None:
    """The first block that fails the implementation check on its own (its update error above the bounds)."""
    for row in rows:
        if not (row["impl_update_relative"] <= _or_inf(bounds.impl_block_relative)
                and row["impl_update_token_max"] <= _or_inf(bounds.impl_block_token_max)
                and row.get("impl_router_relative", 0.0) <= _or_inf(bounds.impl_router_relative)
                and row.get("impl_other_flips", 0) <= _or_inf(bounds.other_flips)):
            return {"block": row["block"], "kind": row["kind"], "update_relative": row["impl_update_relative"],
                    "bound": bounds.impl_block_relative}
    return None


def first_drift_block(rows: list[dict], bounds: Tolerances, calibrated: bool) -> dict | None:
    """The first block whose end-to-end hidden states exceed their bound (calibrated: any statistic's)."""
    for row in rows:
        if calibrated:
            over = [s for s in STATISTICS if not row[f"hidden_{s}"] <= row[f"hidden_{s}_bound"]]
            if over:
                return {"block": row["block"], "kind": row["kind"], "statistic": over[0],
                        "hidden": row[f"hidden_{over[0]}"], "bound": row[f"hidden_{over[0]}_bound"]}
        elif not row["hidden_relative_diff"] <= _or_inf(bounds.hidden_relative):
            return {"block": row["block"], "kind": row["kind"], "statistic": "relative",
                    "hidden": row["hidden_relative_diff"], "bound": bounds.hidden_relative}
    return None


def verdict_checks(mode: str, bounds: Tolerances, tallies, rows: list[dict], overall: dict,
                   unit: float | None) -> list[dict]:
    """Every check of a run: the implementation check's, then the end-to-end ones of its mode."""
    checks = implementation_checks(bounds, tallies.implementation, rows, overall["tokens"])
    if mode == "float32":
        return checks + float32_checks(bounds, overall, rows, tallies.moejax.logits.logits_relative)
    return checks + calibrated_checks(bounds, unit, overall, rows)
