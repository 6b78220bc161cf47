"""The final-layer study's comparison: train only the language-specific experts of the last MoE layers (SEFT), those
plus the shared experts (SSFT-k5), every expert of the last layers, or the complete last layers, and relate each
variant's trainable share to its score.

    python -m experiments.expert_selective --model /ckpt/Qwen3-30B-A3B --lang he --langs he,en,ja \\
        --select-data /data/flores200_dataset/dev --data he=/data/he_train.jsonl:1 --eval-data he=/data/he_dev.jsonl \\
        --last-layers 2 --steps 500 --out results/selective

Steps: (1) `moejax experts --method gap` over --langs of --select-data in the last --last-layers MoE layers
writes selected_experts.json; (2) `moejax train` runs each variant from the same start (--train-experts
FILE:LANG:seft, ...:ssft_k5, every expert of those layers, and --train-blocks with those layers' blocks), the same
data, steps and seed; (3) each variant's held-out cross-entropy per language of --eval-data (eval.csv, before the
first step and at the end), and its scores on --tasks through lm-eval with moejax as the model (the run exported
first); (4) OUT/selective.csv, OUT/summary.md and OUT/selective.png (held-out loss change against trainable share,
log scale). Without arguments it runs the built-in model on the bundled corpus and tasks in a few minutes, and
says that this proves nothing about real models.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from moejax.commands.experts import ExpertsSettings, find_experts
from moejax.commands.train import TrainSettings, train
from moejax.data.corpus import SAMPLE_DIR
from moejax.loading import load_config
from moejax.models.builtin import builtin_config


def variants(selection: Path, lang: str, config, last_layers: int) -> dict[str, dict]:
    """Train settings per variant, all on the last `last_layers` MoE layers."""
    moe = list(config.moe_layers)[-last_layers:]
    everything = {str(len(config.moe_layers) - last_layers + i): list(range(config.num_routed_experts))
                  for i in range(len(moe))}
    whole = selection.parent / "all_experts.json"
    whole.write_text(json.dumps(everything))
    return {"SEFT": {"train_experts": f"{selection}:{lang}:seft"},
            "SSFT-k5": {"train_experts": f"{selection}:{lang}:ssft_k5"},
            "all experts": {"train_experts": str(whole)},
            "complete layers": {"train_blocks": tuple(moe)}}


def last_eval(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run / "eval.csv").open()))
    return {k.removeprefix("eval_loss_"): float(v) for k, v in rows[-1].items() if k != "step"}, \
        {k.removeprefix("eval_loss_"): float(v) for k, v in rows[0].items() if k != "step"}


def downstream(run_dir: Path, args) -> dict[str, float]:
    """The trained variant's task scores through lm-eval with moejax as the model (the run exported to the Hugging
    Face layout first, float32, with the byte-level tokenizer for the built-in model)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moejax.commands.evaluate import BUNDLED_TASKS
    from moejax.commands.export import ExportSettings, export
    from moejax.evaluation.harness import MoejaxLM
    from moejax.parity.fixtures import save_byte_tokenizer

    hf = export(ExportSettings(src=run_dir / "checkpoint", out_dir=run_dir.parent / "hf" / run_dir.name,
                               dtype="float32"))
    if args.model is None:
        save_byte_tokenizer(hf)
    tasks = args.tasks.split(",")
    results = lm_eval.simple_evaluate(model=MoejaxLM(pretrained=str(hf)), tasks=tasks, limit=args.limit,
                                      task_manager=TaskManager(include_path=[str(BUNDLED_TASKS)], verbosity="ERROR"),
                                      verbosity="ERROR")["results"]
    return {f"score_{task}": float(next(v for k, v in results[task].items() if k.startswith("acc,")
                                        or k.startswith("exact_match,"))) for task in tasks}


