"""Bad input and faults, on purpose, across the commands: each case exits with the status it should (2: bad input
or environment), prints one line naming what and where (its key words asserted), writes no traceback, and changes
nothing outside the command's own output: the test's whole directory and the shared checkpoint are snapshotted
(every file's bytes) before and after. docs/testing.md lists the cases.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from safetensors.numpy import load_file, save_file

import moejax.report.figures  # noqa: F401 (matplotlib's caches settle in the real home, before a test moves HOME)
from moejax.cli import main
from moejax.data.corpus import SAMPLE_DIR
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer

pytestmark = pytest.mark.torch



def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots (and every directory and link, links not followed), with a hash of its bytes."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                found[str(path)] = ("link to " + os.readlink(path) if path.is_symlink() else
                                    hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
    return found


def with_config(checkpoint: Path, place: Path, **changes) -> Path:
    """A copy of the checkpoint with config.json fields changed (None removes nothing: it writes null)."""
    shutil.copytree(checkpoint, place)
    config = json.loads((place / "config.json").read_text())
    config.update(changes)
    (place / "config.json").write_text(json.dumps(config))
    return place


def with_nan(checkpoint: Path, place: Path) -> Path:
    shutil.copytree(checkpoint, place)
    tensors = load_file(place / "model.safetensors")
    tensors["model.layers.1.mlp.experts.2.down_proj.weight"][0, 0] = np.nan
    save_file(tensors, place / "model.safetensors", metadata={"format": "pt"})
    return place


def small_vocabulary(place: Path) -> Path:
    """A model of 97 tokens with the 259-token byte tokenizer: its tokenizer gives ids the model does not have."""
    make_checkpoint("qwen3_moe", place, seed=4, vocab_size=97)
    save_byte_tokenizer(place)
    return place


def corpus_table(place: Path, rows: list[dict], suffix: str = ".tsv") -> Path:
    with open(place / f"corpus{suffix}", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return place / f"corpus{suffix}"


def notes(place: Path) -> Path:
    """A directory of the user's own."""
    place.mkdir()
    (place / "notes.txt").write_text("my notes, not moejax's")
    (place / "sub").mkdir()
    (place / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return place


def marked(place: Path, command: str) -> Path:
    """A directory another moejax command wrote."""
    place.mkdir()
    (place / ".moejax-output.json").write_text(json.dumps({"command": command}))
    (place / "summary.json").write_text("{}")
    return place


SENTENCES = {lang: (SAMPLE_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:6] for lang in ("en", "he")}
# (name, setup(t, ckpt) -> argv, exit status, key words of the message)
CASES = [
    # Output directories: never the working, home or root directory, never an input, never someone else's.
    ("analyze-out-cwd", lambda t, c: ["analyze", "--out", "."], 2, ["working directory"]),
    ("analyze-out-home", lambda t, c: ["analyze", "--out", str(t / "home")], 2, ["home directory"]),
    ("analyze-out-root", lambda t, c: ["analyze", "--out", "/"], 2, ["root directory"]),
    ("analyze-out-is-data", lambda t, c: ["analyze", "--data", str(SAMPLE_DIR), "--out", str(SAMPLE_DIR)], 2,
     ["is the input"]),
    ("analyze-out-is-a-file", lambda t, c: ["analyze", "--out", str(t / "cwd" / "file.txt")], 2, ["is a file"]),
    ("analyze-out-users-dir", lambda t, c: ["analyze", "--out", str(notes(t / "mine"))], 2,
     ["did not write", "notes.txt"]),
    ("analyze-out-parity-output", lambda t, c: ["analyze", "--out", str(marked(t / "p", "parity"))], 2,
     ["moejax parity", "not of `moejax analyze`"]),
    ("convert-out-cwd", lambda t, c: ["convert", str(c), "."], 2, ["working directory"]),
    ("convert-out-is-input", lambda t, c: ["convert", str(c), str(c)], 2, ["is the input"]),
    ("convert-out-inside-input", lambda t, c: ["convert", str(c), str(c / "orbax")], 2, ["lies inside the input"]),
    ("convert-out-contains-input", lambda t, c: ["convert", str(c), str(c.parent)], 2, ["contains the input"]),
    ("convert-out-users-dir", lambda t, c: ["convert", str(c), str(notes(t / "mine"))], 2, ["did not write"]),
    ("export-out-convert-output", lambda t, c: ["export", str(c), str(marked(t / "o", "convert"))], 2,
     ["moejax convert"]),
    ("parity-out-is-model", lambda t, c: ["parity", "--model", str(c), "--out", str(c), "--quiet"], 2,
     ["is the input"]),
    ("train-out-users-dir", lambda t, c: ["train", "--out", str(notes(t / "mine")), "--quiet"], 2,
     ["not a moejax run"]),
    ("train-out-contains-data", lambda t, c: ["train", "--data", f"he={SAMPLE_DIR / 'he.txt'}:1", "--out",
                                              str(SAMPLE_DIR), "--quiet"], 2, ["contains the input"]),
    ("train-run-json-corrupt", lambda t, c: (t / "run").mkdir() or (t / "run" / "run.json").write_text("{") and
     ["train", "--out", str(t / "run"), "--quiet"], 2, ["not valid JSON"]),
    ("plan-json-users-file", lambda t, c: ["plan", "--model", "qwen3-30b-a3b", "--mesh", "expert=1", "--json",
                                           str(t / "cwd" / "file.txt")], 2, ["not written by `moejax plan`"]),
    # config.json values typed as transformers types them.
    ("config-bool-as-string", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m", tie_word_embeddings=
                                                                                   "false"))], 2,
     ["tie_word_embeddings", "true or false", "config.json"]),
    ("config-float-size", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m", hidden_size=48.7))], 2,
     ["hidden_size", "48.7", "an integer"]),
    ("config-null-required", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m",
                                                                               num_hidden_layers=None))], 2,
     ["num_hidden_layers", "null"]),
    ("config-number-as-string", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m",
                                                                                  rms_norm_eps="1e-6"))], 2,
     ["rms_norm_eps", "a number"]),
    ("config-int-as-bool", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m", norm_topk_prob=1))], 2,
     ["norm_topk_prob", "true or false"]),
    ("config-list-of-floats", lambda t, c: ["analyze", "--model", str(with_config(c, t / "m",
                                                                                mlp_only_layers=[1.0]))], 2,
     ["mlp_only_layers", "list of integers"]),
    # Non-finite weights are refused at load, naming the tensor.
    ("analyze-nan-weights", lambda t, c: ["analyze", "--model", str(with_nan(c, t / "m"))], 2,
     ["model.layers.1.mlp.experts.2.down_proj.weight", "NaN or infinite", "--allow-nonfinite"]),
    ("convert-nan-weights", lambda t, c: ["convert", str(with_nan(c, t / "m")), str(t / "out")], 2,
     ["NaN or infinite"]),
    # Numeric flags, checked when parsed, naming the flag and the range.
    ("train-negative-lr", lambda t, c: ["train", "--lr", "-1"], 2, ["--lr must be > 0"]),
    ("train-zero-lr", lambda t, c: ["train", "--lr", "0"], 2, ["--lr must be > 0"]),
    ("train-zero-steps", lambda t, c: ["train", "--steps", "0"], 2, ["--steps must be >= 1"]),
    ("train-seq-len-1", lambda t, c: ["train", "--seq-len", "1"], 2, ["--seq-len must be >= 2"]),
    ("train-b1-above-1", lambda t, c: ["train", "--b1", "1.5"], 2, ["--b1 must be <= 1"]),
    ("train-nan-lr", lambda t, c: ["train", "--lr", "nan"], 2, ["--lr", "finite"]),
    ("train-eval-every-alone", lambda t, c: ["train", "--eval-every", "5"], 2, ["--eval-data", "--eval-every"]),
    ("train-unknown-config-field", lambda t, c: (t / "c.toml").write_text("learning_rate = 0.1\n") and
     ["train", "--config", str(t / "c.toml")], 2, ["unknown setting", "learning_rate"]),
    ("analyze-zero-batch", lambda t, c: ["analyze", "--batch-size", "0"], 2, ["--batch-size must be >= 1"]),
    ("analyze-negative-chunk-words", lambda t, c: ["analyze", "--chunk-words", "-5"], 2, ["--chunk-words"]),
    ("analyze-exclude-ids-text", lambda t, c: ["analyze", "--exclude-ids", "abc"], 2,
     ["--exclude-ids expects an integer", "'abc'"]),
    ("analyze-exclude-ids-negative", lambda t, c: ["analyze", "--exclude-ids", "-1"], 2,
     ["--exclude-ids must be >= 0"]),
    ("analyze-exclude-ids-beyond-vocab", lambda t, c: ["analyze", "--exclude-ids", "5000"], 2,
     ["--exclude-ids 5000", "vocabulary"]),
    ("plan-zero-batch", lambda t, c: ["plan", "--model", "qwen3-30b-a3b", "--mesh", "expert=4", "--batch", "0"], 2,
     ["--batch must be >= 1"]),
    ("plan-zero-seq", lambda t, c: ["plan", "--model", "qwen3-30b-a3b", "--mesh", "expert=4", "--seq", "0"], 2,
     ["--seq must be >= 1"]),
    ("parity-negative-tolerance", lambda t, c: ["parity", "--model", str(c), "--tol", "kl_mean=-1"], 2,
     ["--tol", "kl_mean=-1", ">= 0"]),
    ("parity-zero-tokens", lambda t, c: ["parity", "--model", str(c), "--max-tokens", "0"], 2,
     ["--max-tokens must be >= 1"]),
    ("export-zero-shard", lambda t, c: ["export", str(c), str(t / "out"), "--max-shard-gb", "0"], 2,
     ["--max-shard-gb must be > 0"]),
    # Token ids outside the vocabulary, named with the tokenizer and the model.
    ("analyze-ids-beyond-vocab", lambda t, c: ["analyze", "--model", str(small_vocabulary(t / "m"))], 2,
     ["outside the model's vocabulary of 97", "tokenised by"]),
    ("train-ids-beyond-vocab", lambda t, c: ["train", "--model", str(small_vocabulary(t / "m")), "--out",
                                             str(t / "run"), "--quiet"], 2, ["outside the vocabulary [0, 97)"]),
    ("parity-ids-beyond-vocab", lambda t, c: ["parity", "--model", str(small_vocabulary(t / "m")), "--quiet"], 2,
     ["outside the model's vocabulary of 97"]),
    # Corpora: an empty cell names its row; undecodable or missing files are named.
    ("corpus-empty-cell", lambda t, c: ["analyze", "--langs", "en,he", "--data", str(corpus_table(
        t, [{"en": "One.", "he": "אחת."}, {"en": "Two.", "he": ""}]))], 2, ["row 3", "'he'", "--skip-incomplete"]),
    ("corpus-not-utf8", lambda t, c: (t / "c.tsv").write_bytes(b"en\the\n\xff\xfe\x00\tx\n") and
     ["analyze", "--langs", "en,he", "--data", str(t / "c.tsv")], 2, ["not UTF-8"]),
    ("corpus-missing", lambda t, c: ["analyze", "--data", str(t / "nowhere")], 2, ["no such corpus"]),
    ("corpus-jsonl-not-object", lambda t, c: (t / "c.jsonl").write_text('["en", "he"]\n') and
     ["analyze", "--langs", "en,he", "--data", str(t / "c.jsonl")], 2, ["c.jsonl:1", "JSON object"]),
    ("corpus-unknown-language", lambda t, c: ["analyze", "--langs", "en,xx"], 2, ["unknown language code", "xx"]),
    # An output directory that contains the working or home directory, however it is spelled, even when it holds an
    # earlier output of the same command (its marker proves the directory is moejax's, not all that is inside).
    ("analyze-out-parent-of-cwd", lambda t, c: ["analyze", "--out", ".."], 2, ["contains the working directory"]),
    ("analyze-out-grandparent-marked", lambda t, c: marker_in(t, "analyze") and ["analyze", "--out", "../cwd/.."], 2,
     ["contains the working directory"]),
    ("export-out-ancestor-absolute", lambda t, c: ["export", str(c), str(t)], 2, ["contains the working directory"]),
    ("parity-out-trailing-slash", lambda t, c: ["parity", "--model", str(c), "--out", f"{t}/", "--quiet"], 2,
     ["contains the working directory"]),
    ("eval-out-symlink-to-ancestor", lambda t, c: (t / "cwd" / "link").symlink_to(t) or
     ["eval", "--out", "link"], 2, ["contains the working directory"]),
    ("train-out-spelled-through-home", lambda t, c: ["train", "--out", str(t / "home" / ".."), "--quiet"], 2,
     ["contains the working directory"]),
    # Re-running into an earlier output that holds what the user added: refused, naming the first such file.
    ("export-again-with-user-results", lambda t, c: exported(t, c) and (t / "e" / "eval" / "x").mkdir(parents=True)
     or (t / "e" / "eval" / "x" / "results.json").write_text("{}") and ["export", str(c), str(t / "e")], 2,
     ["eval/", "moejax did not write"]),
    ("analyze-again-with-user-notes", lambda t, c: analyzed(t) and (t / "a" / "notes").mkdir() or
     (t / "a" / "notes" / "README").write_text("mine") and ["analyze", "--out", str(t / "a"), "--quiet"], 2,
     ["notes/", "moejax did not write"]),
    ("analyze-again-with-edited-report", lambda t, c: analyzed(t) and
     (t / "a" / "report.md").write_text("my own edits") and ["analyze", "--out", str(t / "a"), "--quiet"], 2,
     ["report.md", "changed since moejax wrote it"]),
    # Selections and flags that would train something else than what was meant.
    ("train-experts-empty", lambda t, c: (t / "s.json").write_text("{}") and
     ["train", "--train-experts", str(t / "s.json"), "--out", str(t / "run"), "--quiet"], 2, ["selects no expert"]),
    ("train-experts-empty-lists", lambda t, c: (t / "s.json").write_text('{"0": [], "3": []}') and
     ["train", "--model", str(c), "--train-experts", str(t / "s.json"), "--out", str(t / "run"), "--quiet"], 2,
     ["selects no expert"]),
    ("train-experts-empty-seft", lambda t, c: (t / "s.json").write_text('{"he": {"seft": {"7": []}}}') and
     ["train", "--train-experts", f"{t / 's.json'}:he:seft", "--out", str(t / "run"), "--quiet"], 2,
     ["selects no expert"]),
    ("train-experts-and-blocks", lambda t, c: ["train", "--train-experts", "s.json", "--train-blocks", "1"], 2,
     ["--train-experts and --train-blocks"]),
    ("train-sft-answers-beyond-seq-len", lambda t, c: ["train", "--sft", "--data", f"en={chats(t, 'en')}:1",
                                                       "--seq-len", "16", "--out", str(t / "run"), "--quiet"], 2,
     ["no assistant token", "'en'", "--seq-len 16"]),
    ("train-sft-one-language-beyond", lambda t, c: ["train", "--sft", "--data", f"en={chats(t, 'en', 2)}:0.5,"
                                                    f"he={chats(t, 'he')}:0.5", "--seq-len", "40", "--out",
                                                    str(t / "run"), "--quiet"], 2, ["no assistant token", "'he'"]),
    ("train-nothing-trainable", lambda t, c: ["train", "--trainable", "nomatch", "--out", str(t / "run"),
                                              "--quiet"], 2, ["matches no parameter"]),
    ("train-all-data-blank", lambda t, c: (t / "blank.txt").write_text("\n  \n\n") and
     ["train", "--data", f"en={t / 'blank.txt'}:1", "--out", str(t / "run"), "--quiet"], 2,
     ["blank.txt is empty"]),
    # What used to end in a traceback: one line naming the file, the key and what is allowed.
    ("steering-layer-last", lambda t, c: spec(t, {"experts": {"last": [1]}, "mode": "hard", "direction": "promote"})
     and ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["layer key 'last'", "-1 for the last"]),
    ("steering-layer-word", lambda t, c: spec(t, {"layers": {"x1": {"promote": [1]}}}) and
     ["analyze", "--steering", str(t / "spec.json"), "--out", str(t / "a"), "--quiet"], 2, ["layer key 'x1'"]),
    ("steering-layer-out-of-range", lambda t, c: spec(t, {"layers": {"-9": {"promote": [1]}}}) and
     ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["layer -9 is not an MoE layer", "MoE layers 0-3"]),
    ("trainable-bad-regex", lambda t, c: ["train", "--trainable", "(("], 2,
     ["--trainable '(('", "not a regular expression"]),
    ("trainable-bad-regex-config", lambda t, c: (t / "c.toml").write_text('trainable = "[a-"\n') and
     ["train", "--config", str(t / "c.toml")], 2, ["not a regular expression"]),
    ("config-int-as-string-generate", lambda t, c: ["generate", "--model", str(with_config(c, t / "m",
                                                                                         num_experts="12")),
                                                    "--prompt", "hi"], 2, ["num_experts", '"12"', "an integer"]),
    ("config-int-as-string-eval", lambda t, c: ["eval", "--model", str(with_config(c, t / "m",
                                                                                 num_experts_per_tok="3")),
                                                "--out", str(t / "e")], 2, ["num_experts_per_tok", "an integer"]),
    ("config-float-size-export", lambda t, c: ["export", str(with_config(c, t / "m", hidden_size=48.5)),
                                               str(t / "e")], 2, ["hidden_size", "an integer"]),
    # Nonsense that used to run: magnitudes that make the routing degenerate, specs leaving fewer than top-k.
    ("steering-lambda-huge", lambda t, c: spec(t, {"mode": "soft", "lambda": 1e38, "layers": {"0": {"suppress": [1]}}})
     and ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["lambda 1e+38", "standard deviations"]),
    ("steering-lambda-negative-huge", lambda t, c: spec(t, {"lambda": -25, "layers": {"0": {"promote": [1]}}}) and
     ["analyze", "--steering", str(t / "spec.json"), "--out", str(t / "a"), "--quiet"], 2, ["lambda -25"]),
    ("steering-lambda-string", lambda t, c: spec(t, {"lambda": "0.5", "layers": {"0": {"promote": [1]}}}) and
     ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["lambda must be a finite number"]),
    ("steering-hard-suppress-all", lambda t, c: spec(t, {"mode": "hard", "layers": {"1": {"suppress": list(range(8))}}})
     and ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["suppresses 8 of its 8 experts", "suppress at most 5"]),
    ("steering-soft-suppress-too-many", lambda t, c: spec(t, {"layers": {"2": {"suppress": [0, 1, 2, 3, 4, 5]}}}) and
     ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2,
     ["fewer than the 3"]),
    ("steering-layer-twice", lambda t, c: spec(t, {"layers": {"3": {"promote": [1]}, "-1": {"promote": [2]}}}) and
     ["generate", "--model", str(c), "--prompt", "hi", "--steering", str(t / "spec.json")], 2, ["given twice"]),
]


