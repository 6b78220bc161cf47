"""PNG figures mirroring the published ones; several models side by side (one column each)."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.data.languages import display  # noqa: E402

# One colour per language, the same in every figure and every run: the common codes fixed, any other drawn from
# the rest of the palette by a hash of its code.
_PALETTE = [matplotlib.colormaps["tab20"](i) for i in range(20)]
LANG_COLORS = {"en": _PALETTE[0], "he": _PALETTE[2], "ja": _PALETTE[4], "ar": _PALETTE[6], "zh": _PALETTE[8],
               "de": _PALETTE[10], "fr": _PALETTE[12], "es": _PALETTE[14], "ru": _PALETTE[16], "ko": _PALETTE[18]}


def lang_color(lang: str):
    """The colour of a language, by its display code (he, heb and heb_Hebr share he's colour)."""
    key = display(str(lang)).lower()
    if key in LANG_COLORS:
        return LANG_COLORS[key]
    return _PALETTE[1 + 2 * (zlib.crc32(key.encode()) % 10)]  # the lighter shades: never a fixed language's


def _rows(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _grid(n_models: int, n_rows: int = 1, sharey="row"):
    """Panels compared side by side share their y-axis (per row)."""
    fig, axes = plt.subplots(n_rows, n_models, figsize=(5 * n_models, 3.4 * n_rows), squeeze=False, sharey=sharey)
    return fig, axes


def _per_layer(ax, tables, model, langs, metric, ylabel, with_std=True):
    for lang in langs:
        rows = _rows(tables["layers"], model=model, lang=lang)
        x = [r["layer"] for r in rows]
        y = np.array([r[metric] for r in rows])
        err = np.array([r[f"{metric}_chunk_std"] for r in rows]) if with_std else None
        ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=lang, color=lang_color(lang))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="language", title_fontsize=8)


def entropy_gaps(layer_rows: list[dict], model: str, reference: str, target: str) -> tuple[list[int], list[float]]:
    """(MoE layers, usage-entropy gap per layer) with paper A's sign: reference minus target (English - Hebrew),
    positive where the target's routing is narrower than the reference's (its deep-layer collapse)."""
    base = {r["layer"]: r["usage_entropy_bits"] for r in _rows(layer_rows, model=model, lang=reference)}
    rows = _rows(layer_rows, model=model, lang=target)
    return [r["layer"] for r in rows], [base[r["layer"]] - r["usage_entropy_bits"] for r in rows]


