"""`moejax train` end to end on a tiny Qwen3-MoE (byte tokenizer) and a Hebrew/English mixture of the sample corpus:
resume after a kill during an asynchronous save reproduces the uninterrupted run bit-for-bit; the run
directory holds complete Orbax checkpoints, metrics.csv and TensorBoard events with the same values; the
export round trip (HF -> moejax -> train -> export -> transformers) keeps the logits; a non-finite loss
stops the run without saving it; bad input is refused before anything is written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
import transformers

import moejax
from moejax.cli import main
from moejax.commands.train import TrainSettings, train
from moejax.data.corpus import SAMPLE_DIR
from moejax.opening import RUN_FILE, restore_model
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer

pytestmark = pytest.mark.torch

DATA = f"he={SAMPLE_DIR / 'he.txt'}:0.6,en={SAMPLE_DIR / 'en.txt'}:0.4"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("run") / "model", seed=5, vocab_size=259)[1]
    save_byte_tokenizer(path)
    return path


def args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--data", DATA, "--out", str(out), "--seq-len", "64",
            "--batch-size", "4", "--lr", "1e-3", "--quiet", *extra]


def rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def complete_steps(out):
    return sorted(int(p.name) for p in (out / "checkpoint").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "straight"
    assert main(args(model_dir, out, "--steps", "6", "--save-every", "2", "--keep", "2")) == 0
    return out


@pytest.mark.slow
def test_run_directory(uninterrupted):
    out = uninterrupted
    assert complete_steps(out) == [4, 6]  # keep 2
    table = rows(out)
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "entropy_L0_he", "entropy_L3_en"} <= set(table[0])
    coef = json.loads((out / RUN_FILE).read_text())["train"]["lb_coef"]
    for r in table:
        assert 0 < float(r["entropy_L0_he"]) <= np.log2(8) and float(r["aux_loss"]) > 0
        # `loss` is the cross-entropy alone; the balance term is only in total_loss.
        assert float(r["total_loss"]) == pytest.approx(float(r["loss"]) + coef * float(r["aux_loss"]), rel=1e-6)
    assert float(table[0]["lr"]) == 0.0 and float(table[1]["lr"]) > 0
    assert json.loads((out / RUN_FILE).read_text())["data"] == DATA
    assert (out / "training.png").stat().st_size > 10_000
    # TensorBoard: the event files hold the CSV's values.
    events = tensorboard_scalars(out / "tensorboard")
    for r in table:
        step = int(r["step"])
        assert events[("loss", step)] == pytest.approx(float(r["loss"]), rel=1e-6)
        assert events[("routing_entropy/L1_en", step)] == pytest.approx(float(r["entropy_L1_en"]), rel=1e-6)


def tensorboard_scalars(directory) -> dict:
    """{(tag, step): value} from TFRecord-framed Event protos, read without TensorBoard."""
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for path in directory.iterdir():
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                found[(value.tag, event.step)] = value.simple_value
    return found


# The train command, in a process that dies abruptly (as SIGKILL would leave it) right after the save of step 4
# has started, while it is still being written: the test's own wrapper around the run loop's save.
DIE_DURING_SAVE = """
import os, sys
import moejax.training.run as run
save = run._save
def save_then_die(manager, step, state, mixture):
    save(manager, step, state, mixture)
    if step == 4:
        os._exit(137)
run._save = save_then_die
from moejax.cli import main
from moejax.commands.train import TrainSettings, train
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_a_kill_during_a_save_is_exact(model_dir, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-c", DIE_DURING_SAVE, *args(model_dir, out, "--steps", "6", "--save-every", "2",
                                                           "--keep", "2")]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    # Step 4's save had started and not finished: only step 2 is complete, step 4 is a temporary directory.
    assert complete_steps(out) == [2]
    assert any("4" in p.name and not p.name.isdigit() for p in (out / "checkpoint").iterdir())
    assert len(rows(out)) == 4
    assert main(args(model_dir, out, "--steps", "6", "--save-every", "2", "--keep", "2")) == 0
    assert complete_steps(out) == [4, 6]
    resumed, straight = rows(out), rows(uninterrupted)
    assert len(resumed) == len(straight) == 6
    for a, b in zip(resumed, straight, strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items()
                                                                      if k != "tokens_per_s"}
    # The same command on a finished run changes nothing; another run's settings are refused.
    assert main(args(model_dir, out, "--steps", "6", "--save-every", "2", "--keep", "2")) == 0
    assert len(rows(out)) == 6


