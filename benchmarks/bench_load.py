"""What the check for non-finite weights costs at load: from_pretrained with and without it, same checkpoint, one run.

    python benchmarks/bench_load.py                   # the forward benchmark's Qwen3-MoE, float32 and bfloat16 on disk
    python benchmarks/bench_load.py --repeats 5
    python benchmarks/bench_load.py --json load.json  # also the numbers, machine-readable

After the parameters are loaded, one jitted reduction over them on their devices flags any array holding a NaN or
an infinity (moejax.loading.check_finite), then names the tensor: a CheckpointError unless allow_nonfinite=True.
The two loads alternate, after one untimed read puts the files in the page cache; the best and the median of
--repeats are reported for each, and the check alone (its first call compiles it), with the CPU model. Target: the
check costs at most 5% of a load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import torch
import transformers
from bench_forward import CONFIGS
from flax import nnx

import moejax
from moejax.loading import check_finite
from moejax.parity.fixtures import randomize


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                simd = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"
                return f"{line.split(':', 1)[1].strip()} ({simd})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_seconds(path: Path, dtype, allow_nonfinite: bool) -> float:
    start = time.perf_counter()
    model = moejax.from_pretrained(path, dtype=dtype, allow_nonfinite=allow_nonfinite)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        help="also write the measured seconds here, with the ratio unchecked / checked load time")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    print(f"from_pretrained with and without the finiteness check; CPU: {cpu_model()}, jax {jax.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for disk, dtype in (("float32", jax.numpy.float32), ("bfloat16", jax.numpy.bfloat16)):
            path = Path(tmp) / disk
            torch.manual_seed(0)
            model = randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen3_moe"]), 0)
            model.to(getattr(torch, disk)).save_pretrained(path)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            load_seconds(path, dtype, True)  # page cache, compilation of nothing: the files are read once
            checked, unchecked = [], []
            for _ in range(args.repeats):
                unchecked.append(load_seconds(path, dtype, True))
                checked.append(load_seconds(path, dtype, False))
            model = moejax.from_pretrained(path, dtype=dtype, allow_nonfinite=True)
            jax.clear_caches()
            alone = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                check_finite(model, path)
                alone.append(time.perf_counter() - start)
            best, middle = min(unchecked), statistics.median(unchecked)
            print(f"{disk} on disk ({size / 2**30:.2f} GiB), loaded as {disk}: unchecked best {best:.2f} s, median "
                  f"{middle:.2f} s; checked best {min(checked):.2f} s, median {statistics.median(checked):.2f} s; the "
                  f"check alone {min(alone[1:]):.3f} s ({100 * min(alone[1:]) / best:.1f}% of the best unchecked load; "
                  f"its first call, compiling, {alone[0]:.3f} s = {100 * alone[0] / best:.1f}%)")
            results[disk] = {"bytes": size, "unchecked_s": unchecked, "checked_s": checked, "check_alone_s": alone}
    if args.json:
        ratios = {disk: min(r["unchecked_s"]) / min(r["checked_s"]) for disk, r in results.items()}
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
