"""Detection floors of `moejax parity`: the smallest error of each kind that its verdict catches, per architecture
and dtype, and the honest margins (no false alarm) over several seeds.

    python benchmarks/parity_floor.py                       # both architectures, float32 and bfloat16, 10 seeds
    python benchmarks/parity_floor.py --arch qwen3_moe --dtype bfloat16 --seeds 3 --json floors.json

For each architecture and dtype, a tiny checkpoint (moejax.parity.fixtures's test config, byte vocabulary, every
parameter random) is written by save_pretrained and the reference is run once on the built-in en/he/ja sample
(--tokens in --seq-len sequences). Each fault kind of moejax.parity.faults is then injected into the moejax side at
decreasing magnitudes (scales x(1+m), epsilon factors, shifts, windows) until the verdict passes; the table gives the
smallest magnitude that failed and which part of the verdict caught it (the float32 implementation check, the
end-to-end comparison, or both). A magnitude that leaves the model unchanged (a scaling that rounds away in
bfloat16 weights) is named as such. Then honest checkpoints of --seeds seeds run through the same verdict: every
one must pass; printed are the worst margin of each check (value / bound, the largest over seeds) and, for the
calibrated 16-bit verdict, the largest ratio of moejax's per-token error statistic to transformers' own, from which
its multiples are set (docs/parity.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_load import cpu_model

import moejax
from moejax.data.tokenize import HFTokenizer
from moejax.parity.faults import KINDS, Fault, FaultMissed, inject, kinds_for, rare_expert
from moejax.parity.fixtures import make_checkpoint
from moejax.parity.session import Session
from moejax.parity.tally import STATISTICS
from moejax.parity.tokens import batches, corpus_sequences

LADDERS = {
    "scale": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6],
    "shift": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6],
    "factor": [1e4, 1e3, 1e2, 10, 3, 1.5, 1.1, 1.01],
}


def windows(seq_len: int) -> list[int]:
    """Sliding windows from half the sequence up to one token short of it: ever fewer tokens affected."""
    out, gap = [], seq_len // 2
    while gap >= 1:
        out.append(seq_len - gap)
        gap //= 2
    return out


@dataclasses.dataclass
class Case:
    """One checkpoint with the reference's outputs computed once (a parity Session), and moejax loaded."""

    arch: str
    session: Session
    model: object
    rare: tuple[int, int]
    rare_share: float

    @property
    def mode(self) -> str:
        return self.session.mode

    @property
    def batches(self) -> list:
        return self.session.batches

    def verdict(self, model):
        return self.session.verdict(model)


def make_case(arch: str, dtype: str, seed: int, tmp: Path, tokens: int, seq_len: int, batch_size: int) -> Case:
    path = tmp / f"{arch}-{dtype}-{seed}"
    make_checkpoint(arch, path, seed=seed, byte_tokenizer=True)
    tokenizer = HFTokenizer(path)
    session = Session(path, dtype, batches(corpus_sequences(None, ["en", "he", "ja"], tokenizer, seq_len, tokens),
                                           batch_size, tokenizer.pad_id))
    overrides = {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}
    model = moejax.from_pretrained(path, dtype=getattr(jnp, dtype), **overrides)
    middle = len(session.cfg.moe_layers) // 2
    truths = [rb.truth for rb in session.reference]
    counts = np.bincount(np.concatenate([t.router_ids[middle].ravel() for t in truths]),
                         minlength=session.cfg.num_routed_experts)
    rare = rare_expert(model, counts)
    return Case(arch, session, model, rare, float(counts[rare[1]] / sum(len(t.logits) for t in truths)))


def caught_by(result) -> str:
    sections = sorted({c["section"] for c in result.summary["checks"] if not c["passed"]})
    return {"end_to_end": "end to end", "implementation": "implementation"}.get(
        "+".join(sections), "implementation + end to end")


def floor(case: Case, kind: str) -> dict:
    """The smallest magnitude of `kind` the verdict fails on: its ladder's largest first, then a bisection for the
    boundary between caught and passed (a larger error of one kind is never easier to miss), each step a full
    verdict."""
    how = KINDS[kind][1]
    seq_len = case.batches[0].ids.shape[1]
    ladder = windows(seq_len) if how == "window" else LADDERS[how]
    probe = (case.batches[0].ids, case.batches[0].mask)
    outcomes: dict[int, tuple[bool, str | None]] = {}

    def caught(i: int) -> bool:
        if i not in outcomes:
            fault = Fault(kind, ladder[i])
            try:
                result = case.verdict(inject(case.model, fault, probe=probe, rare=case.rare))
                outcomes[i] = (not result.passed, None if result.passed else caught_by(result))
            except FaultMissed:
                outcomes[i] = (False, "missed")
        return outcomes[i][0]

    row = {"kind": kind, "how": how, "largest_tried": ladder[0], "smallest_caught": None, "caught_by": None,
           "stopped": None}
    if not caught(0):
        return row | {"stopped": f"{Fault(kind, ladder[0])} " + ("changes nothing" if outcomes[0][1] else "passes")}
    low, high = 0, len(ladder)  # ladder[low] is caught; ladder[high] (past the end: none) is not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if caught(middle) else (low, middle)
    row |= {"smallest_caught": ladder[low], "caught_by": outcomes[low][1]}
    if high < len(ladder):
        below = Fault(kind, ladder[high])
        row["stopped"] = f"{below} " + ("changes nothing" if outcomes[high][1] == "missed" else "passes")
    return row


