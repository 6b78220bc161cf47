"""Greedy generation: moejax `model.generate` (KV and Mamba-2 caches, a prefill then one compiled decode loop on the
device) against transformers' `generate` (its own caches, PyTorch eager), same weights, same machine, same run.

    python benchmarks/bench_generate.py                      # both bench models, batch 8, 128 + 128 tokens
    python benchmarks/bench_generate.py --arch qwen3_moe --new 32 --repeats 1   # a quick look
    python benchmarks/bench_generate.py --json generate.json   # also the numbers, machine-readable

Both sides load one checkpoint written by save_pretrained with every weight random (the forward benchmark's
models), run float32 on the same prompts (random ids, two rows left-padded) and must produce the same tokens (the
benchmark says if they do not). Reported per side, best of --repeats alternating between the sides (after one
warm-up run that includes moejax's compilation): the whole generation, the prefill alone (a generation of one token),
and the per-token decode time (the rest divided by the other new tokens); for moejax also its first calls (a
generation and a prefill, compiling both programs) and the compile time in them (the first calls less the same calls
warm). Target: >= 2x tokens/s over the whole generation.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from bench_forward import CONFIGS
from bench_load import cpu_model

import moejax
from moejax.parity.fixtures import randomize


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        time.sleep(1.0)
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def bench(arch: str, args) -> dict:
    cfg = CONFIGS[arch]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt))
    mask = np.ones_like(ids)
    mask[1, :17], mask[2, :64] = 0, 0
    ids = np.where(mask == 1, ids, 0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        reference = randomize(transformers.AutoModelForCausalLM.from_config(cfg), 0).eval()
        reference.save_pretrained(tmp)
        model = moejax.from_pretrained(tmp)
    ids_pt, mask_pt = torch.from_numpy(ids), torch.from_numpy(mask)

    def reference_generate(new: int):
        with torch.no_grad():
            return reference.generate(input_ids=ids_pt, attention_mask=mask_pt, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, eos_token_id=None, pad_token_id=0).numpy()

    def moejax_generate(new: int):
        return model.generate(ids, mask, max_new_tokens=new).sequences

    start = time.perf_counter()
    moejax_generate(args.new)
    moejax_generate(1)
    first_s = time.perf_counter() - start
    reference_generate(2)
    # The sides alternate, so that a busy spell of the machine does not fall on one side only.
    runs = {"transformers": reference_generate, "moejax": moejax_generate}
    times = {name: {"whole": [], "prefill": []} for name in runs}
    outs = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            whole_s, outs[name] = best(lambda run=run: run(args.new), 1)
            times[name]["whole"].append(whole_s)
            times[name]["prefill"].append(best(lambda run=run: run(1), 1)[0])
    sides = {}
    for name, t in times.items():
        whole_s, prefill_s = min(t["whole"]), min(t["prefill"])
        sides[name] = (whole_s, prefill_s, (whole_s - prefill_s) / (args.new - 1), outs[name])
    same = np.array_equal(sides["transformers"][3], sides["moejax"][3])
    tokens = args.batch * args.new
    print(f"{arch} greedy generation, batch {args.batch}, {args.prompt}-token prompts (two rows left-padded), "
          f"{args.new} new tokens, float32, {os.cpu_count()} CPU threads, CPU: {cpu_model()}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name, (whole_s, prefill_s, step_s, _) in sides.items():
        print(f"  {name:13s} {whole_s:7.2f} s  {tokens / whole_s:8.1f} new tok/s | prefill {prefill_s * 1e3:7.1f} ms | "
              f"decode {step_s * 1e3:6.1f} ms/token")
    compile_s = first_s - sides["moejax"][0] - sides["moejax"][1]
    print(f"  moejax first calls (compiling prefill and decode): {first_s:.1f} s, of which compiling {compile_s:.1f} s")
    print(f"  speed-up: {sides['transformers'][0] / sides['moejax'][0]:.2f}x (target >= 2x); decode "
          f"{sides['transformers'][2] / sides['moejax'][2]:.2f}x, "
          f"prefill {sides['transformers'][1] / sides['moejax'][1]:.2f}x; "
          f"same tokens: {'yes' if same else 'NO'}")
    return {"new_tokens": tokens, "first_calls_s": first_s, "compile_s": compile_s, "same_tokens": bool(same),
            **{name: {"whole_s": whole_s, "prefill_s": prefill_s, "decode_s_per_token": step_s}
               for name, (whole_s, prefill_s, step_s, _) in sides.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the measured seconds and the speed-ups here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    results = {arch: bench(arch, args) for arch in (CONFIGS if args.arch == "all" else [args.arch])}
    if args.json:
        ratios = {f"{arch}{part}": r["transformers"][key] / r["moejax"][key] for arch, r in results.items()
                  for part, key in (("", "whole_s"), ("_prefill", "prefill_s"), ("_decode", "decode_s_per_token"))}
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