def marker_in(place: Path, command: str) -> bool:
    """The test's root marked as an earlier output of `command` (the case that used to be replaced)."""
    (place / ".moejax-output.json").write_text(json.dumps({"command": command, "files": {}}))
    return True


def exported(t: Path, checkpoint: Path) -> bool:
    assert main(["export", str(checkpoint), str(t / "e")]) == 0
    return True


_ANALYZED: list[Path] = []  # the first case's analysis output, copied (times kept) for the next case


def analyzed(t: Path) -> bool:
    """An earlier `moejax analyze` output at t/a. It is run once per module; later cases get a copy with the same
    files, sizes and modification times, which its marker's manifest holds, so it is that output as moejax left it."""
    if _ANALYZED:
        shutil.copytree(_ANALYZED[0], t / "a", copy_function=shutil.copy2)
        return True
    # Two short chunks per language: what is refused is the re-run into it, whatever the earlier run analysed.
    assert main(["analyze", "--langs", "en,he", "--chunk-words", "60", "--max-chunks", "2", "--out", str(t / "a"),
                 "--quiet"]) == 0
    keep = Path(tempfile.mkdtemp(prefix="moejax-analyzed-"))
    atexit.register(shutil.rmtree, keep, True)
    _ANALYZED.append(keep / "a")
    shutil.copytree(t / "a", _ANALYZED[0], copy_function=shutil.copy2)
    return True


def spec(t: Path, record: dict) -> bool:
    (t / "spec.json").write_text(json.dumps(record))
    return True


def chats(t: Path, lang: str, prompt_words: int = 40) -> Path:
    """SFT records whose answers come after a prompt of `prompt_words` words."""
    path = t / f"{lang}.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(["word"] * prompt_words), "response": "yes"}) + "\n"
                            for _ in range(4)))
    return path


# The quick loop leaves out the cases that run a whole command before the bad input (the full suite runs them).
SLOW_CASES = ("analyze-again-with-user-notes", "analyze-again-with-edited-report", "plan-json-users-file")


@pytest.mark.parametrize("name, setup, status, words", [
    pytest.param(*case, marks=pytest.mark.slow) if case[0] in SLOW_CASES else case for case in CASES],
    ids=[c[0] for c in CASES])
def test_bad_input(name, setup, status, words, checkpoint, tmp_path, monkeypatch, capsys):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (cwd / "file.txt").write_text("the user's file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    argv = setup(tmp_path, checkpoint)
    before = snapshot(tmp_path, checkpoint, SAMPLE_DIR)
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("moejax ")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path, checkpoint, SAMPLE_DIR) == before


def test_enough_cases():
    assert len(CASES) >= 70
