"""lm-eval's own task index, kept on disk between evaluations.

Every lm-eval TaskManager parses each of the ~14,000 YAML files lm-eval ships before it can name one task (~6 s on
two cores, on every `moejax eval` and every study's evaluation). That folder changes only when lm-eval does, so after
`cache_task_index()` this process's TaskManagers read its index from a JSON file under
`moejax.process.task_index_cache_dir()` ($MOEJAX_TASK_INDEX_CACHE, default ~/.cache/moejax/lm_eval; empty: off),
written by the first build (~0.3 s to read back). The file's name is a digest of what the index depends on: lm-eval's
version, the folder, the include-resolution switch and every YAML file's path, size and modification time, so an
upgrade or an edited task gets an index of its own. An index that JSON does not hold exactly (a key or value of
another type) is not written; a file that cannot be read is parsed anew and replaced. Every other folder (the bundled
moejax_* tasks, --include-path, --data-dir's tasks) is parsed on each build, as before, and the folders are merged
as lm-eval merges them: in order, a later folder's task replacing an earlier one with lm-eval's warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from moejax.process import task_index_cache_dir

FORMAT = 1  # of the cache file; part of its name
log = logging.getLogger(__name__)


def cache_task_index() -> None:
    """From now on, every TaskManager of this process reads lm-eval's own task index from the cache (once)."""
    from lm_eval.tasks import _index

    if getattr(_index.TaskIndex.build, "_moejax", False):
        return
    original = _index.TaskIndex.build
    own = Path(_index.__file__).parent.resolve()

    def build(paths, *, resolve_includes=True):
        index = {}
        for root in paths:
            if Path(root).resolve() == own and task_index_cache_dir():
                part = _cached(original, Path(root), resolve_includes)
            else:
                part = original([root], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in index:
                    _index.log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path,
                                       index[name].yaml_path)
                index[name] = entry
        return index

    build._moejax = True
    build.__wrapped__ = original  # lm-eval's own parse
    _index.TaskIndex.build = staticmethod(build)


def _cached(original, root: Path, resolve_includes: bool) -> dict:
    """root's index from the cache file, or built by `original` and written there."""
    path = Path(task_index_cache_dir()) / f"tasks-{_fingerprint(root, resolve_includes)}.json"
    try:
        return _entries(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("lm-eval's task index cache %s could not be read (%s); parsing the tasks again", path, e)
    index = original([root], resolve_includes=resolve_includes)
    try:
        text = json.dumps({"format": FORMAT, "entries": [
            [e.name, e.kind.name, None if e.yaml_path is None else str(e.yaml_path), e.cfg, sorted(e.tags)]
            for e in index.values()]})
    except (TypeError, ValueError):  # a value JSON cannot hold
        return index
    back = _entries(text)
    if back == index and list(back) == list(index):  # JSON holds it exactly (keys, types, order)
        _write(path, text)
    return index


def _entries(text: str) -> dict:
    from lm_eval.tasks._index import Entry, Kind

    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not an index of format {FORMAT}")
    return {name: Entry(name=name, kind=Kind[kind], yaml_path=None if where is None else Path(where), cfg=cfg,
                        tags=set(tags))
            for name, kind, where, cfg, tags in data["entries"]}


@functools.cache
def _fingerprint(root: Path, resolve_includes: bool) -> str:
    """A digest of lm-eval's version, the folder, the switch and each YAML file's path, size and mtime (once per
    process: the installed folder does not change under a running evaluation)."""
    import lm_eval

    digest = hashlib.sha256(f"{FORMAT} {getattr(lm_eval, '__version__', '?')} {root.resolve()} "
                            f"{resolve_includes}".encode())
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".yaml"):
                stat = os.stat(os.path.join(folder, name))
                found.append(f"{os.path.relpath(os.path.join(folder, name), root)} {stat.st_size} {stat.st_mtime_ns}")
    digest.update("\n".join(sorted(found)).encode())
    return digest.hexdigest()[:24]


def _write(path: Path, text: str) -> None:
    """Writes the cache file whole (a temporary file renamed over it), or not at all: a cache that cannot be written
    (a read-only home, a full disk) costs the next evaluation its parse, nothing more."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=".tasks-", suffix=".tmp",
                                         delete=False) as f:
            temporary = f.name
            f.write(text)
        os.replace(temporary, path)
        temporary = None
    except OSError as e:
        log.warning("lm-eval's task index could not be cached in %s (%s)", path.parent, e)
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
