"""report.md: the findings in numbers, with the figures inline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_report(path: Path, tables: dict, settings: dict, figures: dict[str, str]) -> None:
    ref = tables["reference"]
    lines = ["# Routing analysis", ""]
    lines += [f"Languages: {', '.join(settings['langs'])} (reference: {ref}). Corpus: {settings['data']}; "
              f"chunks: {settings['chunking']['mode']}, ~{settings['chunking']['words']} words. "
              f"Routing probabilities: {settings['probabilities']} of the raw router logits. Experts counted: "
              + ("the top-K of softmax(raw router logits), as paper A's hooks on the gate compute them."
                 if settings.get("selection") == "raw" else "the model's own choice.") , ""]
    # --- languages and corpora: parallel or not, and what a corpus that is not parallel cannot give ---
    chosen = settings["parallel"]
    lines += [f"Parallel text: {'yes' if chosen['parallel'] else 'no'} ({chosen['asked']}: {chosen['why']}).", ""]
    lines += [f"Skipped: {metric}: {why}." for metric, why in settings["skipped"].items()]
    lines += [""] if settings["skipped"] else []
    # --- end languages and corpora ---
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
            njsd = np.array([r[tables["divergence"]] for r in rows])  # njsd_pooled when not parallel
            pooled = " (pooled)" if tables["divergence"] == "njsd_pooled" else ""
            lines.append(f"- {name}, {a}-{b}: cosine of usage {cos.mean():.3f} on average (lowest {cos.min():.3f} at "
                         f"MoE layer {int(cos.argmin())}); nJSD{pooled} {njsd.mean():.3f} on average (highest "
                         f"{njsd.max():.3f} at MoE layer {int(njsd.argmax())}).")
    lines += ["", f"![cosine per layer]({figures['cosine']})", "", f"![divergence per layer]({figures['njsd']})", "",
              "## Tokenisation", "", "| model | language | tokens | tokens per char | tokens per segment |",
              "|---|---|---|---|---|"]
    for name, s in settings["summary"].items():
        for lang, t in s["tokenization"].items():
            lines.append(f"| {name} | {lang} | {int(t['tokens'])} | {t['tokens_per_char']:.3f} | "
                         f"{t['tokens_per_segment']:.3f} |")
    lines += language_lines(tables, figures)
    extra = ", divergence_scores.csv" if "divergence_scores" in tables else ""
    lines += ["", f"Tables: layers.csv, experts.csv, pairs.csv, lsi.csv, languages.csv{extra}; settings and summaries: "
              "metrics.json.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _middle(rows: list[dict]) -> list[dict]:
    """The middle half of a model's MoE layers (paper b's language-universal zone, as the collapse summary cuts it)."""
    n = len(rows)
    return rows[n // 4: n - n // 4] if n >= 4 else rows


def language_lines(tables: dict, figures: dict[str, str]) -> list[str]:
    """The report's sections on paper c's language-level metrics and, with --scores, paper b's divergence-score
    correlation."""
    ref = tables["reference"]
    models = list(dict.fromkeys(r["model"] for r in tables["languages"]))
    lines = ["", "## Language-level routing", "",
             "IG(L;E)/H(L): the share of the uncertainty about a token's language that its chosen expert removes (0: "
             "every language uses the experts alike; 1: each expert serves one language). JSD: the Jensen-Shannon "
             "divergence (nats) between two languages' expert-usage distributions, averaged over language pairs. "
             "Both from per-language totals (docs/metrics.md).", "",
             "| model | IG/H(L), first MoE layer | middle layers | last | highest (layer) | mean JSD, first | "
             "middle | last |", "|---|---|---|---|---|---|---|---|"]
    for model in models:
        rows = [r for r in tables["languages"] if r["model"] == model]
        ig = np.array([r["ig_norm"] for r in rows])
        jsd = np.array([r["mean_jsd"] for r in rows])
        middle = _middle(rows)
        lines.append(f"| {model} | {ig[0]:.3f} | {np.mean([r['ig_norm'] for r in middle]):.3f} | {ig[-1]:.3f} | "
                     f"{ig.max():.3f} ({int(ig.argmax())}) | {jsd[0]:.4f} | "
                     f"{np.mean([r['mean_jsd'] for r in middle]):.4f} | {jsd[-1]:.4f} |")
    lines += ["", f"![IG and JSD per layer]({figures['languages']})", "", "### Vocabulary overlap", "",
              "Jaccard overlap of the token ids each language's text used, against the JSD of the pair's expert usage "
              "at the last MoE layer.", "",
              "| model | pair | overlap (Jaccard) | overlap (weighted) | JSD, last layer |", "|---|---|---|---|---|"]
    for model in models:
        last = [r for r in tables["languages"] if r["model"] == model][-1]
        for r in tables["pairs"]:
            if r["model"] == model and r["layer"] == last["layer"]:
                lines.append(f"| {model} | {r['lang_a']}-{r['lang_b']} | {r['vocab_jaccard']:.3f} | "
                             f"{r['vocab_weighted']:.3f} | {r['jsd']:.4f} |")
    lines.append("")
    for model in models:
        last = [r for r in tables["languages"] if r["model"] == model][-1]
        if not np.isfinite(last["vocab_jsd_pearson_r"]):
            lines.append(f"- {model}: no correlation over {last['vocab_pairs']} language pair(s): it needs 3 pairs "
                         "(3 languages) whose overlaps and JSDs are not all equal.")
            continue
        lines.append(f"- {model}: Pearson r between overlap and JSD over {last['vocab_pairs']} pairs at MoE layer "
                     f"{last['layer']}: {last['vocab_jsd_pearson_r']:.3f} (p = {last['vocab_jsd_pearson_p']:.3g}); "
                     "per layer in languages.csv.")
    lines += ["", f"![vocabulary overlap against JSD]({figures['vocabulary']})"]
    if "divergence_scores" not in tables:
        return lines
    lines += ["", f"## Divergence from {ref} and downstream scores", "",
              f"Per MoE layer, the correlation over the scored languages between their routing divergence from {ref} "
              f"({tables.get('divergence', 'njsd')} of pairs.csv) and their score. Paper b finds it strongly negative "
              "in the middle layers.", ""]
    for model, used in tables["scores"].items():
        rows = [r for r in tables["divergence_scores"] if r["model"] == model]
        middle = [r["pearson_r"] for r in _middle(rows)]
        strongest = min(rows, key=lambda r: r["pearson_r"] if np.isfinite(r["pearson_r"]) else np.inf)
        lines.append(f"- {model}: {used['score']} from {used['file']} for {rows[0]['langs']} (n = {rows[0]['n']}); "
                     f"Pearson r {np.nanmean(middle) if np.isfinite(middle).any() else float('nan'):.3f} on "
                     f"average over the middle layers, lowest {strongest['pearson_r']:.3f} at MoE layer "
                     f"{strongest['layer']} (p = {strongest['pearson_p']:.3g}).")
    lines += ["", f"![divergence from {ref} per layer, coloured by score]({figures['u_curve']})"]
    return lines
