"""Routing analysis throughput and memory: `moejax analyze` vs the PyTorch protocol of the published work
(transformers forward with hooks capturing router logits, numpy metrics afterwards), same run, same model.

    python benchmarks/bench_analyze.py                      # 50k and 200k tokens (about 15 minutes)
    python benchmarks/bench_analyze.py --tokens 20000       # a quick look (part of the sample, one copy)
    python benchmarks/bench_analyze.py --json analyze.json  # also the numbers, machine-readable

Model: the Qwen3-MoE forward-benchmark config with a byte-level tokenizer; corpus: the built-in en/he/ja
sample corpus repeated to at least the requested size. Chunks are ~40 English words: with one token
per UTF-8 byte that gives 250-500-token sequences (Hebrew and Japanese take 2-3 bytes a character),
about what a real tokenizer makes of the paper's ~300-word chunks. The PyTorch side runs batches of 8 padded to
length buckets; moejax packs the chunks into rows of one width (8 rows a pass), each chunk a segment of its own.
Each measurement runs in a fresh subprocess, alone on the machine, so its time and peak RSS are its own; moejax's
share of time spent compiling is measured from JAX's own compilation events. Target: >= 3x at 200k tokens, with
moejax's peak memory flat in the corpus size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LANGS = ["en", "he", "ja"]
CHUNK_WORDS = 40


def make_corpus(directory: Path, tokens: int) -> None:
    """The sample corpus repeated until the byte tokenizer yields ~`tokens` tokens over all languages; below one copy
    of the sample (~40k tokens), the same first share of each language's (parallel) lines."""
    from moejax.data.corpus import SAMPLE_DIR

    texts = {lang: (SAMPLE_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines() for lang in LANGS}
    per_copy = sum(len(line.encode()) + 1 for lines in texts.values() for line in lines)
    copies = -(-tokens // per_copy)
    share = min(1.0, tokens / per_copy)
    directory.mkdir(parents=True, exist_ok=True)
    for lang, lines in texts.items():
        kept = lines[:max(1, round(share * len(lines)))]
        (directory / f"{lang}.txt").write_text("\n".join(kept * copies) + "\n", encoding="utf-8")


def run_moejax(model_dir: str, corpus: str, out: str) -> dict:
    import jax

    from moejax.commands.analyze import AnalyzeSettings, analyze

    compiling = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kwargs: compiling.append(seconds) if "compile" in event else None)
    start = time.perf_counter()
    result = analyze(AnalyzeSettings(model=(model_dir,), langs=tuple(LANGS), data=corpus, out=out,
                                     chunk_words=CHUNK_WORDS, batch_size=8, quiet=True))
    seconds = time.perf_counter() - start
    tokens = sum(json.loads((result / "metrics.json").read_text())["models"][Path(model_dir).name]["tokens"].values())
    return {"seconds": seconds, "tokens": tokens, "compile_seconds": sum(compiling),
            "packing": json.loads((result / "metrics.json").read_text())["packing"]}


def run_torch(model_dir: str, corpus: str) -> dict:
    """Hooks keep every MoE layer's router logits on the host; counts, probabilities and metrics come after."""
    import torch
    import transformers

    from moejax.data.corpus import chunk, read_corpus
    from moejax.data.packing import bucket
    from moejax.routing import metrics as M

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    k = model.config.num_experts_per_tok
    captured: list[torch.Tensor] = []
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.register_forward_hook(lambda _m, _i, out: captured.append(out[0].detach().clone()))
    start = time.perf_counter()
    corpus_chunks = chunk(read_corpus(corpus, LANGS), CHUNK_WORDS)
    tokens = 0
    results = {}
    for lang in LANGS:
        encoded = [tok(t)["input_ids"] for t in corpus_chunks[lang]]
        logits_per_layer: list[list[np.ndarray]] = []
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for s in range(0, len(order), 8):
            rows = order[s:s + 8]
            length = bucket(max(len(encoded[i]) for i in rows))
            ids = torch.zeros((len(rows), length), dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])], mask[r, :len(encoded[i])] = torch.tensor(encoded[i]), 1
            captured.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            keep = (mask.reshape(-1) == 1) & (ids.reshape(-1) != tok.bos_token_id)
            tokens += int(mask.sum())
            for layer, z in enumerate(captured):
                if len(logits_per_layer) <= layer:
                    logits_per_layer.append([])
                logits_per_layer[layer].append(z[keep].numpy())
        per_layer = []
        for layer_logits in logits_per_layer:
            z = np.concatenate(layer_logits).astype(np.float64)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            top = np.argsort(-p, axis=-1)[:, :k]
            counts = np.bincount(top.ravel(), minlength=p.shape[-1])
            f = M.usage_fractions(counts, k)
            per_layer.append((M.usage_entropy_bits(f), M.gini(counts), (-(p * np.log2(p)).sum(-1)).mean()))
        results[lang] = per_layer
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def child(args) -> None:
    result = run_moejax(args.model, args.corpus, args.out) if args.side == "moejax" else run_torch(args.model,
                                                                                                  args.corpus)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(side: str, model: str, corpus: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", model, "--corpus", corpus, "--out-dir", out]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[50_000, 200_000], help="corpus sizes to measure")
    parser.add_argument("--child", dest="side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", dest="model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the measured throughputs and the speed-ups here")
    args = parser.parse_args()
    if args.side:
        return child(args)
    import torch
    import transformers
    from bench_forward import CONFIGS
    from bench_load import cpu_model

    from moejax.parity.fixtures import randomize, save_byte_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen3-bench"
        torch.manual_seed(0)
        randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen3_moe"]), 0).save_pretrained(model_dir)
        save_byte_tokenizer(model_dir)
        print(f"analysis throughput, Qwen3-MoE bench config, en/he/ja, {os.cpu_count()} CPU threads, CPU: "
              f"{cpu_model()}")
        results = {}
        for tokens in args.tokens:
            corpus = Path(tmp) / f"corpus-{tokens}"
            make_corpus(corpus, tokens)
            ours = measure("moejax", str(model_dir), str(corpus), str(Path(tmp) / f"out-{tokens}"))
            ref = measure("torch", str(model_dir), str(corpus), "")
            fills = [f"{v['fill']:.0%}" for v in ours["packing"]["layouts"].values()]
            print(f"  {ours['tokens']:>7} tokens: PyTorch hooks + numpy {ref['tokens'] / ref['seconds']:7.1f} tok/s, "
                  f"peak RSS {ref['peak_rss_mb']:6.0f} MB | moejax analyze {ours['tokens'] / ours['seconds']:7.1f} "
                  f"tok/s (incl. compile: {ours['compile_seconds']:.1f} s = "
                  f"{100 * ours['compile_seconds'] / ours['seconds']:.0f}% of its time; rows {', '.join(fills)} full), "
                  f"peak RSS {ours['peak_rss_mb']:6.0f} MB | speed-up "
                  f"{ref['seconds'] / ref['tokens'] * ours['tokens'] / ours['seconds']:.2f}x (target >= 3x)")
            results[f"{tokens}_tokens"] = {"torch": ref, "moejax": ours}
    if args.json:
        ratios = {size: r["moejax"]["tokens"] / r["moejax"]["seconds"] / (r["torch"]["tokens"] / r["torch"]["seconds"])
                  for size, r in results.items()}
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
