"""docs/studies.md's commands marked "tiny" run as written, from a directory outside the repository."""

from __future__ import annotations

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
    assert studies == {"experiments.multilingual_routing", "experiments.steering", "experiments.expert_selective"}


@pytest.mark.slow
@pytest.mark.parametrize("command", tiny_commands())
def test_tiny_command_runs(command, tmp_path):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / argv[argv.index("--out") + 1]
    assert (out / "summary.md").is_file()
