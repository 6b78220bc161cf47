"""How long `moejax parity` takes, and which side is the slow one, on the forward-benchmark models.

    python benchmarks/bench_parity.py                         # both architectures, float32 and bfloat16
    python benchmarks/bench_parity.py --arch qwen3_moe --dtype float32 --tokens 2048
    python benchmarks/bench_parity.py --json parity.json   # also the numbers, machine-readable

For each architecture (the configs of bench_forward.py, d=512, 64 experts) a checkpoint is written by
save_pretrained with every weight random, plus a byte-level tokenizer; `parity()` then compares
moejax and transformers over the built-in en/he/ja sample corpus in batches of 4 x 512 tokens: 2048
tokens (the forward benchmark's batch) and 10240. Printed per run: the verdict with the measured
KL, agreements, flips and drift (a bfloat16 checkpoint gets the calibrated verdict: transformers in
float32 and in bfloat16, moejax in bfloat16), and the time of each side: moejax's forward passes (with
compilation, the first batch's share shown, and reruns with forced ties), the float32 implementation check
(each block alone), transformers' forward passes (both of its runs for a calibrated verdict), the comparison,
and the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import transformers
from bench_forward import CONFIGS

from moejax.commands.parity import ParitySettings, parity
from moejax.parity.fixtures import randomize, save_byte_tokenizer


def make(arch: str, directory: Path, dtype: str) -> Path:
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]), 0)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "all"], default="all")
    parser.add_argument("--tokens", type=int, action="append", help="tokens per run (default: 2048 and 10240)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    parser.add_argument("--json", type=Path, help="also write each run's timings here, with the ratio transformers / "
                        "moejax forward time")
    args = parser.parse_args()
    runs = {}
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    archs = CONFIGS if args.arch == "all" else [args.arch]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    print(f"moejax parity timing, batches of 4 x 512, {args.threads} torch threads, transformers "
          f"{transformers.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for dtype in dtypes:
                model_dir = make(arch, Path(tmp) / f"{arch}-{dtype}", dtype)
                for tokens in args.tokens or [2048, 10240]:
                    result = parity(ParitySettings(model=model_dir, out=None, seq_len=512, batch_size=4,
                                                   max_tokens=tokens, dtype=dtype, quiet=True))
                    s, t = result.summary, result.summary["timings"]
                    checks = ", ".join(f"{c['check']} {c['value']:.3g}{'' if c['passed'] else ' FAIL'}"
                                       for c in s["checks"])
                    print(f"{arch}, moejax {dtype} ({s['mode']} verdict), {s['tokens']} tokens: verdict "
                          f"{s['verdict']}; {checks}; ties {s['ties']} ({s['exact_ties']} exact), other flips "
                          f"{s['other_flips']}, forced {s['forced_tokens']} tokens")
                    print(f"  moejax {t['moejax_forward_s']:.1f} s (first batch with compile "
                          f"{t['moejax_first_batch_s']:.1f} s; {t['moejax_reruns']} reruns with forced ties), "
                          f"implementation check {t['implementation_s']:.1f} s, "
                          f"transformers {t['reference_forward_s']:.1f} s, "
                          f"comparison {t['compare_s']:.1f} s; loads {t['moejax_load_s']:.1f} s / "
                          f"{t['reference_load_s']:.1f} s; whole command {t['total_s']:.1f} s; transformers / "
                          f"moejax forward time {t['reference_forward_s'] / t['moejax_forward_s']:.2f}x")
                    runs[f"{arch}_{dtype}_{tokens}"] = {"verdict": s["verdict"], "tokens": s["tokens"], "timings": t}
    if args.json:
        ratios = {name: r["timings"]["reference_forward_s"] / r["timings"]["moejax_forward_s"]
                  for name, r in runs.items()}
        args.json.write_text(json.dumps({"results": runs, "ratios": ratios}, indent=2, default=float))


if __name__ == "__main__":
    main()
