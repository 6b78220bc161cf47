"""Lets lm-evaluation-harness find the models that installed packages declare in the `lm_eval.models` entry-point
group (moejax declares `moejax`), so that `lm_eval --model moejax ...` works once moejax is installed.

lm-eval 0.4 reads no entry points itself: its model registry is filled from its own table when `lm_eval.models` is
first imported. moejax's installation adds a one-line .pth file (moejax-lm-eval.pth) that imports this module at
interpreter start; it only places an import hook, which, right after `lm_eval.models` has been imported, adds each
declared model to the registry as a lazy "module:Class" placeholder (a name lm-eval already knows is left alone).
Nothing else is imported until lm-eval asks for the model.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys
import warnings

GROUP = "lm_eval.models"
_TRIGGER = "lm_eval.models"


def register_entry_points() -> list[str]:
    """Adds the declared models missing from lm-eval's registry; returns their names."""
    from lm_eval.api.registry import model_registry

    added = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name not in model_registry:
            model_registry.register(entry.name, target=entry.value)
            added.append(entry.name)
    return added


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register_entry_points()
        except Exception as e:  # never break lm-eval's own import over a plugin
            warnings.warn(f"moejax: could not add the {GROUP} entry points to lm-eval's registry: {e}", stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TRIGGER:
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
    """Places the hook (once); if lm-eval's models are already imported, registers right away."""
    if _TRIGGER in sys.modules:
        register_entry_points()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
