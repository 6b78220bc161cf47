"""Orbax (TensorStore) checkpoints of a model's parameters: fast reloads, restored onto any mesh.

`moejax convert HF_DIR OUT_DIR` writes OUT_DIR/params (Orbax's StandardCheckpointer, one TensorStore
array per parameter), OUT_DIR/config.json and the tokenizer files copied from HF_DIR, and
OUT_DIR/moejax.json naming the format, the architecture and the dtype. `from_pretrained(OUT_DIR,
mesh=...)` restores each parameter straight into the shards the mesh gives it (each process reads
only its own), whatever mesh the conversion ran on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax.errors import CheckpointError, OutputError
from moejax.io import output_directory
from moejax.parallel.mesh import param_sharding

MARKER = "moejax.json"
FORMAT = "moejax-orbax-params"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def is_orbax_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def orbax_errors(where: str | Path):
    """Orbax writing OUT: an error of the file system (disk full, permission denied, ...) becomes one OutputError
    naming OUT and the reason, instead of Orbax's many logged tracebacks from its writer threads."""
    absl_logger = logging.getLogger("absl")
    level, hook, unraisable = absl_logger.level, threading.excepthook, sys.unraisablehook
    absl_logger.setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None  # the writer threads' echoes of the one failure below
    sys.unraisablehook = lambda args: None
    try:
        yield
    except Exception as e:
        found = re.search(r"os_error_code='(\d+)'", str(e))
        if isinstance(e, OSError) or found:
            reason = os.strerror(int(found.group(1))) if found else e.strerror or str(e)
            raise OutputError(f"{where}: writing the checkpoint failed: {reason}") from None
        raise
    finally:
        absl_logger.setLevel(level)
        threading.excepthook, sys.unraisablehook = hook, unraisable


def save_params(model: nnx.Module, source_dir: str | Path, out: str | Path) -> Path:
    """Writes `model`'s parameters as an Orbax checkpoint in OUT (atomically), with source_dir's config
    and tokenizer files."""
    source_dir, out = Path(source_dir), Path(out)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with output_directory(out, "convert", [source_dir], flag="OUT_DIR") as tmp, orbax_errors(out):
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / "params").absolute(), params)
        checkpointer.wait_until_finished()
        for name in COPIED:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, tmp / name)
        leaves = jax.tree.leaves(params)
        (tmp / MARKER).write_text(json.dumps({
            "format": FORMAT, "version": 1, "model_type": model.config.model_type,
            "dtype": str(leaves[0].dtype), "parameters": int(sum(np.prod(x.shape) for x in leaves)),
            "source": str(source_dir)}, indent=2))
    return out


def restore_params(model: nnx.Module, path: str | Path, mesh=None) -> nnx.Module:
    """Fills an abstract `model` from the Orbax checkpoint at `path`, each parameter created in its
    target sharding (`mesh` and the logical-axis rules, or one device) and cast to the model's dtype."""
    path = Path(path)
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{path / MARKER}: format {marker.get('format')!r} is not {FORMAT!r}")
    if marker.get("model_type") != model.config.model_type:
        raise CheckpointError(f"{path}: its parameters are a {marker.get('model_type')} model, but its config.json "
                              f"describes a {model.config.model_type}; convert the checkpoint again")
    state = nnx.state(model, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {}
    for key, var in nnx.to_flat_state(state):
        name = ".".join(map(str, key))
        sharding = param_sharding(name, var, mesh) if mesh is not None else device
        targets[key] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata((path / "params").absolute())
    saved = {tuple(str(p) for p in k): v for k, v in _flatten(getattr(metadata, "item_metadata", metadata))}
    wanted = {tuple(str(p) for p in k): v for k, v in targets.items()}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointError(f"{path / 'params'}: does not hold this {model.config.model_type} model's parameters "
                              f"(missing {['.'.join(k) for k in missing[:3]]}, unexpected "
                              f"{['.'.join(k) for k in extra[:3]]}); it belongs to another architecture or config, or "
                              "an earlier moejax wrote it (round 2 stores the Mamba-2 mixer by group): run moejax "
                              "convert again from the Hugging Face checkpoint")
    for key, target in wanted.items():
        if tuple(saved[key].shape) != tuple(target.shape):
            raise CheckpointError(f"{path / 'params'}: parameter {'.'.join(key)} has shape {tuple(saved[key].shape)}, "
                                  f"the model expects {tuple(target.shape)}")
    abstract = nnx.to_pure_dict(state)
    for key, target in targets.items():
        node = abstract
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = target
    nnx.replace_by_pure_dict(state, checkpointer.restore((path / "params").absolute(), abstract))
    nnx.update(model, state)
    return model


def _flatten(tree, prefix=()):
    """(path, leaf) pairs of nested dicts / Orbax metadata trees."""
    items = tree.items() if hasattr(tree, "items") else None
    if items is None or hasattr(tree, "shape"):
        yield prefix, tree
        return
    for key, value in items:
        yield from _flatten(value, (*prefix, key))