@pytest.mark.slow
def test_export_round_trip_matches_transformers(model_dir, tmp_path):
    out, hf = tmp_path / "run", tmp_path / "hf"
    assert main(args(model_dir, out, "--steps", "2", "--dtype", "float32")) == 0
    assert main(["export", str(out / "checkpoint"), str(hf), "--dtype", "float32"]) == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert any(".mlp.experts." in k for k in index["weight_map"])
    trained, _ = restore_model(out / "checkpoint")
    original = moejax.from_pretrained(model_dir)
    ids = np.random.default_rng(0).integers(3, 259, (2, 24))
    ours = np.asarray(trained(ids).logits)
    assert np.abs(ours - np.asarray(original(ids).logits)).max() > 1e-3  # training changed the model
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert (hf / "tokenizer.json").is_file()


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(model_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main(args(model_dir, out, "--steps", "4", "--save-every", "1", "--warmup-steps", "1", "--lr", "1e12",
                     "--clip-norm", "1e30", "--dtype", "float32")) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "training stopped" in err
    stopped = len(rows(out)) + 1
    assert complete_steps(out) == list(range(1, stopped))  # every finite step saved, not the failing one


@pytest.mark.parametrize("extra, message", [
    (["--data", f"he={SAMPLE_DIR / 'he.txt'}:0.5,en={SAMPLE_DIR / 'en.txt'}:0.4"], "sum"),
    (["--data", "he=EMPTY:0.6,en=" + str(SAMPLE_DIR / "en.txt") + ":0.4"], "empty"),
    (["--seq-len", "512"], "above the model's maximum of 256"),
    (["--remat", "none", "--config", "CONFIG"], "unknown setting"),
])
def test_bad_input_is_refused_before_writing(model_dir, tmp_path, capsys, extra, message):
    empty = tmp_path / "he.txt"
    empty.write_text("\n\n")
    config = tmp_path / "train.toml"
    config.write_text('steps = 3\nlearning_rate = 0.1\n')
    extra = [e.replace("EMPTY", str(empty)).replace("CONFIG", str(config)) for e in extra]
    out = tmp_path / "out"
    assert main(args(model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_another_run_in_the_directory_is_refused(model_dir, uninterrupted, tmp_path, capsys):
    before = (uninterrupted / "metrics.csv").read_bytes()
    assert main(args(model_dir, uninterrupted, "--steps", "6", "--save-every", "2", "--keep", "2", "--lr",
                     "2e-3")) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "learning_rate" in err
    assert (uninterrupted / "metrics.csv").read_bytes() == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(args(model_dir, stranger, "--steps", "1")) == 2
    assert "not a moejax run" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_start_leaves_no_half_run(model_dir, tmp_path, monkeypatch, capsys):
    """Interrupted while it writes the run directory's first files (the model's config and tokenizer, then
    run.json): OUT is left as it was, absent or empty, so the same command starts it again; before, it left a
    directory without run.json that every later run refused (and that a study removed whole)."""
    from moejax.training.run import RunSettings

    def interrupted(self):
        raise KeyboardInterrupt

    for before in ("absent", "empty"):
        out = tmp_path / before
        if before == "empty":
            out.mkdir()
        with monkeypatch.context() as patch:
            patch.setattr(RunSettings, "to_json", interrupted)
            with pytest.raises(KeyboardInterrupt):
                main(args(model_dir, out, "--steps", "1"))
        assert not out.exists() or list(out.iterdir()) == [], before
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{before}.")] == []
    assert main(args(model_dir, out, "--steps", "1")) == 0
    assert (out / RUN_FILE).is_file() and (out / "config.json").is_file() and len(rows(out)) == 1


@pytest.mark.slow
def test_config_file_and_command_line(model_dir, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('steps = 2\nlb_coef = 0.05\nseq_len = 32\nremat = "full"\n')
    out = tmp_path / "configured"
    assert main(args(model_dir, out, "--config", str(config), "--seq-len", "48")) == 0
    settings = json.loads((out / RUN_FILE).read_text())
    assert settings["steps"] == 2 and settings["train"]["lb_coef"] == 0.05 and settings["train"]["remat"] == "full"
    assert settings["seq_len"] == 48  # the command line wins over the file


@pytest.mark.slow
def test_held_out_evaluation_is_the_cross_entropy_alone(model_dir, tmp_path):
    """eval.csv's losses are the plain next-token cross-entropy of the held-out batches (recomputed here from
    the model), with a balance coefficient large enough to show if it leaked in."""
    import jax.numpy as jnp

    from moejax.data.mixture import Mixture, Source, load_documents
    from moejax.data.tokenize import HFTokenizer
    from moejax.training.losses import next_token_loss

    out = tmp_path / "evaluated"
    held_out = f"en={SAMPLE_DIR / 'ja.txt'},he={SAMPLE_DIR / 'he.txt'}"
    assert main(args(model_dir, out, "--steps", "2", "--eval-data", held_out, "--eval-every", "1",
                     "--eval-batches", "2", "--lb-coef", "10", "--dtype", "float32")) == 0
    with open(out / "eval.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [0, 1, 2]
    model = moejax.from_pretrained(model_dir)
    source = Source("en", SAMPLE_DIR / "ja.txt", 1.0)
    stream = Mixture([source], {"en": load_documents(source, HFTokenizer(model_dir), 259)}, seq_len=64,
                     batch_size=4, seed=0)
    total = tokens = 0.0
    for _ in range(2):
        b = stream.next_batch()
        logits = model(b.input_ids, b.segment_ids, position_ids=b.position_ids).logits
        n = float((b.labels[:, 1:] != -100).sum())
        total += float(next_token_loss(logits, jnp.asarray(b.labels))) * n
        tokens += n
    assert float(table[0]["eval_loss_en"]) == pytest.approx(total / tokens, rel=1e-5)
    assert float(table[2]["eval_loss_he"]) != float(table[0]["eval_loss_he"])


@pytest.mark.parametrize("env, tunables", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"MOEJAX_HUGE_PAGES": "0"}, "None"),
])
@pytest.mark.slow
def test_train_command_restarts_with_huge_pages(env, tunables):
    """with_huge_pages (which cli.main calls for `moejax train` run from the command line) re-executes the process
    once with glibc's malloc asking for huge pages, keeping any tunables already set; MOEJAX_HUGE_PAGES=0 keeps
    the process as it is."""
    code = ("import os; from moejax.process import with_huge_pages; print('start', flush=True); with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES'))")
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MOEJAX_HUGE_PAGES")}
    done = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    restarts = 0 if "MOEJAX_HUGE_PAGES" in env else 1
    assert done.stdout.split("\n") == ["start"] * (restarts + 1) + [tunables, ""]


@pytest.mark.parametrize("coef", [0.02, 0.0, None])
@pytest.mark.slow
def test_balance_coefficient_comes_from_config_json(model_dir, tmp_path, coef):
    """Without --lb-coef, the run uses the router_aux_loss_coef the checkpoint's config.json records, 0 included;
    a config.json without one gives 1e-3."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.pop("router_aux_loss_coef", None)
    if coef is not None:
        config["router_aux_loss_coef"] = coef
    (model / "config.json").write_text(json.dumps(config))
    assert TrainSettings(model=str(model)).run_settings().train.lb_coef == (1e-3 if coef is None else coef)
    out = tmp_path / "run"
    assert main(args(model, out, "--steps", "1")) == 0
    assert json.loads((out / RUN_FILE).read_text())["train"]["lb_coef"] == (1e-3 if coef is None else coef)


@pytest.mark.slow
def test_command_line_and_python_give_the_same_run(model_dir, tmp_path):
    """`moejax train` with flags and train(TrainSettings(...)) with the same values write the same run.json and
    the same metrics.csv (every column but the wall-clock tokens_per_s)."""
    cli_out, py_out = tmp_path / "cli", tmp_path / "python"
    assert main(args(model_dir, cli_out, "--steps", "3", "--warmup-steps", "1")) == 0
    train(TrainSettings(model=str(model_dir), data=DATA, out=py_out, seq_len=64, batch_size=4, lr=1e-3, steps=3,
                        warmup_steps=1, quiet=True))
    assert json.loads((cli_out / RUN_FILE).read_text()) == json.loads((py_out / RUN_FILE).read_text())
    strip = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows(cli_out)]
    assert strip == [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows(py_out)] and len(strip) == 3
