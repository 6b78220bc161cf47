"""benchmarks/run_all.py, the regression guard: --compare on hand-written reports (a regression flagged, an
improvement not, a CPU mismatch said, a failed benchmark reported, bad files refused in one line), its runner on
stand-in scripts (a failure recorded and the run continued), and its list covering every benchmarks/bench_*.py.
No benchmark runs here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("benchmarks_run_all", BENCHMARKS_DIR / "run_all.py")
run_all = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(run_all)

AVX512 = {"model": "AMD EPYC", "avx2": True, "avx512": True}
AVX2 = {"model": "AMD EPYC", "avx2": True, "avx512": False}
VERSIONS = {"jax": "0.10.2", "torch": "2.13.0+cpu", "transformers": "5.23.0", "moejax": "0.1.0"}


def report(benchmarks: dict, cpu: dict = AVX512) -> dict:
    entries = {name: {"ratio": ratio, "seconds": 10.0, "args": ["python", f"benchmarks/bench_{name}.py"],
                      "error": None} for name, ratio in benchmarks.items()}
    return {"date": "2026-12-05T10:00:00+00:00", "cpu": cpu, "versions": VERSIONS, "quick": True,
            "benchmarks": entries}


def compare_files(tmp_path, old: dict, new: dict, *flags: str) -> int:
    """run_all --compare on the two reports written to files: its exit status."""
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    return run_all.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), *flags])


def row(out: str, benchmark: str, ratio: str) -> str:
    (line,) = [line for line in out.splitlines() if line.split()[:2] == [benchmark, ratio]]
    return line


OLD = report({"forward": {"qwen3_moe": 2.0, "nemotron_h": 1.5}, "generate": 2.0, "load": {"float32": 0.95}})


def test_a_drop_past_the_threshold_is_flagged_and_an_improvement_is_not(tmp_path, capsys):
    new = report({"forward": {"qwen3_moe": 1.7, "nemotron_h": 1.8}, "generate": 1.85, "load": {"float32": 0.95}})
    status = compare_files(tmp_path, OLD, new)
    out = capsys.readouterr().out
    assert status == 1
    assert row(out, "forward", "qwen3_moe").split()[2:] == ["2.000", "1.700", "-15.0%", "REGRESSED", "(more", "than",
                                                            "10%", "lower)"]
    assert row(out, "forward", "nemotron_h").split()[2:] == ["1.500", "1.800", "+20.0%"]  # faster: not flagged
    assert row(out, "generate", "-").split()[2:] == ["2.000", "1.850", "-7.5%"]  # within 10%
    assert "CPUs differ" not in out and "versions differ" not in out


def test_the_threshold_decides(tmp_path, capsys):
    new = report({"forward": {"qwen3_moe": 2.0, "nemotron_h": 1.5}, "generate": 1.85, "load": {"float32": 0.95}})
    assert compare_files(tmp_path, OLD, new) == 0
    assert "no ratio fell by more than 10%" in capsys.readouterr().out
    assert compare_files(tmp_path, OLD, new, "--threshold", "5") == 1
    assert "REGRESSED" in row(capsys.readouterr().out, "generate", "-")


def test_a_cpu_mismatch_is_said(tmp_path, capsys):
    new = report({"forward": {"qwen3_moe": 2.0, "nemotron_h": 1.5}, "generate": 2.0, "load": {"float32": 0.95}},
                 cpu=AVX2)
    assert compare_files(tmp_path, OLD, new) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "CPUs differ" in line]
    assert "OLD AMD EPYC (AVX-512), NEW AMD EPYC (AVX2)" in note


def test_a_failed_benchmark_is_reported_and_fails_the_comparison(tmp_path, capsys):
    new = report({"forward": {"qwen3_moe": 2.0, "nemotron_h": 1.5}, "generate": 2.0, "load": {"float32": 0.95}})
    new["benchmarks"]["generate"] |= {"ratio": None, "error": "RuntimeError: out of cheese"}
    assert compare_files(tmp_path, OLD, new) == 1
    out = capsys.readouterr().out
    assert "generate" in out and "FAILED in NEW: RuntimeError: out of cheese" in out
    assert "REGRESSED" not in out


def test_benchmarks_on_one_side_only_are_named(tmp_path, capsys):
    old = report({"forward": {"qwen3_moe": 2.0}, "load": {"float32": 0.95}, "eval": None})
    old["benchmarks"]["eval"]["error"] = "MemoryError"
    new = report({"forward": {"qwen3_moe": 2.0}, "scale": {"expert=8": 0.9}, "eval": {"qwen3_moe": 1.7}})
    assert compare_files(tmp_path, old, new) == 0
    out = capsys.readouterr().out
    assert "not in NEW" in [line for line in out.splitlines() if line.startswith("load")][0]
    assert row(out, "scale", "expert=8").split()[2:] == ["0.900", "not", "in", "OLD"]
    assert row(out, "eval", "qwen3_moe").split()[2:] == ["1.700", "failed", "in", "OLD"]


def test_a_ratio_that_was_not_positive_is_not_compared(tmp_path, capsys):
    old = report({"generate": {"nemotron_h_decode": -12.2}})
    new = report({"generate": {"nemotron_h_decode": 2.0}})
    assert compare_files(tmp_path, old, new) == 0
    assert "OLD ratio not positive: not compared" in row(capsys.readouterr().out, "generate", "nemotron_h_decode")


@pytest.mark.parametrize("content, says", [
    ("{not json", "not a JSON file run_all wrote"),
    ('{"date": "x"}', 'no "benchmarks" object'),
    ('{"benchmarks": {"forward": {"ratio": "fast"}}}', "benchmarks.forward.ratio must be a number"),
])
def test_a_bad_file_is_refused_in_one_line_naming_it(tmp_path, capsys, content, says):
    (tmp_path / "bad.json").write_text(content)
    (tmp_path / "good.json").write_text(json.dumps(OLD))
    assert run_all.main(["--compare", str(tmp_path / "good.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "bad.json") in err and says in err


def test_the_list_covers_every_benchmark_script():
    """A new benchmarks/bench_*.py must be added to run_all's list, or this fails."""
    listed = {bench.script for bench in run_all.BENCHMARKS.values()}
    on_disk = {path.name for path in BENCHMARKS_DIR.glob("bench_*.py")}
    assert on_disk and on_disk <= listed
    assert "parity_floor.py" in listed
    assert all((BENCHMARKS_DIR / script).is_file() for script in listed)


