"""tpu/launch.py prints the gcloud commands a TPU VM user needs (checked with --dry-run: nothing runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[2] / "tpu" / "launch.py"


def dry_run(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(LAUNCH), *args, "--dry-run"] if "--" not in args else
                            [sys.executable, str(LAUNCH), *args[:args.index("--")], "--dry-run",
                             *args[args.index("--"):]], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()


def test_create_picks_the_runtime_and_queued_resources():
    assert dry_run("create", "--name", "vm", "--zone", "us-east5-a", "--type", "v5p-8") == [
        "gcloud compute tpus tpu-vm create vm --zone=us-east5-a --accelerator-type=v5p-8 --version=v2-alpha-tpuv5"]
    queued = dry_run("create", "--name", "vm", "--zone", "us-west4-a", "--type", "v5litepod-64", "--queued",
                     "--spot", "--project", "p")
    assert queued == ["gcloud compute tpus --project=p queued-resources create vm --node-id=vm --zone=us-west4-a "
                      "--accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot"]


def test_install_copies_and_installs_on_every_worker():
    copy, install = dry_run("install", "--name", "vm", "--zone", "z")
    assert copy.startswith("gcloud compute tpus tpu-vm scp --recurse ")
    assert copy.endswith("'vm:~/moejax' --zone=z --worker=all")
    assert "--worker=all" in install and "jax[tpu]==0.10.2" in install and "pip install -e ~/moejax" in install


def test_run_and_analyze_on_all_workers_distributed():
    (line,) = dry_run("analyze", "--name", "vm", "--zone", "z", "--", "--model", "/d/m", "--mesh", "expert=4")
    assert line == ("gcloud compute tpus tpu-vm ssh vm --zone=z --worker=all '--command=cd ~/moejax && "
                    "MOEJAX_DISTRIBUTED=1 moejax analyze --model /d/m --mesh expert=4'")
    (line,) = dry_run("run", "--name", "vm", "--zone", "z", "--", "moejax", "plan", "--model", "qwen3-30b-a3b",
                      "--topology", "v5p-8")
    assert "MOEJAX_DISTRIBUTED=1 moejax plan --model qwen3-30b-a3b --topology v5p-8" in line
    assert dry_run("delete", "--name", "vm", "--zone", "z") == [
        "gcloud compute tpus tpu-vm delete vm --zone=z --quiet"]


def test_train_on_all_workers_distributed():
    """The arguments after -- go to `moejax train` verbatim, quoted for the remote shell."""
    (line,) = dry_run("train", "--name", "vm", "--zone", "z", "--project", "p", "--", "--model", "/d/m", "--data",
                      "he=/d/he.jsonl:0.6,en=/d/en.jsonl:0.4", "--out", "/d/run one", "--mesh", "expert=4",
                      "--steps", "100")
    assert line == ("gcloud compute tpus --project=p tpu-vm ssh vm --zone=z --worker=all '--command=cd ~/moejax && "
                    "MOEJAX_DISTRIBUTED=1 moejax train --model /d/m --data he=/d/he.jsonl:0.6,en=/d/en.jsonl:0.4 "
                    "--out '\"'\"'/d/run one'\"'\"' --mesh expert=4 --steps 100'")


def test_unknown_type_is_refused():
    result = subprocess.run([sys.executable, str(LAUNCH), "create", "--name", "vm", "--zone", "z", "--type", "v9-8",
                             "--dry-run"], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown TPU type 'v9-8'" in result.stderr


@pytest.mark.parametrize("action", ["create", "install", "run", "analyze", "train", "delete"])
def test_help(action):
    out = subprocess.run([sys.executable, str(LAUNCH), action, "--help"], capture_output=True, text=True).stdout
    assert "--dry-run" in out and "--zone" in out
