"""The `moejax` command line. `moejax analyze --help` lists every option."""

from __future__ import annotations

import argparse
import sys

from moejax.data.corpus import FLORES_CODES


def _analyze(args) -> int:
    from moejax.routing.analyze import analyze

    exclude = [int(x) for x in args.exclude_ids.split(",") if x] if args.exclude_ids else []
    out = analyze(args.model or [None], args.langs.split(","), args.data, args.out, chunk_words=args.chunk_words,
                  mode=args.chunk_mode, batch_size=args.batch_size, probabilities=args.probabilities,
                  exclude_ids=exclude, seed=args.seed, show_progress=not args.quiet)
    print(f"wrote {out}/report.md (tables: layers.csv, experts.csv, pairs.csv, lsi.csv; metrics.json; figures)")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moejax", description="MoE routing research in JAX: analysis of how "
                                  "Mixture-of-Experts routers spread each language's tokens over experts.")
    sub = top.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "analyze", help="routing statistics, metrics, figures and a report for one or more models",
        description="Runs each model over each language's chunks of a parallel corpus, reduces the routing "
        "statistics inside the jitted forward pass and writes layers.csv, experts.csv, pairs.csv, lsi.csv, "
        "metrics.json, PNG figures and report.md to OUT. With no arguments: the built-in small model on the "
        "built-in English/Hebrew/Japanese sample corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", action="append", metavar="[LABEL=]DIR",
                   help="Hugging Face checkpoint directory with its tokenizer, optionally labelled (repeat to compare "
                   "models, e.g. base=DIR1 cpt=DIR2); default: the built-in demonstration model")
    a.add_argument("--langs", default="en,he,ja",
                   help=f"comma-separated language codes; the reference is en if present, else the last. "
                   f"Known: {','.join(sorted(FLORES_CODES))}")
    a.add_argument("--data", metavar="CORPUS",
                   help="a FLORES-200 directory ({code}.dev/.devtest), a TSV (header of language codes) or JSONL "
                   "file with one column per language, or a directory of aligned {lang}.txt files; default: the "
                   "built-in sample corpus")
    a.add_argument("--out", default="moejax-analysis", help="output directory (replaced only when the run succeeds)")
    a.add_argument("--chunk-mode", choices=["paragraph", "sentence"], default="paragraph",
                   help="paragraph: consecutive sentences up to ~--chunk-words words; sentence: one sentence each")
    a.add_argument("--chunk-words", type=int, default=300, help="target words per paragraph chunk")
    a.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass")
    a.add_argument("--probabilities", choices=["softmax", "native"], default="softmax",
                   help="P_t for the probability metrics: softmax of the raw logits (paper a), or the model's "
                   "native scores (sigmoid for Nemotron-H)")
    a.add_argument("--exclude-ids", default="",
                   help="extra token ids to exclude from every metric (e.g. chat-template tokens), comma-separated; "
                   "the tokenizer's special tokens are always excluded")
    a.add_argument("--seed", type=int, default=0, help="seed for same-language splits and token-pair sampling")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(run=_analyze)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"moejax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
