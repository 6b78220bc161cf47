"""Every benchmark in one run, each in a process of its own, into one JSON file of speed ratios; and the regression
guard: a comparison of two such files.

    python benchmarks/run_all.py --quick                     # every benchmark at a small size, into ratios.json
    python benchmarks/run_all.py --quick --out before.json   # the same, into a file of your choosing
    python benchmarks/run_all.py                             # each at its default size (hours on a 2-core CPU)
    python benchmarks/run_all.py --compare before.json after.json [--threshold 10]

Each benchmark runs as `python benchmarks/<script> <its arguments> --json <file>` with its output shown as it comes;
a benchmark that fails (an exception, a crash, out of memory, past --timeout) is recorded with the last line it
printed and the others still run; the exit status is then 1. XLA's persistent compilation cache is off in every
child ($JAX_COMPILATION_CACHE_DIR unset, $MOEJAX_COMPILATION_CACHE empty), so each run compiles as a first run does
and two files compare like with like.

The JSON file holds the date, the CPU (model name, AVX2 and AVX-512 flags), the versions of jax, torch, transformers
and moejax, whether it was --quick, and per benchmark: "ratio" (moejax's speed over the reference's measured in the
same run, > 1 = moejax faster; an object of named ratios when a benchmark measures several), "seconds" (its wall
time), "args" (the command that reproduces it) and "error" (null, or the last line it printed).

--compare prints per benchmark and ratio the old and the new value and the change, flags a ratio that fell by more
than --threshold percent, and says when the two files come from different CPUs, versions or sizes (a ratio moves
with the CPU: AVX2 against AVX-512). Exit status 1 when a ratio regressed past the threshold or a benchmark failed
in the new file. Ratios on a shared machine move by 10-25% from run to run (docs/performance.md): this is a guard to
run by hand, before and after a change, on an otherwise idle machine, not a timed test.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moejax.errors import DataError, MoejaxError

REPO = Path(__file__).resolve().parents[1]
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
QUIET = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # progress bars would bury the output and errors


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One script of benchmarks/, the arguments of its quick size, and what its process needs in its environment."""

    script: str
    quick: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


# Quick sizes: each measures the same thing as its default on a smaller input, chosen so the whole --quick run takes
# under 10 minutes on a 2-core CPU (docs/performance.md, "Regression guard").
BENCHMARKS = {
    "forward": Benchmark("bench_forward.py", ("--batch", "2", "--seq", "256", "--repeats", "2")),
    "generate": Benchmark("bench_generate.py", ("--batch", "4", "--prompt", "96", "--new", "16", "--repeats", "2")),
    "eval": Benchmark("bench_eval.py", ("--questions", "6", "--repeats", "1")),
    "analyze": Benchmark("bench_analyze.py", ("--tokens", "8000")),
    "train": Benchmark("bench_train.py", ("--batch", "1", "--seq", "128", "--steps", "2", "--warmup", "1")),
    "parity": Benchmark("bench_parity.py", ("--dtype", "float32", "--tokens", "512")),
    "load": Benchmark("bench_load.py", ("--repeats", "1")),
    "scale": Benchmark("bench_scale.py", ("--batch", "1", "--seq", "128", "--repeats", "1", "--skip-loads"),
                       env=EIGHT_DEVICES),
    "parity_floor": Benchmark("parity_floor.py", ("--arch", "qwen3_moe", "--dtype", "float32", "--seeds", "1",
                                                  "--tokens", "256", "--seq-len", "128", "--kinds",
                                                  "experts_all,router")),
}


def cpu(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and whether it has AVX2 and AVX-512 (from /proc/cpuinfo; null flags where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"model": platform.processor() or platform.machine(), "avx2": None, "avx512": None}
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.machine()), "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags}


def cpu_text(info: dict) -> str:
    vector = "AVX-512" if info.get("avx512") else "AVX2" if info.get("avx2") else "no AVX2"
    return f"{info.get('model')} ({vector})"