def write_figures(out: Path, tables: dict, runs, langs: list[str]) -> dict[str, str]:
    """Writes the figures into `out`; returns {figure name: file name}."""
    models = [r.name for r in runs]
    written = {}

    ref, targets = tables["reference"], tables["targets"]
    fig, axes = _grid(len(models), 2)
    for col, model in enumerate(models):
        _per_layer(axes[0, col], tables, model, langs, "usage_entropy_bits", "usage entropy (bits)")
        axes[0, col].set_title(f"{model}: usage entropy (bars: 1 std over chunks)", fontsize=9)
        width = 0.8 / max(len(targets), 1)
        for i, target in enumerate(targets):
            layers, gaps = entropy_gaps(tables["layers"], model, ref, target)
            color = lang_color(target)
            axes[1, col].bar(np.asarray(layers) + i * width, gaps, width, label=f"{ref} - {target}", color=color)
            floor = tables["summary"][model]["noise_floor"][target]["usage_entropy_bits"]
            axes[1, col].axhspan(-floor, floor, color=color, alpha=0.12)
        axes[1, col].axhline(0, c="k", lw=0.8)
        axes[1, col].set_xlabel("MoE layer")
        axes[1, col].set_ylabel("entropy gap (bits)")
        axes[1, col].set_title("entropy gap, reference - target (band: noise floor)", fontsize=9)
        if targets:
            axes[1, col].legend(fontsize=8)
    written["entropy"] = save_figure(fig, out, "entropy_per_layer.png")

    fig, axes = _grid(len(models), 2)
    for col, model in enumerate(models):
        _per_layer(axes[0, col], tables, model, langs, "gini", "Gini of top-K counts (0 = even)")
        _per_layer(axes[1, col], tables, model, langs, "active_experts", "active experts (count)", with_std=False)
        axes[0, col].set_title(model, fontsize=9)
    written["gini_active"] = save_figure(fig, out, "gini_active_per_layer.png")

    written["usage"] = usage_heatmap(out, tables, models, langs)

    panels = [(model, target) for model in models for target in targets]
    if panels:
        fig, axes = _grid(len(panels), 3)
        for col, (model, target) in enumerate(panels):
            mean = np.array([r["lsi"] for r in _rows(tables["lsi"], model=model, lang_a=target, layer="mean")])
            order = np.argsort(mean)
            axes[0, col].bar(range(len(mean)), mean[order],
                             color=np.where(mean[order] > 0, "tab:red", "tab:blue"))
            axes[0, col].axhline(0.1, ls="--", c="k", lw=0.8, label="theta = +-0.1")
            axes[0, col].axhline(-0.1, ls="--", c="k", lw=0.8)
            axes[0, col].set_ylim(-1.05, 1.05)
            axes[0, col].set_xlabel("expert (sorted by LSI)")
            axes[0, col].set_ylabel(f"LSI ({target} vs {ref})")
            axes[0, col].legend(fontsize=8)
            axes[0, col].set_title(f"{model}: LSI {target} vs {ref}, mean over MoE layers", fontsize=9)
            axes[1, col].hist(mean, bins=21, range=(-1, 1), color="0.5")
            axes[1, col].set_xlabel("LSI")
            axes[1, col].set_ylabel("experts")
            cats = [int((mean > 0.1).sum()), int((np.abs(mean) <= 0.1).sum()), int((mean < -0.1).sum())]
            axes[2, col].bar([f"{target}-specific", "shared", f"{ref}-specific"], cats,
                             color=[lang_color(target), "0.6", lang_color(ref)])
            axes[2, col].set_ylabel("experts (theta 0.1)")
        written["lsi"] = save_figure(fig, out, "lsi.png")

    pooled = " (pooled: not parallel)" if tables["divergence"] == "njsd_pooled" else ""
    for key, metric, label, name in (("cosine", "cosine", "cosine of usage (f)", "cosine_per_layer.png"),
                                     ("njsd", tables["divergence"], f"normalised JS divergence{pooled}",
                                      "divergence_per_layer.png")):
        fig, axes = _grid(len(models))
        for ax, model in zip(axes[0], models, strict=True):
            pairs = sorted({(r["lang_a"], r["lang_b"]) for r in _rows(tables["pairs"], model=model)})
            for a, b in pairs:
                rows = _rows(tables["pairs"], model=model, lang_a=a, lang_b=b)
                ax.plot([r["layer"] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=f"{a}-{b}",
                        color=lang_color(b if a == ref else a))
            ax.set_xlabel("MoE layer")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=9)
            ax.grid(alpha=0.3)
            if pairs:
                ax.legend(fontsize=8, title="pair", title_fontsize=8)
        written[key] = save_figure(fig, out, name)
    return written


def usage_heatmap(out: Path, tables: dict, models: list[str], langs: list[str]) -> str:
    """usage_heatmap.png: per model (column) and language (row), the share of the top-K assignments each expert gets
    in each MoE layer (layers down, experts across), on one colour scale; its uniform value is 1/E."""
    rows = tables["experts"]
    layers = 1 + max(r["layer"] for r in rows)
    experts = 1 + max(r["expert"] for r in rows)
    grids = {}
    for model in models:
        for lang in langs:
            grid = np.zeros((layers, experts))
            for r in _rows(rows, model=model, lang=lang):
                grid[r["layer"], r["expert"]] = r["topk_fraction"]
            grids[model, lang] = grid
    top = max(float(g.max()) for g in grids.values()) or 1.0
    fig, axes = plt.subplots(len(langs), len(models), squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(max(4.0, 0.09 * experts + 2.5) * len(models), 0.15 * layers * len(langs) + 2))
    for col, model in enumerate(models):
        for row, lang in enumerate(langs):
            ax = axes[row, col]
            image = ax.imshow(grids[model, lang], aspect="auto", cmap="viridis", vmin=0, vmax=top,
                              interpolation="nearest")
            ax.set_title(f"{model}: {lang}", fontsize=9, color=lang_color(lang))
            ax.set_ylabel("MoE layer")
            if row == len(langs) - 1:
                ax.set_xlabel("expert")
    fig.colorbar(image, ax=axes, label=f"share of top-K assignments (uniform: 1/{experts})", shrink=0.8)
    fig.savefig(out / "usage_heatmap.png", dpi=110)
    plt.close(fig)
    return "usage_heatmap.png"


