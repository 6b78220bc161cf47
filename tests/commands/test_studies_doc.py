"""docs/studies.md's commands marked "tiny" run as written, from a directory outside the repository, and each
study's run is checked for what its protocol records (the one run of each tiny command in the suite)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "studies.md"
BLOCK = re.compile(r"<!-- tiny -->\n```bash\n(.*?)```", re.S)


def tiny_commands() -> list[str]:
    return [line for block in BLOCK.findall(DOC.read_text()) for line in block.strip().splitlines()]


def test_every_study_has_a_tiny_command():
    studies = {shlex.split(c)[2] for c in tiny_commands()}
    assert studies == set(CHECKS)


def _multilingual_routing(out: Path) -> None:
    assert (out / "he-en" / "report.md").is_file()
    assert "seed 1" in (out / "summary.md").read_text()


def _steering(out: Path) -> None:
    """--mode hard --limit 3 --seed 1: the window derived from the divergence curves, hard promotion (eq. 5)."""
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["window_source"]["column"] in ("njsd", "njsd_pooled") and protocol["seed"] == 1
    first, last = map(int, protocol["window"].split("-"))
    assert 0 <= first <= last
    assert protocol["selected_share"]["promoted_min"] > 0.9
    summary = (out / "summary.md").read_text()
    assert "derived from the divergence" in summary and "eq. 5" in summary and "95%" in summary


def _expert_selective(out: Path) -> None:
    assert json.loads((out / ".moejax-output.json").read_text())["command"] == "expert-selective"
    assert (out / "seft").is_dir() and (out / "complete_layers").is_dir()


CHECKS = {"experiments.multilingual_routing": _multilingual_routing, "experiments.steering": _steering,
          "experiments.expert_selective": _expert_selective}


@pytest.mark.slow
@pytest.mark.parametrize("command", tiny_commands())
def test_tiny_command_runs(command, tmp_path):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / argv[argv.index("--out") + 1]
    assert (out / "summary.md").is_file()
    CHECKS[argv[2]](out)
