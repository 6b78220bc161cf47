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
