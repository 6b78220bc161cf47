"""Runs tests/multidevice/ on 8 simulated CPU devices, in a subprocess: XLA_FLAGS has to be set before jax
is imported, and this process imported it long ago. What those tests assert is in their docstrings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_sharded_checks_on_eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", MOEJAX_COMPILATION_CACHE="")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(HERE / "multidevice" / "sharded_checks.py")],
                            env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_two_processes_equal_one(tmp_path):
    """Two processes on localhost, 4 CPU devices each, under jax.distributed (gloo collectives): the sharded
    forward over the 8-device mesh equals this process's one-device forward (logits <= 1e-5, selected
    experts identical), with each process holding only its own devices' parameter shards; `moejax analyze`
    across both writes the same tables as one process (counts exact, the rest within 1e-5)."""
    import socket

    import numpy as np

    import moejax
    from moejax.reference import make_checkpoint

    make_checkpoint("qwen3_moe", tmp_path / "model", seed=5, vocab_size=259)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               MOEJAX_COMPILATION_CACHE="")
    worker = HERE / "multidevice" / "multihost_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(tmp_path / "model"),
                               str(tmp_path / "out.npz")], env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = np.load(tmp_path / "out.npz")
    ids = np.random.default_rng(0).integers(3, 259, (4, 24))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    want = moejax.from_pretrained(tmp_path / "model")(ids, mask, return_router_logits=True)
    content = mask.astype(bool)
    import csv

    from moejax.cli import main

    assert main(["analyze", "--quiet", "--langs", "en,he", "--out", str(tmp_path / "one-process")]) == 0
    for table in ("layers.csv", "experts.csv"):
        rows = []
        for directory in ("out-analysis", "one-process"):
            with open(tmp_path / directory / table) as f:
                rows.append(list(csv.DictReader(f)))
        assert len(rows[0]) == len(rows[1]) > 0
        for row, expected in zip(*rows, strict=True):
            for key, value in expected.items():
                try:
                    np.testing.assert_allclose(float(row[key]), float(value), rtol=1e-5, atol=1e-6, err_msg=key)
                except ValueError:
                    assert row[key] == value, key
    for spec in ("expert=8", "data=2,expert=2,tensor=2"):
        assert np.abs(results[f"{spec}/logits"] - np.asarray(want.logits))[content].max() <= 1e-5, spec
        np.testing.assert_array_equal(results[f"{spec}/expert_ids"][:, content],
                                      np.stack([np.asarray(a) for a in want.router_expert_ids])[:, content])
