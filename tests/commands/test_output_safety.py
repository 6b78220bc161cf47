"""What a command writes never costs the user anything else: outputs replace only what the same command wrote (and
refuse while anything else is inside), in one atomic exchange; a killed or terminated run leaves OUT absent or
complete (old or new) and its temporaries are gone after the next run; outputs get the user's normal permissions; a
full disk is one clear line; corpora exported by spreadsheets and Python's csv module read as they are; a broken
checkpoint compared on purpose reports NaN."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from safetensors.numpy import load_file, save_file

import moejax
from moejax.checkpoint import orbax_errors
from moejax.cli import main
from moejax.data.corpus import read_corpus
from moejax.errors import OutputError
from moejax.io import MARKER, PARTIAL, new_directory, output_directory

pytestmark = pytest.mark.torch
# The rules of OUT do not depend on the corpus: two short chunks per language (rows of 1024 tokens, not 4096) keep
# each analysis to seconds once the module has compiled its forward for that shape.
SMALL_ANALYSIS = ["analyze", "--quiet", "--langs", "en,he", "--chunk-words", "60", "--max-chunks", "2"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.slow
def test_same_command_replaces_its_output_atomically_with_normal_permissions(tmp_path, monkeypatch):
    out = tmp_path / "analysis"
    args = [*SMALL_ANALYSIS, "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / MARKER).read_text())
    assert first["command"] == "analyze"
    (out / "extra.txt").write_text("the user's")
    assert main(args) == 2  # the marker proves the directory is moejax's, not that all inside is
    assert (out / "extra.txt").read_text() == "the user's"
    (out / "extra.txt").unlink()
    inode = out.stat().st_ino
    assert main(args) == 0
    assert (out / "layers.csv").is_file()
    assert out.stat().st_ino != inode and leftovers(out) == []  # a new directory took the old one's place
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "layers.csv").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failure_inside_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    with output_directory(out, "analyze") as tmp:
        (tmp / "result.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"), output_directory(out, "analyze") as tmp:
        (tmp / "result.txt").write_text("half")
        raise OSError(28, "No space left on device")
    assert (out / "result.txt").read_text() == "old" and leftovers(out) == []


def test_a_new_directory_appears_whole(tmp_path):
    """new_directory (a training run's start): OUT appears with everything the block wrote or not at all. Absent or
    empty before; unchanged when the block raises; refused, the user's file kept, when it was filled meanwhile; a
    symbolic link keeps pointing at the directory it names, which is the one replaced."""
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "run"
    with new_directory(out, "train") as tmp:
        assert not out.exists() and (tmp / PARTIAL).is_file()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and leftovers(out) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for before in ("absent", "empty"):
        out = tmp_path / f"run-{before}"
        if before == "empty":
            out.mkdir()
        with pytest.raises(KeyboardInterrupt), new_directory(out, "train") as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
        assert (out.exists(), leftovers(out)) == ((before == "empty"), [])
        assert not out.exists() or list(out.iterdir()) == []
    out = tmp_path / "filled"
    out.mkdir()
    with pytest.raises(OutputError, match="no longer empty"), new_directory(out, "train") as tmp:
        (tmp / "config.json").write_text("{}")
        (out / "notes.txt").write_text("the user's")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and leftovers(out) == []
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with new_directory(tmp_path / "link", "train") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "link").is_symlink() and (target / "config.json").is_file()


def test_a_killed_start_leaves_out_as_it_was(tmp_path):
    """SIGKILL while new_directory's block writes: OUT stays absent, and the next start beside it removes the
    temporary the killed process left (never one of a process still running)."""
    out = tmp_path / "run"
    code = ("import os, signal, sys; from pathlib import Path; from moejax.io import new_directory\n"
            "with new_directory(Path(sys.argv[1]), 'train') as tmp:\n"
            "    (tmp / 'config.json').write_text('{}'); os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not out.exists() and len(leftovers(out)) == 1
    alive = tmp_path / f".run.moejax-train-{os.getpid()}-running"  # this process's: still being written
    alive.mkdir()
    (alive / PARTIAL).write_text("{}")
    with new_directory(out, "train") as tmp:
        (tmp / "config.json").write_text("{}")
    assert leftovers(out) == [alive.name] and sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_full_disk_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """Orbax's errors from a file system (disk full here) become one OutputError naming OUT and the reason; the
    command exits 2 and leaves nothing."""
    with pytest.raises(OutputError, match="out: writing the checkpoint failed: No space left on device"), \
            orbax_errors(tmp_path / "out"):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"x\" in OCDBT database: Failed to write 1 bytes "
                         "[os_error_code='28']")
    import moejax.commands.analyze as analyze_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analyze_module, "write_csv", full)
    assert main([*SMALL_ANALYSIS, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moejax analyze: error:") and "No space left on device" in err[-1]
    assert not (tmp_path / "a").exists() and leftovers(tmp_path / "a") == []


# A test-owned wrapper around the command line: the process dies (SIGKILL, or SIGTERM to itself) at one chosen point.
DIE_AT = """
import os, signal, sys
import moejax.io as io, moejax.checkpoint as checkpoint, moejax.export as export
point, how = sys.argv[1], getattr(signal, sys.argv[2])
die = lambda: os.kill(os.getpid(), how)
if point == "loaded":
    original_start = io.output_directory
    def start(*a, **k):
        die()
        return original_start(*a, **k)
    checkpoint.output_directory = export.output_directory = start
elif point == "writing":
    original = checkpoint.ocp.StandardCheckpointer.wait_until_finished
    checkpoint.ocp.StandardCheckpointer.wait_until_finished = lambda self: die()
    original_write = export.write_safetensors
    def write(path, tensors):
        original_write(path, tensors)
        die()
    export.write_safetensors = write
elif point == "exchanging":
    io._move_into_place = lambda tmp, out: die()
elif point == "exchanged":
    original_exchange = io._exchange
    def exchange(a, b):
        done = original_exchange(a, b)
        die()
        return done
    io._exchange = exchange
from moejax.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "export"])
def test_killed_runs_leave_out_absent_or_complete(checkpoint, tmp_path, command):
    """SIGKILL at each point of a convert or an export, first into a new OUT, then over an earlier complete one:
    OUT is absent or complete after each kill (the earlier output until the exchange, the new one from it), and the
    next run leaves no temporary behind. SIGTERM removes the temporaries itself."""
    out = tmp_path / "out"
    args = [command, str(checkpoint), str(out), "--dtype", "float32"]

    def complete() -> bool:
        if not (out / MARKER).is_file():
            return False
        if command == "convert":
            return (out / "moejax.json").is_file() and moejax.from_pretrained(out) is not None
        index = json.loads((out / "model.safetensors.index.json").read_text())
        return all((out / shard).is_file() for shard in set(index["weight_map"].values()))

    def mark_earlier():  # the marker of this output, told apart from the next one's (its list of files kept)
        (out / MARKER).write_text(json.dumps(json.loads((out / MARKER).read_text()) | {"written": "the earlier run"}))

    for point in ("loaded", "writing", "exchanging"):
        done = subprocess.run([sys.executable, "-c", DIE_AT, point, "SIGKILL", *args], capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        assert not out.exists(), point
    assert main(args) == 0 and complete() and leftovers(out) == []
    stamp = json.loads((out / MARKER).read_text())["written"]
    mark_earlier()
    for point in ("writing", "exchanging", "exchanged"):
        done = subprocess.run([sys.executable, "-c", DIE_AT, point, "SIGKILL", *args], capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        assert complete(), point
        earlier = json.loads((out / MARKER).read_text())["written"] == "the earlier run"
        assert earlier == (point != "exchanged"), point
        mark_earlier()
    assert leftovers(out)  # what the kills left; the next run removes it
    assert main(args) == 0 and complete() and leftovers(out) == [] and stamp
    done = subprocess.run([sys.executable, "-c", DIE_AT, "writing", "SIGTERM", *args], capture_output=True, text=True)
    assert done.returncode == 128 + signal.SIGTERM and leftovers(out) == [] and complete()


@pytest.mark.slow
def test_corpus_as_spreadsheets_export_it(tmp_path, capsys):
    """A TSV written by Python's csv module (quoted cells with tabs and newlines inside, CRLF line ends, a BOM), and
    a CSV: read cell for cell. An empty cell names its row, or with --skip-incomplete drops it, counted per
    language."""
    rows = [{"en": "One line.", "he": "שורה אחת."},
            {"en": "Two\nlines, with\ta tab.", "he": "שתי\r\nשורות."},
            {"en": 'A "quoted" word.', "he": "מילה \"מצוטטת\"."},
            {"en": "Untranslated.", "he": ""},
            {"en": "", "he": "לא תורגם."},
            {"en": "Last.", "he": "אחרון."}]
    for suffix, delimiter in ((".tsv", "\t"), (".csv", ",")):
        path = tmp_path / f"corpus{suffix}"
        with open(path, "w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, fieldnames=["en", "he"], delimiter=delimiter, lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(rows)
        assert b"\r\n" in path.read_bytes() and path.read_bytes().startswith(b"\xef\xbb\xbf")
        with pytest.raises(moejax.MoejaxError, match="row 5 .*no 'he' text"):
            read_corpus(path, ["en", "he"])
        corpus = read_corpus(path, ["en", "he"], skip_incomplete=True)
        kept = [r for r in rows if r["en"] and r["he"]]
        assert corpus["en"] == [r["en"].strip() for r in kept] and corpus["he"] == [r["he"].strip() for r in kept]
        assert corpus.skipped == {"en": 1, "he": 1}
    out = tmp_path / "analysis"
    assert main(["analyze", "--quiet", "--langs", "en,he", "--data", str(tmp_path / "corpus.tsv"),
                 "--skip-incomplete", "--out", str(out)]) == 0
    assert "he 1" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["skipped_incomplete_rows"] == {"en": 1, "he": 1}


def test_parity_on_a_broken_checkpoint_reports_nan(checkpoint, tmp_path, capsys):
    """NaN weights compared on purpose (--allow-nonfinite): the checks fail (exit 1), the NaN figures read NaN
    (never 0), and summary.json stays valid JSON."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.2.mlp.experts.1.down_proj.weight"][:] = np.nan
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "parity"
    assert main(["parity", "--model", str(broken), "--quiet", "--out", str(out)]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not out.exists()
    assert main(["parity", "--model", str(broken), "--allow-nonfinite", "--quiet", "--seq-len", "64",
                 "--max-tokens", "192", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: no bare NaN
    assert summary["verdict"] == "fail" and summary["overall"]["kl_mean"] == "NaN"
    failed = {c["check"] for c in summary["checks"] if not c["passed"]}
    assert {"kl_mean", "hidden_relative"} <= failed
    with open(out / "layers.csv") as f:
        layers = list(csv.DictReader(f))
    assert math.isnan(float(layers[2]["hidden_relative_diff"])) and float(layers[1]["hidden_relative_diff"]) < 1e-5
