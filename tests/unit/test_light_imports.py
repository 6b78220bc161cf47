"""`import moejax`, `import moejax.cli` and `moejax --help` (and every command's --help) load none of PyTorch,
transformers, TensorBoard and JAX: a flag is parsed and checked in a moment (moejax.cli.main imports JAX once the
flags are good), and without the test or eval extras installed. The PyTorch reference helpers import torch at module
level, so torch absent also means they were not imported.

Each case runs in a fresh interpreter, so that what other tests imported cannot hide an import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "tensorboardX", "jax")
HELP = """
import contextlib, io
import moejax.cli
with contextlib.redirect_stdout(io.StringIO()):
    for argv in {argvs}:
        try:
            assert moejax.cli.main(argv) == 0, argv
        except SystemExit as e:  # main returns argparse's status; a SystemExit would be as good
            assert not e.code, argv
"""
CASES = {
    "import moejax": "import moejax",
    "import moejax.cli": "import moejax, moejax.cli",
    "moejax --help": HELP.format(argvs=[["--help"]]),
    "moejax COMMAND --help": HELP.format(argvs="[[name, '--help'] for name in moejax.cli.SETTINGS]"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_command_line_imports_no_heavy_package(case):
    probe = CASES[case] + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", f"{case} imported {done.stdout.splitlines()[-1]}"
