"""Paper (a)'s protocol in one command: deep-layer routing collapse of Hebrew and Japanese vs English,
for base / CPT / SFT checkpoints of Qwen3-MoE and Nemotron-H, with the full figure and table set.

    python -m experiments.multilingual_routing \\
        --model qwen3-base=/ckpt/Qwen3-30B-A3B --model qwen3-cpt=/ckpt/qwen3-he-cpt \\
        --model nemotron-base=/ckpt/Nemotron-3-Nano-30B-A3B --model nemotron-cpt=/ckpt/nemo-he-cpt \\
        --model nemotron-sft=/ckpt/nemo-he-sft --data /data/flores200_dataset/dev --out results/

For each language pair (he-en and ja-en by default; the same English chunks serve both) it runs
`moejax analyze` over all models together, so each figure shows the models side by side, and writes
OUT/<pair>/ (layers.csv, experts.csv, pairs.csv, lsi.csv, metrics.json, figures, report.md), plus
OUT/summary.md with the collapse summary of every model and language in one table. Without --model
it runs the built-in demonstration model on the built-in corpus.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moejax.commands.analyze import AnalyzeSettings, analyze


def run(models: dict[str, str | None], pairs: list[str], data: str | None, out: Path, chunk_words: int,
        mode: str, batch_size: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = ["# Deep-layer collapse: deepest quarter minus middle half of MoE layers", "",
            "| pair | model | language | Δ usage entropy (bits) | Δ Gini | noise floor (entropy) |",
            "|---|---|---|---|---|---|"]
    for pair in pairs:
        langs = pair.split("-")
        specs = tuple(f"{label}={path}" for label, path in models.items() if path is not None)
        result = analyze(AnalyzeSettings(model=specs, langs=tuple(langs), data=data, out=out / pair,
                                         chunk_words=chunk_words, chunk_mode=mode, batch_size=batch_size))
        summary = json.loads((result / "metrics.json").read_text())["summary"]
        for model, s in summary.items():
            for lang, c in s["collapse"].items():
                rows.append(f"| {pair} | {model} | {lang} | {c['usage_entropy_bits']:+.3f} | {c['gini']:+.3f} | "
                            f"{s['noise_floor'][lang]['usage_entropy_bits']:.3f} |")
    rows += ["", "Models: " + ", ".join(f"{label} = {path or 'built-in'}" for label, path in models.items()), ""]
    (out / "summary.md").write_text("\n".join(rows), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                        help="a checkpoint to compare, with a label (repeat); default: the built-in model")
    parser.add_argument("--pairs", default="he-en,ja-en", help="language pairs, target-reference")
    parser.add_argument("--data", help="FLORES-200 directory, TSV/JSONL, or aligned {lang}.txt directory")
    parser.add_argument("--out", default="multilingual-routing", type=Path)
    parser.add_argument("--chunk-mode", choices=["paragraph", "sentence"], default="paragraph")
    parser.add_argument("--chunk-words", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    models: dict[str, str | None] = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not path:
            parser.error(f"--model takes LABEL=DIR, got {spec!r}")
        models[label] = path
    models = models or {"builtin": None}
    if len(set(models.values())) != len(models):
        parser.error("the same checkpoint is given twice")
    out = run(models, args.pairs.split(","), args.data, args.out, args.chunk_words, args.chunk_mode, args.batch_size)
    print(f"wrote {out}/summary.md and one directory per pair")


if __name__ == "__main__":
    main()
