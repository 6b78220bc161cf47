"""TPU slices: chips, HBM per chip and each chip's peak bfloat16 matmul rate (Google's published figures), what
`moejax plan` compares a plan with."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Topology:
    chips: int
    hbm_gib: float  # per chip
    peak_tflops: float  # per chip, dense bfloat16


_PEAK = {"v4": 275.0, "v5p": 459.0, "v5e": 197.0, "v6e": 918.0}
_SLICES = {"v4-8": (4, 32), "v4-16": (8, 32), "v4-32": (16, 32), "v4-64": (32, 32),
           "v5p-8": (4, 95), "v5p-16": (8, 95), "v5p-32": (16, 95),
           "v5e-4": (4, 16), "v5e-8": (8, 16), "v5e-16": (16, 16), "v5e-32": (32, 16), "v5e-64": (64, 16),
           "v6e-4": (4, 32), "v6e-8": (8, 32), "v6e-16": (16, 32)}
TOPOLOGIES = {name: Topology(chips, hbm, _PEAK[name.split("-")[0]]) for name, (chips, hbm) in _SLICES.items()}
