"""Fixtures shared by the command tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
    """lm-eval's TaskManager parses every YAML file of the ~14,000 tasks it ships each time one is built (6 s alone,
    12 s on a busy machine): every `moejax eval` and every TaskManager of these tests paid it again. That folder
    does not change during a session, so its index is built once and each later build gets fresh copies of its
    entries (lm-eval deep-copies an entry's config before using it). Every other folder (the bundled moejax_* tasks,
    --include-path, the task folders --data-dir writes) is still parsed on each build and merged as lm-eval merges:
    in order, a later folder's task overriding an earlier one with lm-eval's warning. Processes the tests start
    (`lm_eval ...`) index as usual."""
    try:
        import lm_eval.tasks
        from lm_eval.tasks import _index
    except ImportError:  # without the eval extra nothing builds a TaskManager
        yield
        return
    own = Path(lm_eval.tasks.__file__).parent.resolve()
    original = _index.TaskIndex.build
    built: dict[bool, dict] = {}  # resolve_includes -> the index of lm-eval's own folder

    def build(paths, *, resolve_includes=True):
        index = {}
        for root in paths:
            if Path(root).resolve() == own:
                if resolve_includes not in built:
                    built[resolve_includes] = original([root], resolve_includes=resolve_includes)
                part = {name: dataclasses.replace(entry, tags=set(entry.tags))
                        for name, entry in built[resolve_includes].items()}
            else:
                part = original([root], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in index:
                    _index.log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path,
                                       index[name].yaml_path)
                index[name] = entry
        return index

    _index.TaskIndex.build = staticmethod(build)
    yield
    _index.TaskIndex.build = staticmethod(original)
