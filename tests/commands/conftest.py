"""Fixtures shared by the command tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint with the byte-level tokenizer (a module's own `checkpoint` overrides it)."""
    from moejax.parity.fixtures import make_checkpoint

    path = tmp_path_factory.mktemp("checkpoint") / "model"
    make_checkpoint("qwen3_moe", path, seed=3, byte_tokenizer=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _lm_eval_indexes_its_own_tasks_once():
    """Every TaskManager of these tests (not only those `moejax eval` builds) reads lm-eval's own task index from the
    session's cache (tests/conftest.py sets $MOEJAX_TASK_INDEX_CACHE), as the commands do: its ~14,000 YAML files
    are parsed once for the whole run, by whichever process gets there first."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError:  # without the eval extra nothing builds a TaskManager
        return
    from moejax.evaluation.task_index import cache_task_index

    cache_task_index()
