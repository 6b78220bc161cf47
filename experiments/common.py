"""What every study shares: the scale options (--mesh, --dtype), the seed, the output rule (a study writes OUT the
way the commands do: a new or its own earlier directory, replaced only when the study completes) and the error rule
(bad input: one line naming what and where, exit 2)."""

from __future__ import annotations

import argparse
import sys

from moejax.commands.options import MESH_HELP
from moejax.errors import MoejaxError

DTYPES = ("float32", "bfloat16", "auto")


def scale_options(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """--mesh and --dtype (passed to every load of the study), and --seed."""
    parser.add_argument("--mesh", metavar="AXIS=N,...", help=MESH_HELP)
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="parameter dtype of every model the study loads (auto: each checkpoint's own, e.g. "
                        "bfloat16 for a 30B model on a TPU slice); routing statistics are float32 either way")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of every sampled step (token pairs, "
                            "bootstrap resamples, splits); recorded in the summary")


def study_main(name: str, run, parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Parses the arguments and runs the study; a MoejaxError or an unreadable file ends it with one line, exit 2."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (MoejaxError, OSError) as e:
        print(f"experiments.{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
