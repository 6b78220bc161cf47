"""Bad checkpoints and configs fail early with an error that names the file, the key and what was expected."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moejax
from moejax.config import ConfigError
from moejax.errors import CheckpointError

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from moejax.parity.fixtures import make_checkpoint, make_qwen3

pytestmark = pytest.mark.torch

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_qwen3(tmp_path_factory.mktemp("ckpt"), seed=1)[1]


def copy_of(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_safetensors(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.+' needs bytes"):
        moejax.from_pretrained(path)


def test_corrupt_header(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"not json !!!"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        moejax.from_pretrained(path)


def test_missing_shard_listed_in_index(tmp_path):
    _, path = make_qwen3(tmp_path, seed=2, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: lists shard\(s\) \['{victim}'\] that are missing"):
        moejax.from_pretrained(path)


def test_unknown_model_type(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, model_type="llama")
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'llama' is not supported; .*qwen3_moe"):
        moejax.from_pretrained(path)


def test_unknown_config_field(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, moe_shared_gate=True)
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['moe_shared_gate'\]"):
        moejax.from_pretrained(path)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("use_sliding_window", "yes", 'use_sliding_window is "yes" (a string); expected true or false'),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "rope type 'dynamic'"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_config_values(checkpoint, tmp_path, field, value, message):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, **{field: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        moejax.from_pretrained(path)


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_shape_mismatch(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    rewrite(path, lambda t: t.__setitem__(key, np.zeros((48, 23), np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(
            f"model.safetensors: tensor '{key}' has shape (48, 23), expected (48, 24)")):
        moejax.from_pretrained(path)


def test_missing_tensor(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite(path, lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=re.escape(
            "missing tensor 'model.layers.2.self_attn.k_norm.weight'; expected shape (16,)")):
        moejax.from_pretrained(path)


def test_unexpected_tensor(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite(path, lambda t: t.__setitem__("model.layers.9.mlp.gate.weight", np.zeros((8, 48), np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(
            "1 unexpected tensor(s) in ['model.safetensors'], e.g. ['model.layers.9.mlp.gate.weight']")):
        moejax.from_pretrained(path)


def test_pickle_checkpoints_are_refused(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are never read"):
        moejax.from_pretrained(path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        moejax.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def nemotron_checkpoint(tmp_path_factory):
    return make_checkpoint("nemotron_h", tmp_path_factory.mktemp("nemotron"), seed=1)[1]


@pytest.mark.parametrize("changes, message", [
    (dict(layers_block_type=None, hybrid_override_pattern="ME*X"), "hybrid_override_pattern has unknown symbols ['X']"),
    (dict(layers_block_type=["mamba", "conv"]), "layers_block_type has unknown kinds ['conv']"),
    (dict(num_hidden_layers=5), "num_hidden_layers=5 but the layer pattern has 6 layers"),
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act='gelu' is not supported"),
    (dict(n_shared_experts=2), "n_shared_experts=2 is not supported"),
    (dict(time_step_limit="fast"), "time_step_limit must be a [low, high] pair"),
    (dict(n_group=3), "n_routed_experts=8 must split into n_group=3 groups"),
])
def test_nemotron_config_errors(nemotron_checkpoint, tmp_path, changes, message):
    path = copy_of(nemotron_checkpoint, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=re.escape(message)):
        moejax.from_pretrained(path)


def test_nemotron_truncated_and_missing(nemotron_checkpoint, tmp_path):
    path = copy_of(nemotron_checkpoint, tmp_path)
    rewrite(path, lambda t: t.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError, match=re.escape("missing tensor 'backbone.layers.0.mixer.A_log'")):
        moejax.from_pretrained(path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        moejax.from_pretrained(path)


def test_nemotron_conv_shape_mismatch(nemotron_checkpoint, tmp_path):
    path = copy_of(nemotron_checkpoint, tmp_path)
    key = "backbone.layers.4.mixer.conv1d.weight"
    rewrite(path, lambda t: t.__setitem__(key, np.zeros((112, 1, 3), np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' has shape (112, 1, 3), expected (112, 1, 4)")):
        moejax.from_pretrained(path)
