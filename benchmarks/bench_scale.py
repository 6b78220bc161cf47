"""Scale-out on one machine: the sharded forward on 8 simulated CPU devices against one device for each expert
exchange, the bytes one MoE layer's exchange moves at expert = 4 .. 64, and load throughput, in one run.

    python benchmarks/bench_scale.py                          # Qwen3-MoE forward-benchmark model, batch 4 x 512
    python benchmarks/bench_scale.py --arch nemotron_h --mesh data=2,tensor=4
    python benchmarks/bench_scale.py --bytes-only             # the bytes table alone (docs/scaling.md)
    python benchmarks/bench_scale.py --json scale.json        # also the numbers, machine-readable

The 8 devices share this machine's cores, so no speed-up is expected: the ratio measures what the sharded program
costs over the one-device program (collectives, the exchanged tokens, per-device dispatch) on the same hardware.
XLA:CPU has no ragged all-to-all, so here all_to_all moves whole slots by a dense all-to-all (as many bytes as the
all-gather); its saving is in the ragged exchange TPU and GPU run, shown by the bytes table.

Bytes table: one MoE layer of Qwen3-30B-A3B's shape (hidden 2048, expert ffn 768, 128 experts, top-8), 2048
tokens per device, float32 activations (XLA:CPU promotes bfloat16 collectives to float32, so a bfloat16 program's
CPU HLO would not show what a TPU moves; in bfloat16 the activation terms halve), compiled from shapes (no weights)
on 64 simulated devices in a child process for each expert-axis size. The bytes into each device are read from the
compiled HLO's collectives (moejax.parallel.hlo) and printed beside the formula. The ragged exchange's bytes depend
on the routing at run time: its row is the formula's expectation under uniform routing and a count over routing
drawn uniformly (seeded).

Loads: the checkpoint (float32, ~1.6 GB) is read once before timing so all three reads come from the page cache;
each load is the best of --repeats.
"""

from __future__ import annotations

import os
import sys

if "--bytes-child" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=64"
else:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.layers.moe import expert_parallel  # noqa: E402
from moejax.parallel.hlo import bytes_in_by_kind, exchange_bytes  # noqa: E402
from moejax.parallel.mesh import make_mesh  # noqa: E402

EXPERT_AXES = (4, 8, 16, 64)
# One MoE layer of Qwen3-30B-A3B, float32 activations (the module docstring says why), 2048 tokens per device.
LAYER = dict(hidden=2048, ffn=768, experts=128, top_k=8, tokens=2048)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def layer_bytes(devices: int) -> dict:
    """Bytes into each device for one MoE layer on expert=`devices`, from the compiled HLO and from the formula."""
    d, f, e, k, t = (LAYER[n] for n in ("hidden", "ffn", "experts", "top_k", "tokens"))
    mesh = make_mesh(f"expert={devices}")
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None))
    expert_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    tokens = t * devices
    args = (jax.ShapeDtypeStruct((tokens, d), jnp.float32, sharding=spec),
            jax.ShapeDtypeStruct((tokens, k), jnp.int32, sharding=spec),
            jax.ShapeDtypeStruct((tokens, k), jnp.float32, sharding=spec),
            {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=expert_spec)
             for name, shape in (("gate_edf", (e, d, f)), ("up_edf", (e, d, f)), ("down_efd", (e, f, d)))})
    row = {"expert": devices}
    for exchange in ("all_gather", "all_to_all"):
        with jax.set_mesh(mesh):
            text = jax.jit(lambda x, i, wt, w, ex=exchange: expert_parallel(x, i, wt, w, "swiglu", mesh, exchange=ex)
                           ).lower(*args).compile().as_text()
        row[f"{exchange}_hlo"] = sum(bytes_in_by_kind(text).values())
        row[f"{exchange}_formula"] = exchange_bytes(exchange, devices, t, d, k, 4)
    row["ragged_expected"] = exchange_bytes("ragged", devices, t, d, k, 4, experts=e)
    # Uniform routing drawn: each token's k distinct experts, and the other devices it must reach.
    rng = np.random.default_rng(devices)
    chosen = np.argsort(rng.random((t, e)), axis=1)[:, :k] // (e // devices)
    reached = np.array([len(set(c) - {0}) for c in chosen])  # this device is device 0
    row["ragged_drawn"] = exchange_bytes("ragged", devices, t, d, k, 4, sent_rows=float(reached.sum()))
    return row


