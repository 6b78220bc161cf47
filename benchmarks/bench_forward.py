"""Forward throughput: moejax (jitted) vs transformers (PyTorch eager), same weights, same machine, same run.

    python benchmarks/bench_forward.py                 # the issue's Qwen3-MoE config, batch 4 x 512
    python benchmarks/bench_forward.py --batch 1 --seq 128 --repeats 2   # a quick look

Both sides load one checkpoint written by save_pretrained with every weight random, run float32 with
router logits requested, and use the same number of CPU threads. Also reported: the MoE layer's
achieved FLOP/s on active-expert FLOPs as a fraction of a dense matmul's FLOP/s measured here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import moejax
from moejax.layers.moe import SoftmaxMoE
from moejax.reference import randomize

QWEN3_BENCH = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=64,
                   num_experts_per_tok=8, moe_intermediate_size=512, norm_topk_prob=True)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def moe_layer_efficiency(cfg, tokens: int, repeats: int) -> tuple[float, float]:
    """(MoE block active-expert GFLOP/s, dense matmul GFLOP/s), both jitted, measured back to back."""
    d, f, e, k = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    block = SoftmaxMoE(d, f, e, k, normalize=True, rngs=nnx.Rngs(0))
    x_btd = jax.random.normal(jax.random.key(1), (1, tokens, d))
    graphdef, state = nnx.split(block)
    run_moe = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    jax.block_until_ready(run_moe(state, x_btd))
    moe_s = best_time(lambda: jax.block_until_ready(run_moe(state, x_btd)), repeats)
    active_flops = tokens * k * 3 * 2 * d * f
    a_md = jax.random.normal(jax.random.key(2), (tokens * k, d))
    w_df = jax.random.normal(jax.random.key(3), (d, 3 * f))
    dense = jax.jit(jnp.dot)
    jax.block_until_ready(dense(a_md, w_df))
    dense_s = best_time(lambda: jax.block_until_ready(dense(a_md, w_df)), repeats)
    return active_flops / moe_s / 1e9, active_flops / dense_s / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    ids = np.random.default_rng(0).integers(0, QWEN3_BENCH["vocab_size"], (args.batch, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        reference = randomize(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_BENCH)), 0)
        reference.eval().save_pretrained(tmp)
        model = moejax.from_pretrained(tmp)

    ids_pt = torch.from_numpy(ids)

    def run_reference():
        with torch.no_grad():
            reference(ids_pt, output_router_logits=True)

    def run_moejax():
        jax.block_until_ready(model(ids, return_router_logits=True))

    start = time.perf_counter()
    run_moejax()
    compile_s = time.perf_counter() - start
    run_reference()
    # Alternate the sides, pausing between them, so neither runs while the other's worker threads
    # are still spinning down; the best run of each side is reported.
    ref_times, ours_times = [], []
    for _ in range(args.repeats):
        for run, times in ((run_reference, ref_times), (run_moejax, ours_times)):
            time.sleep(1.0)
            times.append(best_time(run, 1))
    ref_s, ours_s = min(ref_times), min(ours_times)

    tokens = args.batch * args.seq
    moe_gflops, dense_gflops = moe_layer_efficiency(QWEN3_BENCH, tokens, args.repeats)
    print(f"qwen3_moe forward, batch {args.batch} x seq {args.seq}, float32, router logits requested, "
          f"{args.threads} torch threads, jax {jax.__version__} on {jax.default_backend()}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"  transformers eager: {ref_s:8.3f} s  {tokens / ref_s:9.1f} tok/s")
    print(f"  moejax jitted:      {ours_s:8.3f} s  {tokens / ours_s:9.1f} tok/s  (first call incl. compile "
          f"{compile_s:.1f} s)")
    print(f"  speed-up: {ref_s / ours_s:.2f}x (target >= 1.5x)")
    print(f"  MoE layer: {moe_gflops:.1f} GFLOP/s on active-expert FLOPs = {moe_gflops / dense_gflops:.0%} of "
          f"a dense matmul's {dense_gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
