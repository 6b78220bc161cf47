"""The load-balancing coefficient ablation of CPT: the same run with several aux-loss coefficients, side by side.

    python -m experiments.aux_coef_ablation --model /ckpt/Qwen3-30B-A3B \\
        --data he=/data/he.jsonl:0.6,en=/data/en.jsonl:0.4 --coefs 0,1e-3,1e-2 --steps 2000 --out ablation/

Too high a coefficient spikes the loss and forces routing towards uniform; zero lets routing drift where the
new language takes it. For each coefficient it runs `moejax train` (same model, data, seed and every
other setting) into OUT/lb_COEF/ (resumable: rerunning the command continues unfinished runs), then writes
    OUT/loss_curves.png         cross-entropy and balance loss per step, one line per coefficient
    OUT/routing_entropy.png     per language: usage entropy per MoE layer at the end of training, and the
                                mean over layers per step, one line per coefficient
    OUT/summary.md              final cross-entropy, balance loss and entropy per language, per coefficient
Extra arguments after `--` go to every `moejax train` (e.g. -- --mesh data=2,expert=4 --remat full).
With no arguments: the built-in small model on the built-in sample corpus, 0 / 1e-3 / 1e-2, 300 steps each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import study_main  # noqa: E402
from moejax.commands.options import MESH_HELP, add_options, from_mapping  # noqa: E402
from moejax.commands.train import TrainSettings, train  # noqa: E402
from moejax.io import resumable_directory  # noqa: E402
from moejax.report.figures import entropy_by_layer, mean_entropy, read_metrics, save_figure  # noqa: E402


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    n = np.arange(1, len(values) + 1)
    lo = np.maximum(n - window, 0)
    return (sums[n] - sums[lo]) / (n - lo)


def run(coefs: list[float], out: Path, settings: dict) -> dict[float, dict[str, np.ndarray]]:
    """One `moejax train` run per coefficient, each with the same `settings` (TrainSettings fields) otherwise, in a
    directory that is new or this study's own (resumed)."""
    out = resumable_directory(out, "aux_coef_ablation", [p for p in (settings.get("model"),) if p])
    metrics = {}
    for coef in coefs:
        run_dir = out / f"lb_{coef:g}"
        train(from_mapping(TrainSettings, {**settings, "lb_coef": coef, "out": run_dir}))
        metrics[coef] = read_metrics(run_dir / "metrics.csv")
    figures(metrics, out)
    summary(metrics, out)
    return metrics


def figures(metrics: dict[float, dict[str, np.ndarray]], out: Path) -> None:
    window = max(1, len(next(iter(metrics.values()))["step"]) // 30)
    fig, (ce, aux) = plt.subplots(1, 2, figsize=(11, 4))
    for coef, m in metrics.items():
        ce.plot(m["step"], smooth(m["loss"], window), lw=1, label=f"lb_coef {coef:g}")
        aux.plot(m["step"], smooth(m["aux_loss"], window), lw=1, label=f"lb_coef {coef:g}")
    ce.set_ylabel(f"cross-entropy (nats, mean of {window} steps)")
    aux.set_ylabel("balance loss")
    for ax in (ce, aux):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out, "loss_curves.png")

    langs = list(entropy_by_layer(next(iter(metrics.values()))))
    fig, axes = plt.subplots(2, len(langs), figsize=(5.5 * len(langs), 7), squeeze=False)
    for col, lang in enumerate(langs):
        for coef, m in metrics.items():
            layers = entropy_by_layer(m)[lang]
            axes[0, col].plot(list(layers), list(layers.values()), marker="o", ms=3, label=f"lb_coef {coef:g}")
            per_step = mean_entropy(m, lang)
            seen = np.isfinite(per_step)  # steps whose batch held this language
            axes[1, col].plot(m["step"][seen], smooth(per_step[seen], window), lw=1, label=f"lb_coef {coef:g}")
        axes[0, col].set_title(f"{lang}: usage entropy per MoE layer, last 10% of steps", fontsize=9)
        axes[0, col].set_xlabel("MoE layer")
        axes[1, col].set_title(f"{lang}: usage entropy, mean over MoE layers", fontsize=9)
        axes[1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.set_ylabel("bits")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, out, "routing_entropy.png")


def summary(metrics: dict[float, dict[str, np.ndarray]], out: Path) -> None:
    langs = list(entropy_by_layer(next(iter(metrics.values()))))
    head = ["lb_coef", "cross-entropy (last 10%)", "balance loss (last 10%)",
            *(f"entropy {lang} (bits)" for lang in langs)]
    lines = ["# Load-balancing coefficient ablation", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for coef, m in metrics.items():
        tail = slice(-max(1, len(m["step"]) // 10), None)
        entropy = entropy_by_layer(m)
        cells = [f"{coef:g}", f"{m['loss'][tail].mean():.4f}", f"{m['aux_loss'][tail].mean():.4f}",
                 *(f"{np.mean(list(entropy[lang].values())):.3f}" for lang in langs)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Entropy: usage entropy of the top-k assignments per MoE layer (docs/metrics.md), averaged over "
              "layers and over the last 10% of the steps.", ""]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory; default: the built-in small model")
    parser.add_argument("--data", help="LANG=PATH:RATIO,...; default: the built-in sample corpus, he 0.6, en 0.4")
    parser.add_argument("--coefs", default="0,1e-3,1e-2", help="load-balancing coefficients, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--out", type=Path, default=Path("aux-coef-ablation"),
                        help="output directory: new, or this study's own (unfinished runs resume)")
    parser.add_argument("--mesh", metavar="AXIS=N,...", help=MESH_HELP)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype of every run (default: bfloat16 on an accelerator, float32 on a CPU)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more `moejax train` flags")

    def run_args(args) -> None:
        try:
            coefs = [float(c) for c in args.coefs.split(",") if c]
        except ValueError:
            parser.error(f"--coefs takes numbers separated by commas, got {args.coefs!r}")
        extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        flags = argparse.ArgumentParser(prog="moejax train flags")
        add_options(flags, TrainSettings)
        given = {key: value for key, value in vars(flags.parse_args(extra)).items() if value is not None}
        settings = {**given, "steps": args.steps, "model": args.model, "data": args.data, "mesh": args.mesh or
                    given.get("mesh"), "dtype": args.dtype or given.get("dtype")}
        run(coefs, args.out, settings)
        print(f"wrote {args.out}/loss_curves.png, routing_entropy.png and summary.md")

    study_main("aux_coef_ablation", run_args, parser, argv)


if __name__ == "__main__":
    main()
