"""The studies in experiments/ run end to end from a directory outside the repository, at a tiny size, with the
protocol choices of their papers recorded in their summaries, and follow the commands' output and error rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.steering import derive_window
from moejax.data.corpus import read_corpus

ROOT = Path(__file__).resolve().parents[2]


def study(name: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m experiments.NAME ARGS` run in `cwd` (not the repository)."""
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=1200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small aligned {lang}.txt corpus (the built-in sample's first 24 sentences of en, he and ja)."""
    folder = tmp_path_factory.mktemp("corpus")
    for lang, lines in read_corpus(None, ["en", "he", "ja"]).items():
        (folder / f"{lang}.txt").write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    import torch

    from moejax.parity.fixtures import make_checkpoint

    _, path = make_checkpoint("nemotron_h", tmp_path_factory.mktemp("nemotron"), seed=5, byte_tokenizer=True,
                              save_dtype=torch.bfloat16)
    return path


@pytest.mark.torch
@pytest.mark.slow
def test_multilingual_routing_in_bfloat16_from_outside_the_repository(tmp_path, corpus, bf16_checkpoint):
    out = tmp_path / "study"
    done = study("multilingual_routing", ["--model", f"tiny={bf16_checkpoint}", "--pairs", "he-en", "--data",
                                          str(corpus), "--chunk-words", "40", "--dtype", "bfloat16", "--out",
                                          str(out), "--seed", "3"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "--selection raw" in summary and "paper A's hook view" in summary and "seed 3" in summary
    assert "bfloat16" in summary
    metrics = json.loads((out / "he-en" / "metrics.json").read_text())
    assert metrics["selection"] == "raw" and metrics["dtype"] == "bfloat16"
    for lang, (low, high) in ((lang, ci["usage_entropy_bits"]) for lang, ci in
                              metrics["summary"]["tiny"]["collapse_ci"].items()):
        assert low < high, lang
    # Another run into the same OUT replaces it (it is the study's own); a folder of the user's is refused.
    assert study("multilingual_routing", ["--pairs", "he-en", "--data", str(corpus), "--chunk-words", "40",
                                          "--out", str(out)], cwd=tmp_path).returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = study("multilingual_routing", ["--pairs", "he-en", "--data", str(corpus), "--out", str(mine)],
                    cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "notes.txt" in refused.stderr and sorted(os.listdir(mine)) == ["notes.txt"]
    bad = study("multilingual_routing", ["--pairs", "he", "--out", str(tmp_path / "x")], cwd=tmp_path)
    assert bad.returncode == 2 and "--pairs" in bad.stderr and not (tmp_path / "x").exists()


def test_window_from_divergence_curves():
    """derive_window reads the middle window off U-shaped divergence curves, as paper B read Qwen3's 7-34 of 48."""
    layers = np.arange(48)
    u = 0.2 + 0.6 * ((layers - 21) / 27.0) ** 2  # a U with its minimum at layer 21
    curves = np.stack([u, u + 0.05, u * 1.1])
    first, last = derive_window(curves, 0.5)
    assert first < 21 < last and 0 < first and last < 47
    # The same window whatever the languages' offsets; a flat-bottomed curve gives its whole bottom.
    assert derive_window(curves + np.array([[0.0], [0.3], [0.1]]), 0.5) == (first, last)
    flat = np.where((layers >= 8) & (layers <= 35), 0.1, 0.9)[None]
    assert derive_window(flat, 0.5) == (8, 35)
    assert derive_window(flat, 0.0) == (8, 35)
    # A NaN layer (no pair there) does not end the window early nor start it.
    holed = flat.astype(float).copy()
    holed[0, 0] = np.nan
    assert derive_window(holed, 0.5) == (8, 35)


def test_resumable_directory_rules(tmp_path):
    from moejax.errors import OutputError
    from moejax.io import STUDY_MARKER, resumable_directory

    out = resumable_directory(tmp_path / "study", "demo")
    (out / "run_1").mkdir()
    (out / "run_1" / "x.txt").write_text("partial")
    assert resumable_directory(tmp_path / "study", "demo") == out  # its own: kept, to be continued
    assert (out / "run_1" / "x.txt").read_text() == "partial"
    with pytest.raises(OutputError, match="not of other"):
        resumable_directory(tmp_path / "study", "other")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(OutputError, match="thesis.tex"):
        resumable_directory(mine, "demo")
    assert sorted(os.listdir(mine)) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        resumable_directory(tmp_path / "file", "demo")
    assert (resumable_directory(tmp_path / "empty_then", "demo") / STUDY_MARKER).is_file()


def test_aux_coef_ablation_refuses_a_users_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    done = study("aux_coef_ablation", ["--out", str(mine), "--steps", "2"], cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "notes.md" in done.stderr
    assert sorted(os.listdir(mine)) == ["notes.md"]


@pytest.mark.slow
def test_aux_coef_ablation_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "ablation"
    args = ["--out", str(out), "--coefs", "0,0.01", "--steps", "3", "--dtype", "float32", "--", "--seq-len", "64",
            "--batch-size", "2", "--save-every", "3"]
    done = study("aux_coef_ablation", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| 0 |" in summary and "| 0.01 |" in summary
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "checkpoint" in p.parts}
    again = study("aux_coef_ablation", args, cwd=tmp_path)  # finished runs are not trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
