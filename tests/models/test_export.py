"""`moejax export` / `moejax.export_pretrained`: a moejax model written back in the Hugging Face layout.

For both architectures, from an Orbax conversion: transformers 5.23 loads the export and its float32
logits equal moejax's to 1e-4 (observed ~3e-6); moejax reloads it bit-exactly; the tensors carry the
per-expert key names (Nemotron-H under backbone.*), are sharded with an index, and carry the tokenizer.
bf16 export: transformers loads it in bf16 and matches moejax in bf16 (mean KL <= 5e-3, as the bf16
parity bound). A failed export leaves nothing behind."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
import transformers
from support import QUICK_ARCHS

import moejax
from moejax.cli import main
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer

pytestmark = pytest.mark.torch

KEYS = {"qwen3_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
        "nemotron_h": "backbone.layers.1.mixer.experts.3.up_proj.weight"}


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, root / "hf", seed=8, vocab_size=259)
    save_byte_tokenizer(root / "hf")
    assert main(["convert", str(root / "hf"), str(root / "orbax"), "--dtype", "float32"]) == 0
    return request.param, root


def overrides(arch):
    return {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}


def test_export_loads_in_transformers(converted):
    arch, root = converted
    out = root / "export"
    assert main(["export", str(root / "orbax"), str(out), "--dtype", "float32", "--max-shard-gb", "0.0002"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert KEYS[arch] in index["weight_map"] and len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").is_file()
    ids = np.random.default_rng(1).integers(3, 259, (2, 13))
    ours = moejax.from_pretrained(root / "orbax", **overrides(arch))
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(ours(ids).logits) - theirs).max() <= 1e-4
    again = moejax.from_pretrained(out, **overrides(arch))
    np.testing.assert_array_equal(np.asarray(again(ids).logits), np.asarray(ours(ids).logits))


def test_bf16_export(converted):
    arch, root = converted
    out = root / "export-bf16"
    assert main(["export", str(root / "orbax"), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids = np.random.default_rng(2).integers(3, 259, (2, 13))
    ours = np.asarray(moejax.from_pretrained(out, dtype=jnp.bfloat16, **overrides(arch))(ids).logits, np.float64)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.double()
    lp, lq = torch.log_softmax(theirs, -1), torch.log_softmax(torch.from_numpy(ours), -1)
    assert (lp.exp() * (lp - lq)).sum(-1).mean().item() <= 5e-3


def test_failed_export_leaves_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
