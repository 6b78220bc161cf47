"""TPU slices: chips and HBM per chip, what `moejax plan` compares a plan with."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Topology:
    chips: int
    hbm_gib: float  # per chip


TOPOLOGIES = {
    "v4-8": Topology(4, 32), "v4-16": Topology(8, 32), "v4-32": Topology(16, 32), "v4-64": Topology(32, 32),
    "v5p-8": Topology(4, 95), "v5p-16": Topology(8, 95), "v5p-32": Topology(16, 95),
    "v5e-4": Topology(4, 16), "v5e-8": Topology(8, 16), "v5e-16": Topology(16, 16), "v5e-32": Topology(32, 16),
    "v5e-64": Topology(64, 16), "v6e-4": Topology(4, 32), "v6e-8": Topology(8, 32), "v6e-16": Topology(16, 32),
}
