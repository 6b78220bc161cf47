"""Paper (a)'s protocol in one command: deep-layer routing collapse of Hebrew and Japanese vs English,
for base / CPT / SFT checkpoints of Qwen3-MoE and Nemotron-H, with the full figure and table set.

    python -m experiments.multilingual_routing \\
        --model qwen3-base=/ckpt/Qwen3-30B-A3B --model qwen3-cpt=/ckpt/qwen3-he-cpt \\
        --model nemotron-base=/ckpt/Nemotron-3-Nano-30B-A3B --model nemotron-cpt=/ckpt/nemo-he-cpt \\
        --model nemotron-sft=/ckpt/nemo-he-sft --data /data/flores200_dataset/dev --dtype bfloat16 \\
        --mesh data=1,model=8 --out results/

For each language pair (he-en and ja-en by default; the same English chunks serve both) it runs
`moejax analyze` over all models together, so each figure shows the models side by side, and writes
OUT/<pair>/ (layers.csv, experts.csv, pairs.csv, lsi.csv, metrics.json, figures, report.md), plus
OUT/summary.md with the collapse summary of every model and language in one table, each with its 95% bootstrap
interval over chunks and the seed. Protocol (paper a): content tokens only, the experts counted are the top-K of
softmax(raw router logits) as the paper's hooks on the gate compute them (--selection raw; `model` counts the
model's own choice, which differs on Nemotron-H), probabilities are the softmax of the raw logits, paragraph chunks
of ~300 words. Without --model it runs the built-in demonstration model on the built-in corpus.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.common import scale_options, study_main
from moejax.commands.analyze import AnalyzeSettings, analyze
from moejax.errors import SettingsError
from moejax.io import output_directory
from moejax.routing import SELECTIONS

NAME = "multilingual_routing"


def run(args) -> Path:
    models = models_of(args.model)
    pairs = [p for p in args.pairs.split(",") if p]
    if not pairs or any(len(p.split("-")) != 2 for p in pairs):
        raise SettingsError(f"--pairs {args.pairs!r}: expected target-reference pairs such as he-en,ja-en")
    inputs = [p for p in (*models.values(), args.data) if p]
    with output_directory(args.out, NAME, inputs) as tmp:
        rows = ["# Deep-layer collapse: deepest quarter minus middle half of MoE layers", "",
                "| pair | model | language | Δ usage entropy (bits) [95% CI] | Δ Gini [95% CI] | "
                "noise floor (entropy) |", "|---|---|---|---|---|---|"]
        for pair in pairs:
            specs = tuple(f"{label}={path}" for label, path in models.items() if path is not None)
            result = analyze(AnalyzeSettings(model=specs, langs=tuple(pair.split("-")), data=args.data,
                                             out=tmp / pair, chunk_words=args.chunk_words, chunk_mode=args.chunk_mode,
                                             batch_size=args.batch_size, selection=args.selection, mesh=args.mesh,
                                             dtype=args.dtype, seed=args.seed, pairs=args.token_pairs,
                                             max_chunks=args.max_chunks, bootstrap=args.bootstrap))
            summary = json.loads((result / "metrics.json").read_text())["summary"]
            for model, s in summary.items():
                for lang, c in s["collapse"].items():
                    ci = s["collapse_ci"][lang]
                    rows.append(f"| {pair} | {model} | {lang} | {c['usage_entropy_bits']:+.3f} "
                                f"[{ci['usage_entropy_bits'][0]:+.3f}, {ci['usage_entropy_bits'][1]:+.3f}] | "
                                f"{c['gini']:+.3f} [{ci['gini'][0]:+.3f}, {ci['gini'][1]:+.3f}] | "
                                f"{s['noise_floor'][lang]['usage_entropy_bits']:.3f} |")
        view = ("top-K of softmax(raw router logits), paper A's hook view" if args.selection == "raw"
                else "the model's own choice (not paper A's view on Nemotron-H: a labelled alternative)")
        rows += ["", "Models: " + ", ".join(f"{label} = {path or 'built-in'}" for label, path in models.items()),
                 f"Experts counted: {view} (--selection {args.selection}). Probabilities: softmax of the raw logits. "
                 f"Chunks: {args.chunk_mode}, ~{args.chunk_words} words. Parameters: {args.dtype}"
                 + (f", mesh {args.mesh}" if args.mesh else "") + ".",
                 f"Intervals: basic bootstrap over chunks ({args.bootstrap} resamples), seed {args.seed}. Noise "
                 "floor: mean |difference| of two random halves of the chunks.", ""]
        (tmp / "summary.md").write_text("\n".join(rows), encoding="utf-8")
    print(f"wrote {args.out}/summary.md and one directory per pair")
    return Path(args.out)


def models_of(specs: list[str]) -> dict[str, str | None]:
    models: dict[str, str | None] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not path or not label:
            raise SettingsError(f"--model takes LABEL=DIR, got {spec!r}")
        if label in models:
            raise SettingsError(f"--model label {label!r} is given twice")
        models[label] = path
    if len(set(models.values())) != len(models):
        raise SettingsError("the same checkpoint is given twice")
    return models or {"builtin": None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                   help="a checkpoint to compare, with a label (repeat); default: the built-in model")
    p.add_argument("--pairs", default="he-en,ja-en", help="language pairs, target-reference (any code moejax "
                   "analyze --langs takes)")
    p.add_argument("--data", help="FLORES-200 directory, Belebele, TSV/JSONL, or a {lang}.txt directory "
                   "(default: the built-in sample corpus)")
    p.add_argument("--out", default=NAME, type=Path, help="output directory (a new one, or this study's own)")
    p.add_argument("--selection", choices=SELECTIONS, default="raw",
                   help="experts counted: raw = top-K of softmax(raw router logits), paper A's hooks (default); "
                   "model = the model's own choice")
    p.add_argument("--chunk-mode", choices=["paragraph", "sentence"], default="paragraph")
    p.add_argument("--chunk-words", type=int, default=300)
    p.add_argument("--token-pairs", type=int, default=500, help="routing consistency: token pairs per chunk "
                   "(paper B's 500)")
    p.add_argument("--max-chunks", type=int, help="at most N chunks per language (paper A: 1300); default all")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the chunks for the intervals")
    p.add_argument("--batch-size", type=int, default=8)
    scale_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    study_main(NAME, run, parser(), argv)


if __name__ == "__main__":
    main()