def bytes_table() -> list[dict]:
    """The table, computed in a child process with 64 simulated devices."""
    done = subprocess.run([sys.executable, __file__, "--bytes-child"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_bytes(rows: list[dict]) -> None:
    mib = 2 ** 20
    print(f"Bytes into each device per MoE layer (Qwen3-30B-A3B layer, float32 activations, {LAYER['tokens']} "
          "tokens per device; MiB):")
    print("| expert | all-gather: HLO | formula | all-to-all (dense, CPU): HLO | formula "
          "| ragged (TPU/GPU): expected | drawn | ragged / all-gather |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['expert']} | {r['all_gather_hlo'] / mib:.2f} | {r['all_gather_formula'] / mib:.2f} "
              f"| {r['all_to_all_hlo'] / mib:.2f} | {r['all_to_all_formula'] / mib:.2f} "
              f"| {r['ragged_expected'] / mib:.2f} | {r['ragged_drawn'] / mib:.2f} "
              f"| {r['ragged_expected'] / r['all_gather_formula']:.2f} |")


def forward_benchmark(args) -> dict:
    import torch
    import transformers
    from bench_forward import CONFIGS, best_time

    import moejax
    from moejax.checkpoint import save_params
    from moejax.parity.fixtures import randomize

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, orbax_dir = Path(tmp) / "hf", Path(tmp) / "orbax"
        torch.manual_seed(0)
        randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS[args.arch]), 0).save_pretrained(hf_dir)
        overrides = {"dt_floor": "time_step_min"} if args.arch == "nemotron_h" else {}
        single = moejax.from_pretrained(hf_dir, **overrides)
        save_params(single, hf_dir, orbax_dir)
        mesh = make_mesh(args.mesh)
        ids = np.random.default_rng(0).integers(0, 4096, (args.batch, args.seq))
        tokens = args.batch * args.seq

        def forward(model):
            return lambda: jax.block_until_ready(model(ids, return_router_logits=True).logits)

        forward(single)()
        one_s = best_time(forward(single), args.repeats)
        results = {"tokens": tokens, "one_device_s": one_s}
        print(f"{args.arch} bench model, batch {args.batch} x {args.seq}, float32, {jax.device_count()} simulated "
              f"CPU devices on {os.cpu_count()} cores ({cpu_model()}), jax {jax.__version__}")
        print(f"  forward, one device: {tokens / one_s:8.1f} tok/s ({one_s:.2f} s)")
        exchanges = ("all_gather", "all_to_all") if mesh.shape["expert"] > 1 else ("auto",)
        for exchange in exchanges:
            sharded = moejax.from_pretrained(hf_dir, mesh=mesh, expert_exchange=exchange, **overrides)
            forward(sharded)()
            mesh_s = best_time(forward(sharded), args.repeats)
            print(f"  forward, mesh {args.mesh}, {exchange}: {tokens / mesh_s:8.1f} tok/s ({mesh_s:.2f} s); "
                  f"one device / mesh = {one_s / mesh_s:.2f}x (overhead {mesh_s / one_s - 1:+.0%})")
            results[f"mesh_{exchange}_s"] = mesh_s
        if args.skip_loads:
            return results
        size = read_files(hf_dir)  # warms the page cache
        raw_s = best_time(lambda: read_files(hf_dir), args.repeats)
        read_files(orbax_dir)

        def load(directory):
            return lambda: jax.block_until_ready(jax.tree.leaves(moejax.from_pretrained(directory, mesh=mesh)))

        st_s, orbax_s = best_time(load(hf_dir), args.repeats), best_time(load(orbax_dir), args.repeats)
        gb = size / 1e9
        print(f"  load {gb:.2f} GB onto {args.mesh} (page cache warm): raw read {gb / raw_s:.2f} GB/s, "
              f"safetensors {gb / st_s:.2f} GB/s ({raw_s / st_s:.0%} of raw), Orbax {gb / orbax_s:.2f} GB/s "
              f"({raw_s / orbax_s:.0%} of raw)")
        return results | {"load_bytes": size, "raw_read_s": raw_s, "safetensors_s": st_s, "orbax_s": orbax_s}


def read_files(directory: Path) -> int:
    total = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def main() -> None:
    if "--bytes-child" in sys.argv:
        print(json.dumps([layer_bytes(n) for n in EXPERT_AXES]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "nemotron_h"))
    parser.add_argument("--mesh", default="expert=8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-loads", action="store_true", help="time the forward passes only")
    parser.add_argument("--bytes-only", action="store_true", help="print the bytes table only")
    parser.add_argument("--json", type=Path, help="also write the bytes table, the timings and the ratios (mesh over "
                        "one-device speed, load over raw-read speed) here")
    args = parser.parse_args()
    rows = bytes_table()
    print_bytes(rows)
    results = {} if args.bytes_only else forward_benchmark(args)
    if args.json:
        ratios = {f"{args.arch}_{args.mesh}_{key[len('mesh_'):-len('_s')]}": results["one_device_s"] / seconds
                  for key, seconds in results.items() if key.startswith("mesh_")}
        ratios |= {f"load_{kind}": results["raw_read_s"] / results[f"{kind}_s"] for kind in ("safetensors", "orbax")
                   if f"{kind}_s" in results}
        args.json.write_text(json.dumps({"bytes": rows, "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
