"""`export_pretrained`: a moejax model written back as a Hugging Face checkpoint that transformers loads.

Each parameter goes out under its key map's first (canonical) rule: per-expert tensors, `backbone.*` for
Nemotron-H, transformers' [out, in] layouts. A rule's transform only rearranges elements (transposes,
reshapes, a unit axis), so its inverse is found by running it on the element indices. Layers and
experts are fetched from the devices one layer at a time, and shards are written as they fill.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from converters import keymap as keymap_of
from converters.keymap import KeyMap, Rule, keys_of
from converters.safetensors_io import INDEX_NAME, write_safetensors
from moejax.checkpoint import COPIED
from moejax.config import read_config_json
from moejax.errors import CheckpointError
from moejax.io import output_directory
from moejax.layers.stack import layer_position


def _to_hf(rule: Rule, value: np.ndarray) -> np.ndarray:
    """The on-disk tensor that `rule.to_moejax` turns into `value`."""
    source = np.arange(int(np.prod(rule.hf_shape))).reshape(rule.hf_shape)
    positions = np.asarray(rule.to_moejax(source))
    if positions.shape != value.shape or positions.size != source.size:
        raise CheckpointError(f"{rule.template}: its transform is not a rearrangement; it cannot be written back")
    flat = np.empty(source.size, value.dtype)
    flat[positions.ravel()] = value.ravel()
    return flat.reshape(rule.hf_shape)


def _tensors(model, keymap: KeyMap):
    """(key, on-disk tensor) for every parameter, a layer's worth fetched from the devices at a time."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        located = layer_position(path)
        if located is None:
            rule, layers = keymap.top[tuple(str(p) for p in path)][0], None
        else:
            s, u, local = located
            rule, layers = keymap.layer[local][0], model.layers.layer_ids[s][u]
        keys = keys_of(rule.template, layers, keymap.num_experts)
        value = var[...]
        if keys.ndim == 0:
            yield str(keys[()]), _to_hf(rule, np.asarray(value))
            continue
        for index in range(keys.shape[0]):
            part = np.asarray(value[index])
            if keys.ndim == 1:
                yield keys[index], _to_hf(rule, part)
            else:
                for expert, key in enumerate(keys[index]):
                    yield key, _to_hf(rule, part[expert])


def _special_ids(source: str | Path | None) -> dict:
    """The special token ids the source checkpoint's config.json records (transformers' generate reads them)."""
    path = None if source is None else Path(source) / "config.json"
    if path is None or not path.is_file():
        return {}
    hf = read_config_json(path)
    return {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(key) is not None}


def export_pretrained(model, out: str | Path, *, tokenizer_from: str | Path | None = None,
                      max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    """Writes `model` to OUT as config.json + model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json
    (atomically), in the parameters' dtype; tokenizer files are copied from `tokenizer_from` if given."""
    cfg = model.config
    keymap = keymap_of(cfg)
    with output_directory(out, "export", [tokenizer_from], flag="OUT_DIR") as tmp:
        shard_keys, current, size, total, dtype = [], {}, 0, 0, None

        def flush():
            shard_keys.append(list(current))
            write_safetensors(tmp / f"shard-{len(shard_keys)}", current)

        for key, tensor in _tensors(model, keymap):
            if current and size + tensor.nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[key] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
            dtype = dtype or str(tensor.dtype)
        flush()
        weight_map = {}
        for number, keys in enumerate(shard_keys, 1):
            name = f"model-{number:05d}-of-{len(shard_keys):05d}.safetensors"
            (tmp / f"shard-{number}").rename(tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf() | _special_ids(tokenizer_from) | {"dtype": dtype},
                                                    indent=2))
        if tokenizer_from is not None:
            for name in COPIED:  # the generation config and the tokenizer's files (config.json was just written)
                if name != "config.json" and (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return Path(out)
