"""Settings for the whole suite: no compilation cache in the user's home, markers, and the torch skip.

Markers (pyproject.toml): `torch` (needs PyTorch, the test extra: such modules skip without it), `slow`
(left out by `pytest -m "not slow"`), `multidevice` (8 simulated CPU devices, run in one worker process:
tests/multidevice/conftest.py).
"""

from __future__ import annotations

import os
import tempfile

# The commands the tests run keep their XLA compilation cache inside this test run, never in the user's home:
# one directory for the session (and the processes it starts), so an identical program compiles once.
_CACHE = tempfile.mkdtemp(prefix="moejax-test-xla-")
os.environ.setdefault("MOEJAX_COMPILATION_CACHE", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
