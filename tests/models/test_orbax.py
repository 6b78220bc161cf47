"""`moejax convert` (Hugging Face -> Orbax) and restoring it: the round trip is exact (every parameter
bit-for-bit, hence the logits), bf16 conversion, and bad input (an Orbax directory whose config or
parameters belong to another architecture, a failed conversion) gets a clear error and leaves nothing.
Restoring onto other meshes is checked in tests/multidevice/sharded_checks.py."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import QUICK_ARCHS

import moejax
from moejax.cli import main
from moejax.errors import CheckpointError

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer

pytestmark = pytest.mark.torch

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    make_checkpoint("qwen3_moe", root / "qwen3_moe", seed=3, vocab_size=259)
    save_byte_tokenizer(root / "qwen3_moe")
    make_checkpoint("nemotron_h", root / "nemotron_h", seed=4)
    return root


def params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch", QUICK_ARCHS)
def test_round_trip_is_exact(checkpoints, tmp_path, arch):
    out = tmp_path / "orbax"
    assert main(["convert", str(checkpoints / arch), str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "moejax.json").read_text())["dtype"] == "float32"
    original, restored = moejax.from_pretrained(checkpoints / arch), moejax.from_pretrained(out)
    want, got = params(original), params(restored)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    ids = np.random.default_rng(0).integers(0, 97, (2, 9))
    np.testing.assert_array_equal(np.asarray(restored(ids).logits), np.asarray(original(ids).logits))
    if arch == "qwen3_moe":  # the tokenizer travels with the parameters
        assert (out / "tokenizer.json").is_file()


def test_bf16_conversion_and_dtype_on_restore(checkpoints, tmp_path):
    out = tmp_path / "orbax"
    assert main(["convert", str(checkpoints / "qwen3_moe"), str(out), "--dtype", "bfloat16"]) == 0
    restored = moejax.from_pretrained(out, dtype=jnp.bfloat16)
    original = moejax.from_pretrained(checkpoints / "qwen3_moe", dtype=jnp.bfloat16)
    for key, value in params(original).items():
        assert np.array_equal(params(restored)[key], value), key
    as_f32 = moejax.from_pretrained(out)  # restored in float32: the bf16 values, widened
    assert as_f32.embed_vd[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_f32.embed_vd[...]),
                                  np.asarray(original.embed_vd[...].astype(jnp.float32)))


def test_other_architecture_is_refused(checkpoints, tmp_path):
    out = tmp_path / "orbax"
    assert main(["convert", str(checkpoints / "qwen3_moe"), str(out), "--dtype", "float32"]) == 0
    shutil.copy(checkpoints / "nemotron_h" / "config.json", out / "config.json")
    with pytest.raises(CheckpointError, match="parameters are a qwen3_moe model, but its config.json describes "
                                              "a nemotron_h"):
        moejax.from_pretrained(out)
    marker = json.loads((out / "moejax.json").read_text())
    (out / "moejax.json").write_text(json.dumps(marker | {"model_type": "nemotron_h"}))
    with pytest.raises(CheckpointError, match="does not hold this nemotron_h model's parameters"):
        moejax.from_pretrained(out)


def test_failed_conversion_leaves_nothing(checkpoints, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints / "qwen3_moe", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    out = tmp_path / "orbax"
    assert main(["convert", str(broken), str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".orbax.*"))
