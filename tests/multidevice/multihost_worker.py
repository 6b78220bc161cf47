"""One of two processes of the multi-host check (tests/test_multidevice.py starts both): 4 CPU devices
each, joined by jax.distributed into one 8-device mesh, running the same code as one process would.

argv: process id, coordinator port, checkpoint directory, output .npz (written by process 0).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import moejax
from moejax.parallel.mesh import make_mesh

process_id, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4

ids = np.random.default_rng(0).integers(3, 259, (4, 24))
mask = np.ones_like(ids)
mask[1, 17:] = 0
results = {}
for spec in ("expert=8", "data=2,expert=2,tensor=2"):
    model = moejax.from_pretrained(checkpoint, mesh=make_mesh(spec))
    got = model(ids, mask, return_router_logits=True)
    results[f"{spec}/logits"] = multihost_utils.process_allgather(got.logits, tiled=True)
    results[f"{spec}/expert_ids"] = multihost_utils.process_allgather(jax.numpy.stack(got.router_expert_ids),
                                                                      tiled=True)
    # Each process holds (and read) only the parameter shards of its own devices.
    experts = model.layers.units[0][0].mlp.experts.up_edf[...]
    assert len(experts.addressable_shards) == 4 and not experts.is_fully_addressable
if process_id == 0:
    np.savez(out, **results)

# The analysis command across both processes: each computes every chunk's statistics, the first writes OUT.
from moejax.cli import main  # noqa: E402

assert main(["analyze", "--quiet", "--langs", "en,he", "--mesh", "data=2,expert=4",
             "--out", out.replace(".npz", "-analysis")]) == 0
jax.distributed.shutdown()
