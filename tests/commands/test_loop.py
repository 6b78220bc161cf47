"""The loop a new user walks, on the default model, with no extra flags: train a few steps, export, then generate
(plain and with the chat template), `moejax eval` and `lm_eval --model moejax` on the export; SFT on the default
model. Around it: an export keeps the model's dtype (frozen tensors come back bit for bit); a bad flag fails before
JAX is imported, in under 2 s; a resumed run's TensorBoard events hold each step once; the first step announces its
compilation; a study runs from a directory outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from safetensors.numpy import load_file

from moejax.cli import main
from moejax.models.builtin import builtin_model
from moejax.parity.fixtures import make_checkpoint

pytestmark = pytest.mark.torch
QUICK = ["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run trained from the default model (two steps), and its export with no flags."""
    root = tmp_path_factory.mktemp("loop")
    assert main(["train", "--out", str(root / "run"), *QUICK]) == 0
    assert main(["export", str(root / "run"), str(root / "export")]) == 0
    return root / "run", root / "export"


def test_default_run_and_export_carry_the_tokenizer(exported):
    run, export = exported
    for directory in (run, export):
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= {
            p.name for p in directory.iterdir()}
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "float32" and config["eos_token_id"] == 2 and config["bos_token_id"] == 1
    tensors = load_file(next(export.glob("model-*.safetensors")))
    assert {t.dtype for t in tensors.values()} == {np.dtype("float32")}


@pytest.mark.slow
def test_generate_and_chat_on_the_export(exported, tmp_path, capsys):
    _, export = exported
    assert main(["generate", "--model", str(export), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--model", str(export), "--prompt", "Hello", "--max-new-tokens", "4", "--chat",
                 "--out", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["generations"][0]["prompt"] == "Hello"
    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "4", "--chat"]) == 0  # the built-in model too
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_moejax_eval_and_lm_eval_on_the_export(exported, tmp_path):
    pytest.importorskip("lm_eval")
    _, export = exported
    assert main(["eval", "--model", str(export), "--tasks", "moejax_choice_en", "--limit", "2", "--out",
                 str(tmp_path / "eval")]) == 0
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert rows[1].startswith("moejax_choice_en,en,") and rows[1].endswith(",0.25")  # 4 choices: chance 0.25
    assert main(["eval", "--tasks", "moejax_choice_en", "--limit", "2", "--chat", "--out",
                 str(tmp_path / "eval-chat")]) == 0  # the built-in model has a chat template
    # lm-eval's own command line, from a directory outside the repository, with no --include_path.
    done = subprocess.run(["lm_eval", "--model", "moejax", "--model_args", f"pretrained={export}", "--tasks",
                           "moejax_choice_en", "--limit", "2"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "moejax_choice_en" in done.stdout and "acc" in done.stdout


@pytest.mark.slow
def test_sft_on_the_default_model(tmp_path):
    records = tmp_path / "chat.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"{i} plus 1?", "response": str(i + 1)}) + "\n"
                               for i in range(8)))
    assert main(["train", "--sft", "--data", f"en={records}:1", "--out", str(tmp_path / "sft"), *QUICK]) == 0
    assert (tmp_path / "sft" / "chat_template.jinja").is_file()


def test_export_keeps_the_dtype(tmp_path, capsys):
    """No --dtype: a bfloat16 checkpoint comes back bfloat16 with every tensor's bytes unchanged, a float32 one float32;
    --dtype still converts."""
    for dtype in ("bfloat16", "float32"):
        import torch

        _, source = make_checkpoint("qwen3_moe", tmp_path / f"src-{dtype}", seed=2, byte_tokenizer=True,
                                    save_dtype=getattr(torch, dtype))
        assert main(["export", str(source), str(tmp_path / f"out-{dtype}")]) == 0
        theirs = load_file(next(source.glob("*.safetensors")))
        ours = {k: v for f in (tmp_path / f"out-{dtype}").glob("model-*.safetensors") for k, v in load_file(f).items()}
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and ours[key].tobytes() == value.tobytes(), key
    assert main(["export", str(tmp_path / "src-float32"), str(tmp_path / "as-bf16"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "as-bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.slow
def test_selective_training_export_keeps_frozen_tensors_bit_for_bit(tmp_path):
    """Only experts 1 and 2 of MoE layer 7 train: the export holds every other tensor of the built-in model exactly."""
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"7": [1, 2]}))
    assert main(["train", "--train-experts", str(selection), "--out", str(tmp_path / "run"), *QUICK]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    (tmp_path / "base").mkdir()
    from moejax.export import export_pretrained

    export_pretrained(builtin_model(), tmp_path / "base" / "hf")
    base = {k: v for f in (tmp_path / "base" / "hf").glob("model-*.safetensors") for k, v in load_file(f).items()}
    ours = {k: v for f in (tmp_path / "export").glob("model-*.safetensors") for k, v in load_file(f).items()}
    trained = {f"model.layers.7.mlp.experts.{e}.{p}_proj.weight" for e in (1, 2) for p in ("gate", "up", "down")}
    changed = {k for k in base if base[k].tobytes() != ours[k].tobytes()}
    assert changed and changed <= trained


def test_bad_flag_fails_before_jax_in_under_two_seconds(tmp_path):
    moejax = shutil.which("moejax")
    assert moejax, "the moejax command is installed"
    for argv in (["train", "--nonsense"], ["train", "--trainable", "(("], ["analyze", "--batch-size", "0"],
                 ["parity", "--tol", "kl_mean=x"]):
        start = time.perf_counter()
        done = subprocess.run([moejax, *argv], cwd=tmp_path, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert seconds < 2.0, (argv, seconds)
    code = ("import sys; from moejax.cli import main; code = main(['train', '--seq-len', '1']); "
            "print(code, 'jax' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr


def _events(directory: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the TensorBoard event files."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            found += [(value.tag, event.step) for value in event.summary.value]
    return found


@pytest.mark.slow
def test_resume_writes_each_step_once_and_announces_compiling(tmp_path, capsys):
    """Four steps saved at 2 and 4; the step-4 checkpoint lost (a kill after its events were written, before the
    save completed): the resume computes steps 3 and 4 again, and TensorBoard still has each step once."""
    args = ["train", "--out", str(tmp_path / "run"), "--steps", "4", "--save-every", "2", "--seq-len", "64",
            "--batch-size", "2"]
    assert main(args) == 0
    assert "compiling the train step (step 1 of 4)" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run" / "checkpoint" / "4")
    assert main(args) == 0
    assert "compiling the train step (step 3 of 4)" in capsys.readouterr().err
    events = _events(tmp_path / "run" / "tensorboard")
    losses = sorted(step for tag, step in events if tag == "loss")
    assert losses == [1, 2, 3, 4]
    assert len(events) == len(set(events))
