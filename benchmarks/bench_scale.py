"""Scale-out on one machine: the expert-parallel forward on 8 simulated CPU devices against one device, and
load throughput from safetensors and from Orbax against a plain read of the same files, in one run.

    python benchmarks/bench_scale.py                 # Qwen3-MoE forward-benchmark model, batch 4 x 512
    python benchmarks/bench_scale.py --mesh data=2,expert=4

The 8 devices share this machine's cores, so no speed-up is expected: the ratio measures what the
sharded program costs over the one-device program (collectives, the all-gathered tokens, per-device
dispatch) on the same hardware. Loads: the checkpoint (float32, ~1.6 GB) is read once before timing so
all three reads come from the page cache; each load is the best of --repeats.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench_forward import CONFIGS, best_time  # noqa: E402

import moejax  # noqa: E402
from moejax.checkpoint import save_params  # noqa: E402
from moejax.parallel.mesh import make_mesh  # noqa: E402
from moejax.reference import randomize  # noqa: E402


def read_files(directory: Path) -> int:
    total = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="expert=8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, orbax_dir = Path(tmp) / "hf", Path(tmp) / "orbax"
        torch.manual_seed(0)
        randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen3_moe"]), 0).save_pretrained(hf_dir)
        single = moejax.from_pretrained(hf_dir)
        save_params(single, hf_dir, orbax_dir)
        mesh = make_mesh(args.mesh)
        sharded = moejax.from_pretrained(hf_dir, mesh=mesh)
        ids = np.random.default_rng(0).integers(0, 4096, (args.batch, args.seq))
        tokens = args.batch * args.seq

        def forward(model):
            return lambda: jax.block_until_ready(model(ids, return_router_logits=True).logits)

        forward(single)()
        forward(sharded)()
        one_s, mesh_s = best_time(forward(single), args.repeats), best_time(forward(sharded), args.repeats)
        print(f"Qwen3-MoE bench model, batch {args.batch} x {args.seq}, float32, {jax.device_count()} simulated "
              f"CPU devices on {os.cpu_count()} cores, jax {jax.__version__}")
        print(f"  forward, one device:    {tokens / one_s:8.1f} tok/s ({one_s:.2f} s)")
        print(f"  forward, mesh {args.mesh}: {tokens / mesh_s:8.1f} tok/s ({mesh_s:.2f} s); "
              f"mesh / one device = {one_s / mesh_s:.2f}x")

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


if __name__ == "__main__":
    main()
