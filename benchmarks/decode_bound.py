"""What bounds a decode step's MoE layer on a CPU: the tiled expert kernel against reading the same experts' weights.

    python benchmarks/decode_bound.py                  # the Qwen3-MoE bench model's layer: 8 tokens, top-8 of 64
    python benchmarks/decode_bound.py --tokens 1 --repeats 100

At decode shape each (token, slot) pair is one row, so a layer multiplies a few rows by every expert the batch
routes to: the work is reading those experts' weights (float32 gate, up and down, [d, f] each), not arithmetic.
Timed, median of --repeats jitted calls each:
- the kernel: `mix_experts` on the bench model's shapes (d = f = 512) and a random routing;
- the same busy experts' weights read and summed, each expert's three matrices taken by index from the stacked
  [E, d, f] arrays as the kernel takes them (one pass over the busy experts, a loop on the device);
- a plain sum over one contiguous float32 array as large as all the experts' weights: the rate this machine
  streams memory at with XLA's reductions.
The kernel cannot run faster than its weights can be read: when it is as fast as the second line, reading them is
what bounds it (docs/performance.md, Generation).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_load import cpu_model

from moejax.layers.moe import mix_experts


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8, help="rows decoded at once (the generation benchmark's batch)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    e, d, f, k = args.experts, args.hidden, args.ffn, args.top_k
    rng = np.random.default_rng(0)
    w = {name: jnp.asarray(rng.normal(0.0, 0.05, shape).astype(np.float32))
         for name, shape in (("gate_edf", (e, d, f)), ("up_edf", (e, d, f)), ("down_efd", (e, f, d)))}
    x_td = jnp.asarray(rng.normal(size=(args.tokens, d)).astype(np.float32))
    ids_tk = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(args.tokens)]).astype(np.int32))
    weights_tk = jnp.asarray(rng.random((args.tokens, k)).astype(np.float32))
    busy = np.unique(np.asarray(ids_tk))
    busy_j = jnp.asarray(busy.astype(np.int32))

    kernel = jax.jit(lambda x, ids, weights, w: mix_experts(x, ids, weights, w, "swiglu"))

    @jax.jit
    def read_busy(busy_j, w):
        def one(j, total):
            expert = busy_j[j]  # not `e`, the expert count above
            return total + sum(jnp.sum(jax.lax.dynamic_index_in_dim(w[name], expert, keepdims=False)) for name in w)
        return jax.lax.fori_loop(0, busy_j.shape[0], one, jnp.float32(0))

    whole = jnp.ones((e * 3 * d * f,), jnp.float32)
    stream = jax.jit(jnp.sum)

    busy_mb = len(busy) * 3 * d * f * 4 / 1e6
    print(f"decode-shape MoE layer: {args.tokens} tokens x top-{k} of {e} experts ({len(busy)} busy), d={d}, f={f}, "
          f"float32, {os.cpu_count()} CPU threads, CPU: {cpu_model()}, jax {jax.__version__}")
    for name, fn, operands, mb in (
            ("tiled expert kernel (mix_experts)", kernel, (x_td, ids_tk, weights_tk, w), busy_mb),
            ("the busy experts' weights read by index", read_busy, (busy_j, w), busy_mb),
            ("one contiguous array as large as all experts", stream, (whole,), e * 3 * d * f * 4 / 1e6)):
        ms = median_ms(fn, *operands, repeats=args.repeats)
        print(f"  {name:46s} {ms:7.2f} ms  {mb / ms:6.1f} GB/s over {mb:6.0f} MB")


if __name__ == "__main__":
    main()
