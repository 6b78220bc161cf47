"""report.md: the findings in numbers, with the figures inline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_report(path: Path, tables: dict, settings: dict, figures: dict[str, str]) -> None:
    ref = tables["reference"]
    lines = ["# Routing analysis", ""]
    lines += [f"Languages: {', '.join(settings['langs'])} (reference: {ref}). Corpus: {settings['data']}; "
              f"chunks: {settings['chunking']['mode']}, ~{settings['chunking']['words']} words. "
              f"Routing probabilities: {settings['probabilities']} of the raw router logits.", ""]
    lines += ["| model | type | MoE layers | experts | top-K | tokens per language | excluded token ids |",
              "|---|---|---|---|---|---|---|"]
    for name, m in settings["models"].items():
        tokens = ", ".join(f"{lang} {n}" for lang, n in m["tokens"].items())
        lines.append(f"| {name} | {m['model_type']} | {len(m['moe_blocks'])} | {m['experts']} | {m['top_k']} | "
                     f"{tokens} | {len(m['excluded_token_ids'])} ids |")
    lines += ["", "## Deep-layer collapse", "",
              "Mean over the deepest quarter of MoE layers minus the mean over the middle half. A collapse shows "
              "as an entropy drop and a Gini rise larger than the reference language's. The noise floor is the "
              "mean per-layer gap between two random halves of the same language's chunks.", "",
              "| model | language | Δ usage entropy (bits) | Δ Gini | noise floor entropy | noise floor Gini |",
              "|---|---|---|---|---|---|"]
    for name, s in settings["summary"].items():
        for lang, c in s["collapse"].items():
            nf = s["noise_floor"][lang]
            lines.append(f"| {name} | {lang} | {c['usage_entropy_bits']:+.3f} | {c['gini']:+.3f} | "
                         f"{nf['usage_entropy_bits']:.3f} | {nf['gini']:.3f} |")
    lines += ["", f"![usage entropy per layer]({figures['entropy']})", "",
              f"![Gini and active experts per layer]({figures['gini_active']})", "",
              f"![usage of each expert per layer and language]({figures['usage']})", "", "## Language specialisation",
              ""]
    for name, s in settings["summary"].items():
        for pair, sweep in s["lsi_sweep"].items():
            t = sweep["0.1"]
            a, b = pair.split("-")
            lines.append(f"- {name}, {pair}: at theta 0.1, {t['a_specific']} experts are {a}-specific, "
                         f"{t['b_specific']} {b}-specific, {t['shared']} shared (sensitivity: "
                         + "; ".join(f"theta {th}: {c['a_specific']}/{c['b_specific']}/{c['shared']}"
                                     for th, c in sweep.items()) + ").")
            flags = s["flags"][pair]
            lines.append(f"  Layers where the {pair} usage-entropy gap exceeds one std across chunks: "
                         f"{flags if flags else 'none'}.")
    lines += ["", f"![LSI]({figures['lsi']})" if "lsi" in figures else "(one language: no LSI)", "",
              "## Cross-lingual similarity", ""]
    for name in settings["models"]:
        for a, b in sorted({(r["lang_a"], r["lang_b"]) for r in tables["pairs"] if r["model"] == name}):
            rows = [r for r in tables["pairs"] if r["model"] == name and r["lang_a"] == a and r["lang_b"] == b]
            cos = np.array([r["cosine"] for r in rows])
            njsd = np.array([r["njsd"] for r in rows])
            lines.append(f"- {name}, {a}-{b}: cosine of usage {cos.mean():.3f} on average (lowest {cos.min():.3f} at "
                         f"MoE layer {int(cos.argmin())}); nJSD {njsd.mean():.3f} on average (highest {njsd.max():.3f} "
                         f"at MoE layer {int(njsd.argmax())}).")
    lines += ["", f"![cosine per layer]({figures['cosine']})", "", f"![divergence per layer]({figures['njsd']})", "",
              "## Tokenisation", "", "| model | language | tokens | tokens per char | tokens per segment |",
              "|---|---|---|---|---|"]
    for name, s in settings["summary"].items():
        for lang, t in s["tokenization"].items():
            lines.append(f"| {name} | {lang} | {int(t['tokens'])} | {t['tokens_per_char']:.3f} | "
                         f"{t['tokens_per_segment']:.3f} |")
    lines += ["", "Tables: layers.csv, experts.csv, pairs.csv, lsi.csv; settings and summaries: metrics.json.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