def test_cpu_flags_from_cpuinfo():
    line = "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse2 avx avx2 fma {}\n"
    assert run_all.cpu(line.format("avx512f avx512bw")) == {"model": "AMD EPYC 9B45", "avx2": True, "avx512": True}
    assert run_all.cpu(line.format("")) == {"model": "AMD EPYC 9B45", "avx2": True, "avx512": False}


STAND_INS = {
    "ok": 'import json, sys\nprint("measured")\njson.dump({"ratios": {"a": 1.5}}, open(sys.argv[-1], "w"))\n',
    "boom": 'print("started")\nraise RuntimeError("out of cheese")\n',
    "silent": 'print("forgot the json")\n',
    "slow": 'import time\ntime.sleep(60)\n',
}


@pytest.mark.slow
def test_the_runner_records_a_failure_and_carries_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "benchmarks").mkdir()
    for name, code in STAND_INS.items():
        (tmp_path / "benchmarks" / f"{name}.py").write_text(code)
    monkeypatch.setattr(run_all, "REPO", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", {name: run_all.Benchmark(f"{name}.py", ("--small",))
                                                for name in STAND_INS})
    out = tmp_path / "ratios.json"
    assert run_all.main(["--quick", "--out", str(out), "--timeout", "3"]) == 1
    written = json.loads(out.read_text())
    assert written["quick"] is True and set(written["cpu"]) == {"model", "avx2", "avx512"}
    assert set(written["versions"]) == {"jax", "torch", "transformers", "moejax"}
    entries = written["benchmarks"]
    assert entries["ok"] == {"ratio": {"a": 1.5}, "seconds": entries["ok"]["seconds"],
                             "args": ["python", "benchmarks/ok.py", "--small"], "error": None}
    assert entries["boom"]["error"] == "RuntimeError: out of cheese" and entries["boom"]["ratio"] is None
    assert entries["silent"]["error"] == "exited 0 but wrote no --json file (silent.json)"
    assert entries["slow"]["error"].startswith("timed out after 3 s") and entries["slow"]["seconds"] < 30
    assert "FAILED: boom, silent, slow" in capsys.readouterr().out


def test_failure_lines():
    assert run_all.failure(0, ["done"], 10) is None
    assert run_all.failure(1, ["Traceback", "ValueError: x", ""], 10) == "ValueError: x"
    assert run_all.failure(-9, ["loading"], 10) == "killed by SIGKILL (out of memory?); last line: loading"
    assert run_all.failure(None, [], 10) == "timed out after 10 s; last line: (no output)"


def test_bad_flags_exit_2():
    for flags in (["--threshold", "0"], ["--only", "forward,nope"], ["--timeout", "-1"],
                  ["--out", "/no/such/folder/ratios.json"]):
        with pytest.raises(SystemExit) as stop:
            run_all.main(flags)
        assert stop.value.code == 2
