"""Lets lm-evaluation-harness find what installed packages declare: the models of the `lm_eval.models` entry-point
group (moejax declares `moejax`) and the task folders of the `lm_eval.tasks` group (moejax declares its bundled
offline tasks), so that `lm_eval --model moejax --tasks moejax_choice_en ...` works once moejax is installed, with no
--include_path.

lm-eval 0.4 reads no entry points itself: its model registry is filled from its own table when `lm_eval.models` is
first imported, and its TaskManager scans its own folder plus --include_path. moejax's installation adds a one-line
.pth file (moejax-lm-eval.pth) that imports this module at interpreter start; it only places an import hook, which,
right after `lm_eval.models` has been imported, adds each declared model to the registry as a lazy "module:Class"
placeholder (a name lm-eval already knows is left alone), and right after `lm_eval.tasks.manager`, makes every
TaskManager scan the declared task folders too (after lm-eval's own, before --include_path's). Nothing else is
imported until lm-eval asks for it.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys
import warnings
from pathlib import Path

GROUP = "lm_eval.models"
TASK_GROUP = "lm_eval.tasks"  # name = a label; value = "module:ATTRIBUTE" giving a folder of task YAML files


def register_entry_points() -> list[str]:
    """Adds the declared models missing from lm-eval's registry; returns their names."""
    from lm_eval.api.registry import model_registry

    added = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name not in model_registry:
            model_registry.register(entry.name, target=entry.value)
            added.append(entry.name)
    return added


def task_folders() -> list[Path]:
    """The task folders the installed packages declare."""
    return [Path(entry.load()) for entry in importlib.metadata.entry_points(group=TASK_GROUP)]


def register_task_folders() -> None:
    """Every TaskManager built from now on also scans task_folders() (once each)."""
    from lm_eval.tasks.manager import TaskManager

    if getattr(TaskManager.__init__, "_moejax", False):
        return
    original = TaskManager.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        given = [] if include_path is None else list(include_path) if isinstance(include_path, list | tuple) \
            else [include_path]
        known = {Path(p).resolve() for p in given}
        declared = [str(folder) for folder in task_folders() if folder.resolve() not in known]
        original(self, *args, include_path=(declared + given) or None, **kwargs)

    __init__._moejax = True
    TaskManager.__init__ = __init__


_AFTER = {"lm_eval.models": register_entry_points, "lm_eval.tasks.manager": register_task_folders}


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            _AFTER[module.__name__]()
        except Exception as e:  # never break lm-eval's own import over a plugin
            warnings.warn(f"moejax: could not add the installed packages' lm-eval entry points: {e}", stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _AFTER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AfterImport(spec.loader)
                return spec
        return None


def install() -> None:
    """Places the hook (once); what lm-eval has already imported is registered right away."""
    for name, register in _AFTER.items():
        if name in sys.modules:
            register()
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
