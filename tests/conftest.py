"""Settings for the whole suite: no compilation cache in the user's home, markers, and the torch skip.

Markers (pyproject.toml): `torch` (needs PyTorch, the test extra: such modules skip without it), `slow`
(left out by `pytest -m "not slow"`), `multidevice` (8 simulated CPU devices, run in one worker process:
tests/multidevice/conftest.py).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
import time

import pytest

# The commands the tests run keep their XLA compilation cache and lm-eval's task index inside this test run, never in
# the user's home: one directory for the session (and the processes it starts, pytest-xdist's workers included), so
# an identical program compiles once and lm-eval's ~14,000 task files are parsed once. The process that made it
# removes it when it exits.
if "MOEJAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["MOEJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="moejax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["MOEJAX_TEST_XLA_CACHE"], ignore_errors=True)
os.environ.setdefault("MOEJAX_COMPILATION_CACHE", os.environ["MOEJAX_TEST_XLA_CACHE"])
os.environ.setdefault("MOEJAX_TASK_INDEX_CACHE", os.path.join(os.environ["MOEJAX_TEST_XLA_CACHE"], "lm_eval"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MOEJAX_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The processes the tests start share that cache; this process keeps its compiled programs in memory only. XLA's CPU
# client has aborted here while serialising a program for the persistent cache, late in a full run (in
# `executable.serialize()`, never when the same tests ran alone); in-process, the cache would only save
# recompiling what this process already holds.
import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


# A process's resident memory above which the compiled programs are dropped at the end of a test module.
COMPILED_PROGRAMS_RSS_LIMIT = 4 << 30
# The share of the kernel's limit on a process's memory mappings (vm.max_map_count, 65,530 by default) above which the
# same happens. XLA:CPU maps each compiled program's code in sections of its own (about six mappings for a small
# program, hundreds for a model), and a process that reaches the limit dies: LLVM's "Unable to allocate section
# memory!" aborts the whole process while it compiles. A full run reached it in one xdist worker at 3 GiB resident.
COMPILED_PROGRAMS_MAPPINGS_SHARE = 0.5
# Within a module the mappings are also checked between tests, at most every MAPPINGS_CHECK_EVERY_S seconds (reading
# /proc/self/maps takes ~1 ms per 1,000 mappings), against three quarters of the limit: one module can reach it alone
# (tests/multidevice/test_sharded.py's 8-device worker ends at ~57,000 mappings; one of its tests adds up to ~6,000).
WITHIN_MODULE_MAPPINGS_SHARE = 0.75
MAPPINGS_CHECK_EVERY_S = 10.0
_mappings_checked = {"at": 0.0}


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere, so the programs are kept)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_mappings() -> tuple[int, int]:
    """This process's memory mappings now and the kernel's limit on them (Linux /proc; (0, 1) elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            mapped = f.read().count(b"\n")
        with open("/proc/sys/vm/max_map_count") as f:
            return mapped, int(f.read())
    except (OSError, ValueError):
        return 0, 1


def compiled_programs_too_many() -> bool:
    """Whether this process should drop its compiled programs: its memory or its mappings are past their limits."""
    mapped, limit = memory_mappings()
    return resident_bytes() > COMPILED_PROGRAMS_RSS_LIMIT or mapped > COMPILED_PROGRAMS_MAPPINGS_SHARE * limit


def drop_compiled_programs() -> None:
    """This process's compiled programs (and what only they held) are freed."""
    jax.clear_caches()
    gc.collect()


def pytest_collection_finish(session):
    """What collection imported (jax, torch, transformers, lm-eval: ~10^6 objects) lives to the end, so it leaves
    the garbage collector's scans: each full collection walked all of it (~0.5 s, ~8% of a worker's time)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Modules share compiled programs (the same tiny configs and shapes compile once per process), until the
    process's memory or its memory mappings pass their limits (above): then the programs (and the module's models)
    are dropped when the module ends."""
    yield
    gc.collect()
    if compiled_programs_too_many():
        drop_compiled_programs()


@pytest.fixture(autouse=True)
def _release_compiled_programs_within_a_module():
    """A module whose tests compile enough programs to near the limit on mappings drops them between its tests."""
    yield
    now = time.monotonic()
    if now - _mappings_checked["at"] < MAPPINGS_CHECK_EVERY_S:
        return
    _mappings_checked["at"] = now
    mapped, limit = memory_mappings()
    if mapped > WITHIN_MODULE_MAPPINGS_SHARE * limit:
        drop_compiled_programs()
