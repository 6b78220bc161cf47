"""TPU VM helpers: create a TPU VM (or a queued resource), install moejax on every worker, run a command on
all workers, run `moejax analyze` or `moejax train` across a pod slice, delete. Each prints the gcloud
commands it runs; --dry-run prints them without running anything.

    python tpu/launch.py create --name moejax-v5p --zone us-east5-a --type v5p-8 --dry-run
    python tpu/launch.py install --name moejax-v5p --zone us-east5-a
    python tpu/launch.py analyze --name moejax-v5p --zone us-east5-a -- --model base=/data/Qwen3-30B-A3B \\
        --langs he,en --data /data/flores200_dataset/dev --mesh expert=4 --out /data/results/he-en
    python tpu/launch.py train --name moejax-v5p32 --zone us-east5-a -- --model /data/Qwen3-30B-A3B \\
        --data he=/data/he.jsonl:0.6,en=/data/en.jsonl:0.4 --mesh fsdp=2,expert=8 --out /data/runs/he-cpt
    python tpu/launch.py run --name moejax-v5p --zone us-east5-a -- moejax plan --model qwen3-30b-a3b --topology v5p-8
    python tpu/launch.py delete --name moejax-v5p --zone us-east5-a

Commands run on all workers at once (`--worker=all`) with MOEJAX_DISTRIBUTED=1, so each process calls
jax.distributed.initialize() and the workers' chips form one mesh; every worker must see the same model
and data paths (a shared disk, or the same files copied to each).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# The TPU VM software version for each generation (gcloud --version).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite",
            "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "moejax"
JAX_TPU = "jax[tpu]==0.10.2"
ROOT = Path(__file__).resolve().parent.parent


def runtime(accelerator_type: str) -> str:
    generation = accelerator_type.split("-")[0]
    if generation not in RUNTIMES:
        raise SystemExit(f"unknown TPU type {accelerator_type!r}: expected one of {sorted(RUNTIMES)}-N "
                         "(e.g. v5p-8), or pass --version")
    return RUNTIMES[generation]


def gcloud_base(args) -> list[str]:
    return ["gcloud", "compute", "tpus"] + ([f"--project={args.project}"] if args.project else [])


def on_all_workers(args, command: str) -> list[str]:
    return [*gcloud_base(args), "tpu-vm", "ssh", args.name, f"--zone={args.zone}", "--worker=all",
            f"--command={command}"]


def commands(args) -> list[list[str]]:
    """The gcloud command lines for one action."""
    if args.action == "create":
        version = args.version or runtime(args.type)
        if args.queued:
            return [[*gcloud_base(args), "queued-resources", "create", args.name, f"--node-id={args.name}",
                     f"--zone={args.zone}", f"--accelerator-type={args.type}", f"--runtime-version={version}",
                     *(["--spot"] if args.spot else [])]]
        return [[*gcloud_base(args), "tpu-vm", "create", args.name, f"--zone={args.zone}",
                 f"--accelerator-type={args.type}", f"--version={version}", *(["--spot"] if args.spot else [])]]
    if args.action == "install":
        copy = [*gcloud_base(args), "tpu-vm", "scp", "--recurse", str(ROOT), f"{args.name}:~/{REMOTE_DIR}",
                f"--zone={args.zone}", "--worker=all"]
        setup = (f"python3 -m pip install -U pip && python3 -m pip install '{JAX_TPU}' "
                 f"-f https://storage.googleapis.com/jax-releases/libtpu_releases.html && "
                 f"python3 -m pip install -e ~/{REMOTE_DIR}")
        return [copy, on_all_workers(args, setup)]
    if args.action in ("run", "analyze", "train"):
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if args.action != "run":
            command = ["moejax", args.action, *command]
        if not command:
            raise SystemExit("nothing to run: give the command after --")
        return [on_all_workers(args, f"cd ~/{REMOTE_DIR} && MOEJAX_DISTRIBUTED=1 {shlex.join(command)}")]
    if args.action == "delete":
        return [[*gcloud_base(args), "tpu-vm", "delete", args.name, f"--zone={args.zone}", "--quiet"]]
    raise SystemExit(f"unknown action {args.action}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", required=True)
    for name, text in (("create", "create a TPU VM (or, with --queued, a queued resource)"),
                       ("install", "copy this checkout to every worker and install moejax with jax[tpu]"),
                       ("run", "run a command (after --) on every worker, in the moejax checkout"),
                       ("analyze", "run `moejax analyze` (its arguments after --) on every worker"),
                       ("train", "run `moejax train` (its arguments after --) on every worker"),
                       ("delete", "delete the TPU VM")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--name", required=True, help="TPU VM name")
        p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-west4-a (v5e)")
        p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
        if name == "create":
            p.add_argument("--type", required=True, help="accelerator type, e.g. v5p-8, v4-32, v5litepod-64")
            p.add_argument("--version", help="TPU software version (default by generation: "
                           + ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
            p.add_argument("--queued", action="store_true", help="request it as a queued resource")
            p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
        if name in ("run", "analyze", "train"):
            p.add_argument("command", nargs=argparse.REMAINDER, help="what to run, after --")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for line in commands(args):
        print(shlex.join(line), flush=True)
        if args.dry_run:
            continue
        if shutil.which("gcloud") is None:
            print("error: gcloud is not installed (https://cloud.google.com/sdk/docs/install); use --dry-run to "
                  "see the commands", file=sys.stderr)
            return 2
        code = subprocess.run(line).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