def save_figure(fig, out: Path, name: str) -> str:
    """Lays out, writes OUT/NAME (110 dpi) and closes `fig`; returns NAME."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def drift_figure(path: Path, rows: list[dict], title: str, mode: str) -> None:
    """`moejax parity`'s figure, per block: the implementation check's error (each block alone on the reference's
    input, in float32, relative to its update; bound dashed); the end-to-end hidden-state difference in moejax's
    dtype (float32: relative, against its bound; 16-bit: the mean and maximum per-token difference of moejax and of
    transformers' own 16-bit run); and per MoE block the share of tokens whose expert set differs."""
    fig, (impl, top, bottom) = plt.subplots(3, 1, figsize=(max(6.5, 0.18 * len(rows) + 3), 7.8), sharex=True)
    blocks = np.array([r["block"] for r in rows])
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    calibrated = mode == "calibrated"

    def per_kind(ax, values, **style):
        ax.plot(blocks, values, c="0.6", lw=0.8)
        for i, kind in enumerate(kinds):
            here = np.array([r["kind"] == kind for r in rows])
            ax.scatter(blocks[here], values[here], s=18, marker="os^Dv"[i % 5], label=kind, zorder=3, **style)

    def floor(values):
        return np.maximum(np.array(values, np.float64), 1e-12)

    per_kind(impl, floor([r["impl_update_relative"] for r in rows]))
    bound = rows[0].get("impl_bound")
    if bound is not None:
        impl.axhline(bound, ls="--", c="tab:red", lw=0.9, label="bound")
    impl.set_yscale("log")
    impl.set_ylabel("float32, block alone\n|error| / |update|")
    impl.set_title(f"parity per block: {title}", fontsize=9)
    impl.legend(fontsize=7, ncol=len(kinds) + 1)
    if calibrated:
        for stat, style in (("mean", "-"), ("max", ":")):
            top.plot(blocks, floor([r[f"hidden_{stat}"] for r in rows]), style, c="tab:blue", marker="o", ms=3,
                     label=f"moejax, token {stat}")
            top.plot(blocks, floor([r[f"hidden_{stat}_reference"] for r in rows]), style, c="tab:green",
                     label=f"transformers 16-bit, token {stat}")
            top.plot(blocks, floor([r[f"hidden_{stat}_bound"] for r in rows]), style, c="tab:red", lw=0.8,
                     label=f"bound ({stat})")
        top.set_ylabel("end to end, 16-bit\n|h - h_ref32| / |h_ref32|")
    else:
        per_kind(top, floor([r["hidden_relative_diff"] for r in rows]))
        if rows[0].get("hidden_bound") is not None:
            top.axhline(rows[0]["hidden_bound"], ls="--", c="tab:red", lw=0.9, label="bound")
        top.set_ylabel("end to end, float32\n|h - h_ref| / |h_ref|")
    top.set_yscale("log")
    top.legend(fontsize=7)
    moe = [r for r in rows if "moe_layer" in r]
    bottom.bar([r["block"] for r in moe], [100 * (1 - r["expert_set_agreement"]) for r in moe], color="tab:orange",
               label="moejax, end to end")
    if calibrated and moe:
        bottom.plot([r["block"] for r in moe], [100 * (1 - r["expert_set_agreement_reference"]) for r in moe], "o",
                    c="tab:green", label="transformers 16-bit")
    bottom.legend(fontsize=7)
    bottom.set_ylabel("tokens with another\nexpert set (%)")
    bottom.set_xlabel("block")
    for ax in (impl, top, bottom):
        ax.grid(alpha=0.3)
    save_figure(fig, path.parent, path.name)


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """A run's metrics.csv as float arrays by column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {name: np.array([float(r[name]) if r[name] != "" else np.nan for r in rows]) for name in rows[0]}


def entropy_by_layer(metrics: dict[str, np.ndarray], last_fraction: float = 0.1) -> dict[str, dict[int, float]]:
    """{language: {MoE layer: mean usage entropy (bits) over the last `last_fraction` of the steps}}."""
    steps = len(metrics["step"])
    tail = slice(max(0, steps - max(1, int(round(steps * last_fraction)))), steps)
    out: dict[str, dict[int, float]] = {}
    for name, values in metrics.items():
        if name.startswith("entropy_L"):
            layer, lang = name[len("entropy_L"):].split("_", 1)
            seen = values[tail][np.isfinite(values[tail])]  # a language with no row in those steps: NaN
            out.setdefault(lang, {})[int(layer)] = float(seen.mean()) if len(seen) else float("nan")
    return out


def mean_entropy(metrics: dict[str, np.ndarray], lang: str) -> np.ndarray:
    """Per step, the usage entropy averaged over MoE layers for `lang` (NaN at steps without its rows)."""
    columns = np.stack([v for k, v in metrics.items() if k.startswith("entropy_L") and k.endswith(f"_{lang}")])
    seen = np.isfinite(columns).any(axis=0)
    return np.where(seen, np.nansum(columns, axis=0) / np.maximum(np.isfinite(columns).sum(axis=0), 1), np.nan)


def training_figure(metrics_path: Path, path: Path, title: str = "") -> None:
    """A CPT run at a glance: cross-entropy and the balance loss per step; per language, the routing entropy
    averaged over MoE layers per step, and per MoE layer over the last 10% of the steps."""
    m = read_metrics(metrics_path)
    if not m:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    step = m["step"]
    axes[0, 0].plot(step, m["loss"], lw=0.9)
    axes[0, 0].set_ylabel("cross-entropy (nats)")
    axes[0, 1].plot(step, m["aux_loss"], lw=0.9, c="tab:orange")
    axes[0, 1].set_ylabel("load-balancing loss")
    per_layer = entropy_by_layer(m)
    for lang, layers in per_layer.items():
        axes[1, 0].plot(step, mean_entropy(m, lang), lw=0.9, label=lang, color=lang_color(lang))
        axes[1, 1].plot(list(layers), list(layers.values()), marker="o", ms=3, label=lang, color=lang_color(lang))
    axes[1, 0].set_ylabel("usage entropy, mean over layers (bits)")
    axes[1, 1].set_ylabel("usage entropy, last 10% of steps (bits)")
    axes[1, 1].set_xlabel("MoE layer")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        ax.set_xlabel("step")
    if per_layer:
        axes[1, 0].legend(fontsize=8)
        axes[1, 1].legend(fontsize=8)
    fig.suptitle(title or f"training: {Path(metrics_path).parent.name}", fontsize=10)
    save_figure(fig, path.parent, path.name)


def scores_figure(path: Path, rows: list[dict], title: str) -> None:
    """Downstream scores: one panel per task family (the task name without its language), a bar per language (its
    colour) with its standard error, the first metric of each task; a dashed line at chance where the task has one
    (a row's "chance"); a panel whose scores are all 0 says so instead of showing nothing."""
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families) + 1, 3.4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        metric = _rows(rows, family=family)[0]["metric"]
        chosen = [r for r in rows if r["family"] == family and r["metric"] == metric]
        labels = [r["language"] or r["task"] for r in chosen]
        errors = [r["stderr"] if isinstance(r["stderr"], float) else 0.0 for r in chosen]
        values = [r["value"] for r in chosen]
        ax.bar(labels, values, yerr=errors, capsize=3, color=[lang_color(label) for label in labels])
        chances = [r["chance"] for r in chosen if isinstance(r.get("chance"), float)]
        if chances:
            ax.axhline(float(np.mean(chances)), ls="--", c="k", lw=0.9, label="chance")
            ax.legend(fontsize=8)
        if not any(values):
            ax.text(0.5, 0.5, f"all scores 0 ({len(values)} task{'s' if len(values) > 1 else ''})",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
        ax.set_title(family, fontsize=9)
        ax.set_ylabel(metric)
        ax.set_xlabel("language")
        ax.set_ylim(0, max(1.0, max(values) * 1.1))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def expert_score_figures(out: Path, score_le: np.ndarray, selected_le: np.ndarray, window_l: np.ndarray,
                         method: str, threshold: float | None) -> list[str]:
    """experts_scores.png: each MoE layer's distribution of expert scores (a box per layer, the selected experts as
    dots, the threshold as a line); experts_selected.png: selected experts per layer, the layer window shaded."""
    layers = np.arange(score_le.shape[0])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 2), 3.6))
    ax.boxplot(list(score_le), positions=layers, widths=0.6, showfliers=False)
    rows, cols = np.nonzero(selected_le)
    ax.scatter(rows, score_le[rows, cols], s=10, color="C3", zorder=3, label="selected")
    if threshold is not None:
        ax.axhline(threshold, color="C3", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(method)
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])
    ax.legend(fontsize=8)
    ax.set_title(f"{method} of every expert, per MoE layer", fontsize=10)
    names = [save_figure(fig, out, "experts_scores.png")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 2), 3.0))
    for layer in layers[window_l]:
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.92", zorder=0)
    ax.bar(layers, selected_le.sum(axis=1), color="C0")
    ax.set_xlabel("MoE layer (shaded: the layer window)")
    ax.set_ylabel("selected experts")
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])
    ax.set_title(f"experts selected per MoE layer ({int(selected_le.sum())} in all)", fontsize=10)
    names.append(save_figure(fig, out, "experts_selected.png"))
    return names


