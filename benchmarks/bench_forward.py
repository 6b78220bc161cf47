"""Forward throughput: moejax (jitted) vs transformers (PyTorch eager), same weights, same machine, same run.

    python benchmarks/bench_forward.py                       # both issue configs, batch 4 x 512
    python benchmarks/bench_forward.py --arch nemotron_h     # one of them
    python benchmarks/bench_forward.py --batch 1 --seq 128 --repeats 2   # a quick look
    python benchmarks/bench_forward.py --json forward.json   # also the numbers, machine-readable

Both sides load one checkpoint written by save_pretrained with every weight random, run float32 with
router logits requested, and use the same number of CPU threads; they alternate, a second apart, and
the best run of each is reported. Also reported: for Qwen3-MoE, the MoE layer's FLOP/s on its active
expert FLOPs as a fraction of a dense matmul's FLOP/s measured in the same run; for Nemotron-H, the
SSD scan's share of the forward time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import moejax
from moejax.layers.moe import SoftmaxMoE
from moejax.layers.ssd import ssd_chunked
from moejax.parity.fixtures import randomize

CONFIGS = {
    "qwen3_moe": transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
        norm_topk_prob=True),
    "nemotron_h": transformers.NemotronHConfig(
        vocab_size=4096, hidden_size=512, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=32,
        ssm_state_size=64, n_groups=2, chunk_size=64, n_routed_experts=64, num_experts_per_tok=6,
        moe_intermediate_size=512, moe_shared_expert_intermediate_size=512, routed_scaling_factor=2.5),
}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    return best_time(lambda: jax.block_until_ready(fn()), repeats)


def moe_layer_efficiency(cfg, tokens: int, repeats: int) -> str:
    """Qwen3-MoE block alone: active-expert FLOP/s vs a dense matmul of the same FLOPs, both jitted."""
    d, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    graphdef, state = nnx.split(SoftmaxMoE(d, f, e, k, normalize=True, rngs=nnx.Rngs(0)))
    run_moe = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    x_btd = jax.random.normal(jax.random.key(1), (1, tokens, d))
    moe_s = timed(lambda: run_moe(state, x_btd), repeats)
    a_md = jax.random.normal(jax.random.key(2), (tokens * k, d))
    w_df = jax.random.normal(jax.random.key(3), (d, 3 * f))
    dense = jax.jit(jnp.dot)
    dense_s = timed(lambda: dense(a_md, w_df), repeats)
    flops = tokens * k * 3 * 2 * d * f
    moe, peak = flops / moe_s / 1e9, flops / dense_s / 1e9
    return f"MoE layer: {moe:.1f} GFLOP/s on active-expert FLOPs = {moe / peak:.0%} of a dense matmul's {peak:.1f}"


def ssd_share(cfg, batch: int, seq: int, forward_s: float, repeats: int) -> str:
    """Time of the model's SSD scans (each Mamba layer's, run alone on its shapes) over the forward time."""
    h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (batch, seq, h, p))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, seq, h)))
    a = -jnp.exp(jax.random.normal(keys[2], (h,)))
    b, c = (jax.random.normal(k, (batch, seq, g, n)) for k in keys[3:])
    scan = jax.jit(ssd_chunked, static_argnums=5)
    scan_s = timed(lambda: scan(x, dt, a, b, c, cfg.chunk_size), repeats)
    layers = cfg.layers_block_type.count("linear_attention")
    return (f"SSD scan: {scan_s * 1e3:.1f} ms per Mamba layer x {layers} layers = "
            f"{layers * scan_s / forward_s:.0%} of the forward time")


def bench(arch: str, args) -> dict:
    cfg = CONFIGS[arch]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        reference = randomize(transformers.AutoModelForCausalLM.from_config(cfg), 0).eval()
        reference.save_pretrained(tmp)
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
    extra = (moe_layer_efficiency(cfg, tokens, args.repeats) if arch == "qwen3_moe"
             else ssd_share(cfg, args.batch, args.seq, ours_s, args.repeats))
    print(f"{arch} forward, batch {args.batch} x seq {args.seq}, float32, router logits requested, "
          f"{args.threads} torch threads, jax {jax.__version__} on {jax.default_backend()}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"  transformers eager: {ref_s:8.3f} s  {tokens / ref_s:9.1f} tok/s")
    print(f"  moejax jitted:      {ours_s:8.3f} s  {tokens / ours_s:9.1f} tok/s  (first call incl. compile "
          f"{compile_s:.1f} s)")
    print(f"  speed-up: {ref_s / ours_s:.2f}x (target >= 1.5x)")
    print(f"  {extra}")
    if args.steering:
        print(f"  {steering_row(model, ids, args.repeats)}")
    return {"tokens": tokens, "transformers_s": ref_s, "moejax_s": ours_s, "compile_s": compile_s}


def steering_row(model, ids, repeats: int) -> str:
    """A steered forward against the unsteered one, same model and tokens, alternating, best of each."""
    experts, layers = model.config.num_routed_experts, len(model.config.moe_layers)
    steering = moejax.Steering(mode="soft", lam=0.5, layers={
        layer: (tuple(range(0, experts, 4)), (experts - 1,)) for layer in range(layers)})

    def run(steer):
        jax.block_until_ready(model(ids, return_router_logits=True, steering=steer).logits)

    run(steering)
    plain, steered = [], []
    for _ in range(repeats):
        for steer, times in ((None, plain), (steering, steered)):
            time.sleep(0.5)
            times.append(best_time(lambda steer=steer: run(steer), 1))
    return (f"steered forward (soft, {layers} MoE layers, {len(steering.layers[0][0]) + 1} experts each): "
            f"{min(steered):.3f} s vs {min(plain):.3f} s unsteered = {100 * (min(steered) / min(plain) - 1):+.1f}% "
            "(target <= +3%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    parser.add_argument("--steering", action="store_true",
                        help="also time a soft-steered forward (a quarter of each MoE layer's experts promoted, one "
                        "suppressed) against the unsteered one, alternating; target <= 3%% more")
    parser.add_argument("--json", type=Path, help="also write the measured seconds and the speed-ups here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {arch: bench(arch, args) for arch in (CONFIGS if args.arch == "all" else [args.arch])}
    if args.json:
        ratios = {arch: r["transformers_s"] / r["moejax_s"] for arch, r in results.items()}
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
