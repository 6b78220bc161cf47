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

from moejax.checkpoint import COPIED
from moejax.config import read_config_json
from moejax.errors import CheckpointError
from moejax.io import output_directory
from moejax.keymap import KeyMap, Rule, keys_of
from moejax.layers.stack import layer_position
from moejax.models import keymap as keymap_of
from moejax.safetensors_io import INDEX_NAME, write_safetensors


def _positions(rule: Rule, value: np.ndarray) -> np.ndarray:
    """Where in the on-disk tensor (flat indices, shaped as `value`) `rule.to_moejax` takes each entry of `value`
    from: the transform must be a rearrangement, or a selection (a parameter that is part of a fused tensor, e.g.
    GPT-OSS's interleaved gate_up_proj)."""
    source = np.arange(int(np.prod(rule.hf_shape))).reshape(rule.hf_shape)
    positions = np.asarray(rule.to_moejax(source))
    if positions.shape != value.shape or len(np.unique(positions)) != positions.size:
        raise CheckpointError(f"{rule.template}: its transform is not a rearrangement; it cannot be written back")
    return positions


def _tensors(model, keymap: KeyMap):
    """(key, on-disk tensor) for every tensor of the checkpoint, layer after layer, each layer's worth fetched from
    the devices at a time. A tensor that several parameters fill (a fused one) is given once all of them have."""
    entries = []  # (layer or -1, path, var, repeat index or None, rule, key array)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        located = layer_position(path)
        if located is None:
            rule = keymap.top[tuple(str(p) for p in path)][0]
            entries.append((-1, path, var, None, rule, keys_of(rule.template, None, keymap.num_experts)))
            continue
        s, u, local = located
        rule, layers = keymap.layer[local][0], model.layers.layer_ids[s][u]
        keys = keys_of(rule.template, layers, keymap.num_experts)
        entries += [(layer, path, var, index, rule, np.asarray(keys[index], dtype=object))
                    for index, layer in enumerate(layers)]
    pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    found: dict[Rule, np.ndarray] = {}  # a rule's positions, the same for every layer and expert it writes

    def fill(key: str, rule: Rule, value: np.ndarray):
        size = int(np.prod(rule.hf_shape))
        flat, filled = pending.pop(key, None) or (np.empty(size, value.dtype), np.zeros(size, bool))
        if rule not in found:
            found[rule] = _positions(rule, value).ravel()
        positions = found[rule]
        flat[positions], filled[positions] = value.ravel(), True
        if filled.all():
            return key, flat.reshape(rule.hf_shape)
        pending[key] = (flat, filled)
        return None

    for _, _, var, index, rule, keys in sorted(entries, key=lambda entry: entry[0]):
        value = np.asarray(var[...] if index is None else var[...][index])
        done = ([fill(str(keys[()]), rule, value)] if keys.ndim == 0
                else [fill(key, rule, value[expert]) for expert, key in enumerate(keys)])
        yield from (item for item in done if item is not None)
    if pending:
        raise CheckpointError(f"{sorted(pending)[0]}: no parameter fills all of it; it cannot be written back")


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
