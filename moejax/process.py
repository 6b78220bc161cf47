"""Process-level set-up of the commands: transparent huge pages for malloc (train), XLA's persistent compilation
cache, the cache of lm-eval's task index. Kept apart and light, so that a process can set itself up before importing
the rest of moejax."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages() -> None:
    """Re-executes this process with glibc's malloc asking for transparent huge pages, unless it already does
    or $MOEJAX_HUGE_PAGES is 0. XLA on a CPU allocates each step's large temporaries afresh, and on a kernel
    whose THP mode is `madvise` every 4 KiB page of them faults in: huge pages make a bench-model train step
    ~20% faster (docs/performance.md). glibc reads its tunables only at start-up, hence the exec; a glibc
    without the tunable ignores it."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or HUGE_PAGES in tunables or os.environ.get("MOEJAX_HUGE_PAGES") == "0":
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def compilation_cache_dir() -> str | None:
    """Where the commands keep XLA's persistent compilation cache (e.g. ~7 s -> ~2.5 s to a Nemotron-H benchmark
    model's first forward on a CPU): $MOEJAX_COMPILATION_CACHE, default ~/.cache/moejax/xla; empty: off."""
    return _cache_dir("MOEJAX_COMPILATION_CACHE", "xla")


def task_index_cache_dir() -> str | None:
    """Where `moejax eval` and the studies keep the index of lm-eval's own task folder (~14,000 YAML files, ~6 s to
    parse on every evaluation; moejax.evaluation.task_index): $MOEJAX_TASK_INDEX_CACHE, default
    ~/.cache/moejax/lm_eval; empty: off."""
    return _cache_dir("MOEJAX_TASK_INDEX_CACHE", "lm_eval")


def _cache_dir(variable: str, name: str) -> str | None:
    where = os.environ.get(variable, str(Path.home() / ".cache" / "moejax" / name))
    return where or None
