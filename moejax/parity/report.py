"""A parity run's verdict as data (summary.json, layers.csv, groups.csv, flips.csv, a figure) and as text."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from moejax.io import output_directory, versions, write_csv
from moejax.parity.compare import FLIP_COLUMNS
from moejax.parity.tolerances import UNIT_ROUNDOFF, Tolerances
from moejax.parity.verdict import first_drift_block, first_wrong_block, group_rows, layer_rows, verdict_checks
from moejax.report.figures import drift_figure


@dataclasses.dataclass
class ParityResult:
    passed: bool
    summary: dict
    layers: list[dict]
    groups: list[dict]
    flips: list[dict]
    out: Path | None = None


def judge(cfg, tallies, bounds: Tolerances, *, mode: str, dtype: str, calibration_dtype: str | None,
          info: dict) -> ParityResult:
    """The verdict of a run from its tallies: the per-block and per-group tables, every check, and the summary
    (`info`: what the run compared, merged into it)."""
    unit = UNIT_ROUNDOFF[calibration_dtype] if mode == "calibrated" else None
    rows = layer_rows(cfg, tallies, bounds, unit)
    groups = group_rows(tallies)
    checks = verdict_checks(mode, bounds, tallies, rows, groups[0], unit)
    passed = all(c["passed"] for c in checks)
    routing, impl_routing = tallies.moejax.routing, tallies.implementation.routing
    summary = {
        "verdict": "pass" if passed else "fail", "mode": mode, "model_type": cfg.model_type, "dtype": dtype,
        "reference_dtype": "float32", "calibration_dtype": calibration_dtype, "jax_backend": jax.default_backend(),
        "tokens": groups[0]["tokens"], "tokens_compared": min(r["tokens_compared"] for r in rows),
        "top_k": cfg.num_experts_per_tok,
        "ties": sum(r.ties for r in routing), "exact_ties": sum(r.exact_ties for r in routing),
        "other_flips": sum(r.other_flips for r in routing), "forced_tokens": sum(r.forced for r in routing),
        "impl_ties": sum(r.ties for r in impl_routing), "impl_other_flips": sum(r.other_flips for r in impl_routing),
        "impl_forced_tokens": sum(r.forced for r in impl_routing),
        "flips": len(tallies.flips), **info,
        "overall": groups[0], "groups": groups[1:], "checks": checks, "tolerances": dataclasses.asdict(bounds),
        "first_wrong_block": first_wrong_block(rows, bounds),
        "first_drift_block": first_drift_block(rows, bounds, mode == "calibrated"),
        "timings": tallies.timings,
    }
    return ParityResult(passed, summary, rows, groups, tallies.flips)


def json_safe(value):
    """NaN and infinities as strings ("NaN", "Infinity", "-Infinity"), so the JSON written stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write(out, inputs, result: ParityResult) -> Path:
    """summary.json, layers.csv, groups.csv, flips.csv and drift_per_layer.png in OUT (an output directory of
    `moejax parity`, replaced as a whole)."""
    summary = result.summary | {"versions": versions("torch", "transformers")}
    with output_directory(out, "parity", inputs) as tmp:
        write_csv(tmp / "layers.csv", result.layers)
        write_csv(tmp / "groups.csv", result.groups)
        write_csv(tmp / "flips.csv", result.flips, columns=FLIP_COLUMNS)
        (tmp / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        drift_figure(tmp / "drift_per_layer.png", result.layers, summary["model"], summary["mode"])
    result.out = Path(out)
    return result.out


def verdict_text(result: ParityResult) -> str:
    """A few lines for the terminal: every check with its bound (the implementation check first), the flips, where
    an error starts, and the verdict."""
    s = result.summary
    against = ("transformers float32" if s["mode"] == "float32" else
               f"transformers float32, calibrated by transformers {s['calibration_dtype']}")
    lines = [f"moejax parity: {s['model']} ({s['model_type']}), moejax {s['dtype']} on {s['jax_backend']} vs "
             f"{against}, {s['tokens']} tokens"]
    titles = {"implementation": "implementation check (float32, each block alone on the reference's input):",
              "end_to_end": f"end to end (moejax {s['dtype']}):"}
    section = None
    for c in s["checks"]:
        if c["section"] != section:
            section = c["section"]
            lines.append(f"  {titles[section]}")
        mark = "ok  " if c["passed"] else "FAIL"
        bound = "(reported)" if c["tolerance"] is None else f"{c['op']} {c['tolerance']:<10.3g}"
        if c["tolerance"] is None:
            mark = "    "
        lines.append(f"    {mark} {c['check']:<24} {c['value']:<10.3g} {bound:<13} {c['what']}")
    for g in s["groups"]:
        extra = (f", expert sets {g['expert_set_agreement_mean']:.2%} (worst layer {g['expert_set_agreement_min']:.2%})"
                 if "expert_set_agreement_mean" in g else "")
        lines.append(f"  reported: {g['group']}: {g['tokens']} tokens, KL mean {g['kl_mean']:.3g}, "
                     f"top-1 {g['top1_agreement']:.2%}{extra}")
    if s["impl_ties"] or s["ties"]:
        lines.append(f"  routing flips proven near ties, forced and compared: {s['impl_ties']} in the implementation "
                     f"check, {s['ties']} end to end" + (" (see flips.csv)" if result.out else ""))
    wrong, drift = s["first_wrong_block"], s["first_drift_block"]
    if wrong:
        lines.append(f"  the implementation differs from block {wrong['block']} ({wrong['kind']}) on: its update "
                     f"{wrong['update_relative']:.3g} relative (bound {wrong['bound']:.3g})")
    if drift:
        lines.append(f"  end to end, drift starts at block {drift['block']} ({drift['kind']}): hidden states "
                     f"{drift['statistic']} {drift['hidden']:.3g} (bound {drift['bound']:.3g})")
    t = s["timings"]
    lines.append(f"  time: moejax {t['moejax_forward_s']:.1f} s (first batch, with compile, "
                 f"{t['moejax_first_batch_s']:.1f} s; {t['moejax_reruns']} reruns with forced ties), implementation "
                 f"check {t['implementation_s']:.1f} s, transformers {t['reference_forward_s']:.1f} s, comparison "
                 f"{t['compare_s']:.1f} s, total {t.get('total_s', 0.0):.1f} s")
    lines.append(f"verdict: {'PASS' if result.passed else 'FAIL'}" + (f" (wrote {result.out})" if result.out else ""))
    return "\n".join(lines)
