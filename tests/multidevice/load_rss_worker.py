"""Loads a checkpoint onto an 8-device mesh and reports host memory (run by tests/test_multidevice.py with 8
simulated CPU devices). Prints one JSON line: resident memory before loading, the peak while loading
(VmHWM, reset just before), the bytes of the loaded parameters and of all their device copies (on a
CPU the devices' memory is host memory, so every replica is part of the peak) and the largest tensor
in the checkpoint.

argv: checkpoint directory, mesh spec.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import moejax
from moejax.parallel.mesh import make_mesh
from moejax.safetensors_io import SafetensorsCheckpoint


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


path, spec = sys.argv[1], sys.argv[2]
mesh = make_mesh(spec)
ckpt = SafetensorsCheckpoint(path)
largest = max(int(np.prod(ckpt.shape(k))) * 4 for k in ckpt.keys())
jax.block_until_ready(jax.device_put(np.ones(8), jax.devices()[0]))  # backend up before the baseline
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
model = moejax.from_pretrained(path, mesh=mesh)
arrays = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
params = sum(a.nbytes for a in arrays)
stored = sum(shard.data.nbytes for a in arrays for shard in a.addressable_shards)  # replicas included
print(json.dumps({"before": before, "peak": status("VmHWM"), "params": params, "stored": stored,
                  "largest": largest}))