def shown(row: dict, seq_len: int) -> str:
    if row["smallest_caught"] is None:
        return f"not caught at {Fault(row['kind'], row['largest_tried'])}"
    if row["how"] == "window":
        return f"window {int(row['smallest_caught'])} of {seq_len} tokens"
    return str(Fault(row["kind"], row["smallest_caught"])).split(" ", 1)[1]


def honest(case: Case) -> dict:
    """The honest model's verdict: every check's value over its bound, and (calibrated) moejax's statistics over
    transformers' own."""
    result = case.verdict(case.model)
    margins = {}
    for c in result.summary["checks"]:
        if c["tolerance"] is None:
            continue
        value, bound = c["value"], c["tolerance"]
        if c["op"] == "<=":
            margins[c["check"]] = value / bound if bound > 0 else (0.0 if value == 0 else math.inf)
        else:  # agreements: the misses over the misses allowed
            margins[c["check"]] = (1 - value) / (1 - bound) if bound < 1 else 0.0
    ratios = {}
    if case.mode == "calibrated":
        overall = result.summary["overall"]
        for s in STATISTICS:
            ratios[f"kl_{s}"] = math.sqrt(overall[f"kl_{s}"] / max(overall[f"kl_{s}_reference"], 1e-300))
            ratios[f"logits_{s}"] = overall[f"logits_{s}"] / overall[f"logits_{s}_reference"]
            ratios[f"hidden_{s}"] = max(r[f"hidden_{s}"] / r[f"hidden_{s}_reference"] for r in result.layers)
            moe = [r for r in result.layers if "moe_layer" in r]
            ratios[f"router_logit_{s}"] = max(r[f"router_logit_{s}"] / r[f"router_logit_{s}_reference"] for r in moe)
    return {"passed": result.passed, "margins": margins, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["qwen3_moe", "nemotron_h", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=10, help="honest checkpoints per architecture and dtype")
    parser.add_argument("--tokens", type=int, default=768, help="tokens compared per run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--kinds", default="all", help="comma-separated fault kinds (default: every one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    archs = ["qwen3_moe", "nemotron_h"] if args.arch == "all" else [args.arch]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    started = time.perf_counter()
    print(f"moejax parity detection floors: {args.tokens} tokens per run ({args.seq_len}-token sequences), tiny "
          f"checkpoints, CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    results = {"cpu": cpu_model(), "tokens": args.tokens, "seq_len": args.seq_len, "floors": [], "honest": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for dtype in dtypes:
                case = make_case(arch, dtype, 0, Path(tmp), args.tokens, args.seq_len, args.batch_size)
                kinds = kinds_for(case.model) if args.kinds == "all" else [k for k in args.kinds.split(",")
                                                                            if k in kinds_for(case.model)]
                jax.clear_caches()  # each epsilon, theta or window compiled programs of its own: let them go
                print(f"\n{arch} {dtype} (rare expert: MoE layer {case.rare[0]}, expert {case.rare[1]}, "
                      f"{case.rare_share:.1%} of tokens)")
                for kind in kinds:
                    row = floor(case, kind) | {"arch": arch, "dtype": dtype}
                    results["floors"].append(row)
                    caught = shown(row, case.batches[0].ids.shape[1])
                    print(f"  {kind:<18} smallest caught: {caught:<26} by {row['caught_by'] or '-':<28} "
                          f"({row['stopped'] or 'every magnitude tried was caught'})", flush=True)
        for arch in archs:
            for dtype in dtypes:
                runs = [honest(make_case(arch, dtype, seed, Path(tmp), args.tokens, args.seq_len, args.batch_size))
                        for seed in range(args.seeds)]
                worst = {name: max(r["margins"][name] for r in runs) for name in runs[0]["margins"]}
                ratios = {name: max(r["ratios"][name] for r in runs) for name in runs[0]["ratios"]}
                passed = sum(r["passed"] for r in runs)
                results["honest"].append({"arch": arch, "dtype": dtype, "seeds": args.seeds, "passed": passed,
                                          "worst_margin": worst, "worst_ratio": ratios})
                tight = sorted(worst.items(), key=lambda kv: -kv[1])[:4]
                print(f"\nhonest {arch} {dtype}: {passed}/{args.seeds} seeds pass; tightest margins (value / bound, "
                      "worst seed): " + ", ".join(f"{k} {v:.2f}" for k, v in tight))
                if ratios:
                    print("  moejax / transformers 16-bit, worst seed: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    results["seconds"] = time.perf_counter() - started
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
