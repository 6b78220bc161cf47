"""lm-eval's own task index kept on disk (moejax.evaluation.task_index): the index read back is the parsed one, entry
for entry and in order; an edited, added or removed task file, a corrupt cache file, a value JSON cannot hold and a
cache that cannot be written each fall back to parsing, never to a stale, wrong or half-written index."""

from __future__ import annotations

import json
import logging
import os

import pytest

pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager, _index  # noqa: E402

from moejax.evaluation import task_index  # noqa: E402

TASKS = {
    "a/one.yaml": "task: one\ntag: [family, first]\ndataset_path: json\noutput_type: multiple_choice\n"
                  "doc_to_text: '{{question}}'\ndoc_to_choice: ['A', 'B']\n",
    "a/two.yaml": "include: one.yaml\ntask: two\ndoc_to_text: 'Q: {{question}}'\n",
    "b/group.yaml": "group: both\ntask: [one, two]\naggregate_metric_list:\n"
                    "  - metric: acc\n    weight_by_size: true\n",
    "b/three.yaml": "task: three\ntag: family\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n"
                    "num_fewshot: 0\nscale: 1.5\nnothing: null\n",
}


class Parser:
    """lm-eval's own parse, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, paths, *, resolve_includes=True):
        self.calls += 1
        return type(self).original(paths, resolve_includes=resolve_includes)

    original = staticmethod(getattr(_index.TaskIndex.build, "__wrapped__", _index.TaskIndex.build))  # lm-eval's parse


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("MOEJAX_TASK_INDEX_CACHE", str(where))
    task_index._fingerprint.cache_clear()  # each test starts as a new process would
    yield where
    task_index._fingerprint.cache_clear()


def write_tasks(root, tasks=TASKS):
    for name, text in tasks.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def parsed(root, resolve_includes=True):
    return Parser.original([root], resolve_includes=resolve_includes)


def assert_same_index(got, want):
    assert got == want and list(got) == list(want)
    assert {e.kind for e in want.values()} == {_index.Kind.TASK, _index.Kind.GROUP, _index.Kind.TAG}


@pytest.mark.parametrize("resolve_includes", [True, False])
def test_the_index_read_back_is_the_parsed_one(tmp_path, cache, resolve_includes):
    root = write_tasks(tmp_path / "tasks")
    parse = Parser()
    first = task_index._cached(parse, root, resolve_includes)
    assert parse.calls == 1 and len(list(cache.glob("tasks-*.json"))) == 1
    assert_same_index(first, parsed(root, resolve_includes))
    first["one"].tags.add("mutated")  # what one build's caller does to its entries reaches no later build
    first["one"].cfg["doc_to_text"] = "mutated"
    again = task_index._cached(parse, root, resolve_includes)
    assert parse.calls == 1  # read back, not parsed
    assert_same_index(again, parsed(root, resolve_includes))
    assert again["two"].cfg["doc_to_text"] == "Q: {{question}}"
    if resolve_includes:
        assert again["two"].cfg["output_type"] == "multiple_choice"  # from one.yaml, included
    assert not list(cache.glob(".tasks-*"))  # no temporary left


@pytest.mark.parametrize("change", ["edit", "same size edit", "add", "remove"])
def test_a_changed_task_folder_is_parsed_again(tmp_path, cache, change):
    root = write_tasks(tmp_path / "tasks")
    parse = Parser()
    task_index._cached(parse, root, True)
    one = root / "a" / "one.yaml"
    if change == "edit":
        one.write_text(TASKS["a/one.yaml"].replace("{{question}}", "{{question}} Answer:"))
    elif change == "same size edit":  # the same number of bytes: the modification time tells
        stat = one.stat()
        one.write_text(TASKS["a/one.yaml"].replace("question", "QUESTION"))
        os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    elif change == "add":
        (root / "b" / "four.yaml").write_text("task: four\ndoc_to_text: x\n")
    else:
        (root / "b" / "three.yaml").unlink()
    task_index._fingerprint.cache_clear()  # a new process
    got = task_index._cached(parse, root, True)
    assert parse.calls == 2
    assert_same_index(got, parsed(root))
    assert len(list(cache.glob("tasks-*.json"))) == 2


@pytest.mark.parametrize("content", [
    b"{\"format\": 1, \"entries\": [[\"one\", \"TASK\"",  # cut short
    b"\xff\xfe not text",
    json.dumps({"format": 0, "entries": []}).encode(),  # another format
    json.dumps({"format": 1, "entries": [[1]]}).encode(),  # not an entry
    json.dumps({"format": 1, "entries": [["one", "NO_SUCH_KIND", None, {}, []]]}).encode(),
    json.dumps([1, 2]).encode(),
])
def test_a_cache_file_that_cannot_be_read_is_parsed_again_and_replaced(tmp_path, cache, content, caplog):
    root = write_tasks(tmp_path / "tasks")
    parse = Parser()
    task_index._cached(parse, root, True)
    (written,) = cache.glob("tasks-*.json")
    written.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=task_index.__name__):
        got = task_index._cached(parse, root, True)
    assert parse.calls == 2 and "could not be read" in caplog.text
    assert_same_index(got, parsed(root))
    assert_same_index(task_index._cached(parse, root, True), parsed(root))
    assert parse.calls == 2  # the file was replaced by a good one


@pytest.mark.parametrize("value", ["{0: A, 1: B}", "2024-01-02", ".nan", "[1, [2, {3: x}]]"])
def test_an_index_json_cannot_hold_exactly_is_never_written(tmp_path, cache, value):
    """Integer keys (JSON writes them as strings), a date, a NaN (never equal to itself): parsed every time."""
    root = write_tasks(tmp_path / "tasks", {**TASKS, "b/odd.yaml": f"task: odd\ndoc_to_choice: {value}\n"})
    parse = Parser()
    for calls in (1, 2):
        got = task_index._cached(parse, root, True)
        assert parse.calls == calls
        want = parsed(root)
        assert list(got) == list(want)
        assert repr(got["odd"].cfg) == repr(want["odd"].cfg)  # repr: NaN != NaN
    assert not cache.exists() or not list(cache.iterdir())


def test_a_cache_that_cannot_be_written_costs_only_the_parse(tmp_path, monkeypatch, caplog):
    root = write_tasks(tmp_path / "tasks")
    blocker = tmp_path / "a file"
    blocker.write_text("the user's\n")
    monkeypatch.setenv("MOEJAX_TASK_INDEX_CACHE", str(blocker / "cache"))
    task_index._fingerprint.cache_clear()
    with caplog.at_level(logging.WARNING, logger=task_index.__name__):
        got = task_index._cached(Parser(), root, True)
    assert_same_index(got, parsed(root))
    assert "could not be cached" in caplog.text
    assert blocker.read_text() == "the user's\n"
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "tasks", blocker])


@pytest.mark.slow
def test_task_managers_read_lm_evals_own_index_from_the_cache(tmp_path, cache, monkeypatch):
    """Through TaskManager (lm-eval's own ~14,000 files, and a folder of ours after them whose `arc_easy` replaces
    lm-eval's, with lm-eval's warning): with the cache off, writing it, and reading it back, the same index."""
    ours = write_tasks(tmp_path / "ours", {**TASKS, "c/arc.yaml": "task: arc_easy\ndoc_to_text: ours\n"})
    task_index.cache_task_index()
    monkeypatch.setenv("MOEJAX_TASK_INDEX_CACHE", "")
    off = TaskManager(include_path=str(ours), include_defaults=True)._index
    assert not cache.exists()  # empty: off
    monkeypatch.setenv("MOEJAX_TASK_INDEX_CACHE", str(cache))
    writing = TaskManager(include_path=str(ours))._index
    assert len(list(cache.glob("tasks-*.json"))) == 1
    reading = TaskManager(include_path=str(ours))._index
    for got in (writing, reading):
        assert got == off and list(got) == list(off)
    assert len(off) > 10_000 and off["arc_easy"].yaml_path == ours / "c" / "arc.yaml"