def versions() -> dict:
    """The versions the ratios depend on; null for a package not installed."""
    found = {}
    for name in ("jax", "torch", "transformers", "moejax"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_child(command: list[str], env: dict, timeout: float) -> tuple[int | None, list[str]]:
    """Runs `command`, echoing its output; returns its exit status (None past `timeout` s, when its process group is
    killed) and its last lines."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the benchmark and any process it started
        proc.wait()
        reader.join()
        return None, list(tail)
    reader.join()
    return proc.returncode, list(tail)


def failure(status: int | None, tail: list[str], timeout: float) -> str | None:
    """The error to record for a child's exit: None when it succeeded, else what went wrong and its last line."""
    last = next((line.strip() for line in reversed(tail) if line.strip()), "(no output)")
    if status is None:
        return f"timed out after {timeout:.0f} s; last line: {last}"
    if status < 0:
        return f"killed by {signal.Signals(-status).name} (out of memory?); last line: {last}"
    return None if status == 0 else last


def run_benchmark(name: str, bench: Benchmark, quick: bool, timeout: float, scratch: Path) -> dict:
    """One benchmark in a child process: its entry of the JSON file."""
    args = [f"benchmarks/{bench.script}", *(bench.quick if quick else ())]
    entry = {"ratio": None, "seconds": 0.0, "args": ["python", *args], "error": None}
    if bench.env:
        entry["env"] = bench.env
    out = scratch / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env |= {**bench.env, "MOEJAX_COMPILATION_CACHE": "", **QUIET}
    print(f"== {name}: {' '.join(entry['args'])}", flush=True)
    start = time.perf_counter()
    status, tail = run_child([sys.executable, str(REPO / args[0]), *args[1:], "--json", str(out)], env, timeout)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry["error"] = failure(status, tail, timeout)
    if out.exists():
        entry["ratio"] = json.loads(out.read_text()).get("ratios")
    elif entry["error"] is None:
        entry["error"] = f"exited 0 but wrote no --json file ({out.name})"
    print(f"-- {name}: {entry['seconds']:.0f} s, ratio {entry['ratio']}"
          + (f", FAILED: {entry['error']}" if entry["error"] else ""), flush=True)
    return entry


def run_all(names: list[str], quick: bool, out: Path, timeout: float) -> dict:
    """Runs the named benchmarks one after the other, rewriting `out` after each, and returns the report."""
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu(),
              "versions": versions(), "quick": quick, "seconds": 0.0, "benchmarks": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            report["benchmarks"][name] = run_benchmark(name, BENCHMARKS[name], quick, timeout, Path(scratch))
            report["seconds"] = round(time.perf_counter() - start, 1)
            out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_report(path: Path) -> dict:
    """A file run_all wrote, checked for what --compare reads."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give two files written by benchmarks/run_all.py --out") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a JSON file run_all wrote ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), dict):
        raise DataError(f'{path}: no "benchmarks" object; give a file written by benchmarks/run_all.py --out')
    for name, entry in report["benchmarks"].items():
        ratio = entry.get("ratio") if isinstance(entry, dict) else "not an object"
        values = ratio.values() if isinstance(ratio, dict) else [ratio]
        if not all(v is None or isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise DataError(f'{path}: benchmarks.{name}.ratio must be a number, null or an object of numbers, '
                            f"not {ratio!r}")
    return report


def named_ratios(entry: dict) -> dict[str, float]:
    """A benchmark's ratios by name ("-" for a single unnamed one)."""
    ratio = entry.get("ratio")
    if ratio is None:
        return {}
    return {k: v for k, v in ratio.items() if v is not None} if isinstance(ratio, dict) else {"-": ratio}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between the machines, versions and sizes of two reports: each makes the ratios move."""
    notes = []
    if old.get("cpu") != new.get("cpu"):
        notes.append(f"CPUs differ: OLD {cpu_text(old.get('cpu') or {})}, NEW {cpu_text(new.get('cpu') or {})}; "
                     "ratios move with the CPU (AVX2 against AVX-512): a change may be the machine's, not the code's")
    changed = [f"{k} {old.get('versions', {}).get(k)} -> {new.get('versions', {}).get(k)}"
               for k in sorted({*old.get("versions", {}), *new.get("versions", {})})
               if old.get("versions", {}).get(k) != new.get("versions", {}).get(k)]
    if changed:
        notes.append("versions differ: " + ", ".join(changed))
    if old.get("quick") != new.get("quick"):
        notes.append(f"sizes differ: OLD quick={old.get('quick')}, NEW quick={new.get('quick')}; ratios at different "
                     "sizes are not comparable")
    return notes


def compare(old: dict, new: dict, threshold: float) -> tuple[list[str], bool]:
    """The comparison table of two reports and whether it found a problem: a ratio fallen by more than `threshold`
    percent, or a benchmark that failed in `new`."""
    lines = [f"OLD {old.get('date')} {cpu_text(old.get('cpu') or {})}",
             f"NEW {new.get('date')} {cpu_text(new.get('cpu') or {})}"]
    lines += [f"note: {note}" for note in differences(old, new)]
    rows = [("benchmark", "ratio", "old", "new", "change", "")]
    bad = False
    old_b, new_b = old["benchmarks"], new["benchmarks"]
    for name in [*old_b, *(n for n in new_b if n not in old_b)]:
        before, after = old_b.get(name), new_b.get(name)
        if after is None:
            rows.append((name, "", "", "", "", "not in NEW"))
            continue
        if after.get("error"):
            bad = True
            rows.append((name, "", "", "", "", f"FAILED in NEW: {after['error']}"))
            continue
        if before is not None and before.get("args") != after.get("args"):
            rows.append((name, "", "", "", "", "arguments differ: " + " ".join(after.get("args") or [])))
        old_r = {} if before is None or before.get("error") else named_ratios(before)
        new_r = named_ratios(after)
        if not old_r and not new_r:
            rows.append((name, "", "", "", "", "no ratio"))
        why_none = "failed in OLD" if before is not None and before.get("error") else "not in OLD"
        for ratio in [*old_r, *(r for r in new_r if r not in old_r)]:
            o, n = old_r.get(ratio), new_r.get(ratio)
            if n is None:
                rows.append((name, ratio, f"{o:.3f}", "", "", "not in NEW"))
            elif o is None:
                rows.append((name, ratio, "", f"{n:.3f}", "", why_none))
            elif o <= 0:  # a difference of noisy times (generate's decode) can come out negative: no base to compare
                rows.append((name, ratio, f"{o:.3f}", f"{n:.3f}", "", "OLD ratio not positive: not compared"))
            else:
                change = 100 * (n / o - 1)
                regressed = change < -threshold
                bad |= regressed
                rows.append((name, ratio, f"{o:.3f}", f"{n:.3f}", f"{change:+.1f}%",
                             f"REGRESSED (more than {threshold:g}% lower)" if regressed else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [*(c.ljust(w) for c, w in zip(row[:2], widths[:2], strict=True)),
                 *(c.rjust(w) for c, w in zip(row[2:5], widths[2:], strict=True)), row[5]]
        lines.append("  ".join(cells).rstrip())
    lines.append("a ratio regressed or a benchmark failed: exit status 1" if bad
                 else f"no ratio fell by more than {threshold:g}%, no benchmark failed")
    return lines, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every benchmark at its small size (under 10 minutes)")
    parser.add_argument("--out", type=Path, default=Path("ratios.json"), help="the JSON file to write")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--timeout", type=float,
                        help="seconds one benchmark may run before it is stopped and recorded as failed "
                        "(default 900 with --quick, 7200 without)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="compare two files run_all wrote instead of running anything")
    parser.add_argument("--threshold", type=float, default=10.0,
                        help="percent a ratio may fall before --compare flags it (default 10)")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 100:
        parser.error(f"--threshold {args.threshold:g}: give a percentage between 0 and 100")
    if args.compare:
        try:
            lines, bad = compare(load_report(args.compare[0]), load_report(args.compare[1]), args.threshold)
        except MoejaxError as error:
            print(f"run_all: {error}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 1 if bad else 0
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only {args.only}: no benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout {args.timeout:g}: give a number of seconds above 0")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: no folder {args.out.parent}")
    timeout = args.timeout or (900.0 if args.quick else 7200.0)
    report = run_all(names, args.quick, args.out, timeout)
    failed = [n for n, e in report["benchmarks"].items() if e["error"]]
    print(f"wrote {args.out}: {len(names)} benchmarks in {report['seconds']:.0f} s on {cpu_text(report['cpu'])}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