def run(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = find_experts(ExpertsSettings(model=args.model, langs=tuple(args.langs.split(",")), data=args.select_data,
                                          method="gap", last_layers=args.last_layers, alpha=args.alpha, shared=5,
                                          out=out / "selection", quiet=True))
    config = load_config(args.model) if args.model else builtin_config()
    data = args.data or f"{args.lang}={SAMPLE_DIR / (args.lang + '.txt')}:1"
    eval_data = args.eval_data or ",".join(f"{lang}={SAMPLE_DIR / (lang + '.txt')}" for lang in args.langs.split(","))
    rows = []
    for name, extra in variants(chosen / "selected_experts.json", args.lang, config, args.last_layers).items():
        folder = out / name.replace(" ", "_")
        settings = TrainSettings(model=args.model, data=data, eval_data=eval_data, eval_every=args.steps,
                                 steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                 out=folder, quiet=True, **extra)
        budget = settings.run_settings().budget
        train(settings)
        end, start = last_eval(folder)
        scores = downstream(folder, args) if args.tasks != "none" else {}
        rows.append({"variant": name, "trainable": budget["trainable"], "share": budget["share"],
                     **{f"eval_loss_{k}": v for k, v in end.items()},
                     **{f"change_{k}": end[k] - start[k] for k in end}, **scores})
        print(f"{name}: {budget['trainable']:,} parameters ({budget['share']:.2%}), held-out loss "
              + ", ".join(f"{k} {v:.4f} ({end[k] - start[k]:+.4f})" for k, v in end.items()))
    with open(out / "selective.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    langs = [k.removeprefix("eval_loss_") for k in rows[0] if k.startswith("eval_loss_")]
    score_keys = [k for k in rows[0] if k.startswith("score_")]
    header = " | ".join([*(f"held-out loss {lang} (change)" for lang in langs), *(k[6:] for k in score_keys)])
    lines = [f"# Expert-selective adaptation, {args.lang}, last {args.last_layers} MoE layers", "",
             f"| variant | trainable parameters | share | {header} |",
             "|---|---|---|" + "---|" * (len(langs) + len(score_keys))]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['share']:.2%} | "
                     + " | ".join([*(f"{r[f'eval_loss_{lang}']:.4f} ({r[f'change_{lang}']:+.4f})" for lang in langs),
                                   *(f"{r[k]:.4f}" for k in score_keys)]) + " |")
    if args.model is None:
        lines += ["", "The built-in model has random weights and the corpus is tiny: this run shows the protocol "
                  "working and proves nothing about real models."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _figure(out / "selective.png", rows, args.lang)
    print((out / "summary.md").read_text())
    return out


def _figure(path: Path, rows: list[dict], lang: str) -> None:
    from moejax.report.figures import plt, save_figure  # pyplot with the Agg backend

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, r in enumerate(rows):
        ax.scatter(r["share"], r[f"change_{lang}"], color=f"C{i}", label=r["variant"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable share of the parameters")
    ax.set_ylabel(f"held-out loss change, {lang}")
    ax.legend(fontsize=8)
    save_figure(fig, path.parent, path.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory with its tokenizer; default: the built-in model")
    parser.add_argument("--lang", default="he", help="the language adapted to")
    parser.add_argument("--langs", default="he,en,ja", help="languages for the gap selection (the first is --lang)")
    parser.add_argument("--select-data", help="parallel corpus for the selection (default: the built-in sample)")
    parser.add_argument("--data", help="training mixture LANG=PATH:RATIO (default: --lang's built-in sample text)")
    parser.add_argument("--eval-data", help="held-out text LANG=PATH,... (default: the built-in samples of --langs)")
    parser.add_argument("--last-layers", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--tasks", default="moejax_choice_he,moejax_choice_en",
                        help="lm-eval tasks scored for each variant through `moejax eval`'s backend (acc or "
                        "exact_match); 'none' for held-out loss only")
    parser.add_argument("--limit", type=int, help="documents per task")
    parser.add_argument("--out", default="expert-selective", type=Path)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