def language_figures(out: Path, tables: dict, models: list[str]) -> dict[str, str]:
    """Paper c's language-level figures (language_routing.png, vocabulary_overlap.png) and, with scores, paper b's
    u_curve.png; returns {figure name: file name}."""
    written = {"languages": language_routing_figure(out, tables, models),
               "vocabulary": vocabulary_figure(out, tables, models)}
    if tables.get("scores"):
        written["u_curve"] = u_curve_figure(out, tables, models)
    return written


def language_routing_figure(out: Path, tables: dict, models: list[str]) -> str:
    """language_routing.png: per MoE layer, IG(L;E)/H(L) (how much the chosen expert tells of the language) and the
    mean language-level JSD over language pairs, one line per model (paper c's figures)."""
    ref = tables["reference"]
    fig, (ig_ax, jsd_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, model in enumerate(models):
        rows = _rows(tables["languages"], model=model)
        layers = [r["layer"] for r in rows]
        color = f"C{i % 10}"
        ig_ax.plot(layers, [r["ig_norm"] for r in rows], marker="o", ms=3, color=color, label=model)
        ig_ax.plot(layers, [r["ig_norm_uniform"] for r in rows], ls="--", color=color, label=f"{model} (uniform)")
        jsd_ax.plot(layers, [r["mean_jsd"] for r in rows], marker="o", ms=3, color=color, label=model)
        jsd_ax.plot(layers, [r["mean_jsd_no_reference"] for r in rows], ls="--", color=color,
                    label=f"{model} (without {ref})")
    ig_ax.set_ylabel("IG(L;E) / H(L)")
    ig_ax.set_title("language information in the expert choice\n(dashed: languages weighted equally)", fontsize=9)
    jsd_ax.set_ylabel("mean pairwise JSD (nats)")
    jsd_ax.set_title(f"JSD of the languages' expert usage\n(dashed: without {ref})", fontsize=9)
    for ax in (ig_ax, jsd_ax):
        ax.set_xlabel("MoE layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out, "language_routing.png")


def vocabulary_figure(out: Path, tables: dict, models: list[str]) -> str:
    """vocabulary_overlap.png, per model: at the last MoE layer, each language pair's JSD against its vocabulary
    overlap with the least-squares line (paper c's scatter); below, their Pearson r per MoE layer."""
    fig, axes = _grid(len(models), 2, sharey=False)
    for col, model in enumerate(models):
        summary = _rows(tables["languages"], model=model)
        last = summary[-1]["layer"]
        pairs = _rows(tables["pairs"], model=model, layer=last)
        x = np.array([r["vocab_jaccard"] for r in pairs])
        y = np.array([r["jsd"] for r in pairs])
        scatter = axes[0, col]
        scatter.scatter(x, y, s=30, color="tab:blue", zorder=3)
        for r in pairs:
            scatter.annotate(f"{r['lang_a']}-{r['lang_b']}", (r["vocab_jaccard"], r["jsd"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points")
        r_last = summary[-1]["vocab_jsd_pearson_r"]
        if np.isfinite(r_last):
            slope, intercept = np.polyfit(x, y, 1)
            line_x = np.linspace(x.min(), x.max(), 2)
            scatter.plot(line_x, slope * line_x + intercept, ls="--", c="0.3",
                         label=f"least squares (r = {r_last:.2f})")
            scatter.legend(fontsize=8)
        scatter.set_xlabel("vocabulary overlap (Jaccard of token ids)")
        scatter.set_ylabel("JSD of expert usage (nats)")
        scatter.set_title(f"{model}: language pairs at MoE layer {last}", fontsize=9)
        per_layer = axes[1, col]
        per_layer.plot([r["layer"] for r in summary], [r["vocab_jsd_pearson_r"] for r in summary], marker="o", ms=3)
        per_layer.axhline(0, c="k", lw=0.8)
        per_layer.set_ylim(-1.05, 1.05)
        per_layer.set_xlabel("MoE layer")
        per_layer.set_ylabel("Pearson r (overlap, JSD)")
        for ax in (scatter, per_layer):
            ax.grid(alpha=0.3)
    return save_figure(fig, out, "vocabulary_overlap.png")


def u_curve_figure(out: Path, tables: dict, models: list[str]) -> str:
    """u_curve.png, per model: each language's routing divergence from the reference (the pairs table's njsd, or
    njsd_pooled for a corpus that is not parallel) per MoE layer, coloured by its score on one colour scale (paper b's
    Fig. 2); languages without a score grey and dashed."""
    ref, scores, column = tables["reference"], tables["scores"], tables.get("divergence", "njsd")
    values = [v for model in models if model in scores for lang, v in scores[model]["values"].items() if lang != ref]
    norm = matplotlib.colors.Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models) + 0.8, 3.8), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, model in zip(axes[0], models, strict=True):
        scored = scores.get(model, {"values": {}, "score": ""})
        pairs = [r for r in _rows(tables["pairs"], model=model) if ref in (r["lang_a"], r["lang_b"])]
        for lang in dict.fromkeys(r["lang_b"] if r["lang_a"] == ref else r["lang_a"] for r in pairs):
            rows = [r for r in pairs if lang in (r["lang_a"], r["lang_b"])]
            layers, divergence = [r["layer"] for r in rows], [r[column] for r in rows]
            value = scored["values"].get(lang)
            style = {"color": cmap(norm(value))} if value is not None else {"color": "0.6", "ls": "--"}
            ax.plot(layers, divergence, marker="o", ms=3, **style)
            ax.annotate(lang if value is not None else f"{lang} (no score)", (layers[-1], divergence[-1]),
                        fontsize=7, xytext=(3, 0), textcoords="offset points", color=style["color"])
        ax.set_xlabel("MoE layer")
        ax.set_title(f"{model}: divergence from {ref}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"{column} from {ref} (entropy-normalised JSD)")
    what = next((scores[m]["score"] for m in models if m in scores), "score")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=what, shrink=0.9)
    fig.savefig(out / "u_curve.png", dpi=110)
    plt.close(fig)
    return "u_curve.png"
