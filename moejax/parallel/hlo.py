"""Bytes that collectives move, read from a compiled program's HLO text, and the analytic bytes of one MoE layer's
token exchange under expert parallelism (docs/scaling.md has the table).

Per device and per collective, with n devices in its replica group and B the bytes of the whole (gathered,
unreduced) array, a ring or pairwise algorithm moves (n - 1) / n * B into each device for an all-gather, an
all-to-all and a reduce-scatter, and twice that for an all-reduce; a collective-permute moves its operand. A
ragged all-to-all moves only the rows it is told to at run time, so its HLO shape is an upper bound only.
"""

from __future__ import annotations

import dataclasses
import math
import re

_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                  "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_KINDS = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute", "ragged-all-to-all")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(sorted(_KINDS, key=len, reverse=True)) + r")(-start)?\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    result_bytes: int  # the whole result, every element of a tuple result
    group_size: int

    @property
    def bytes_in(self) -> float:
        """Bytes moved into each device (see the module docstring)."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind == "collective-permute":
            return float(self.result_bytes)
        if self.kind == "reduce-scatter":  # the result is one device's share of the reduced array
            return (n - 1) * self.result_bytes
        share = (n - 1) / n * self.result_bytes
        return 2 * share if self.kind == "all-reduce" else share


def _array_bytes(arrays: list[tuple[str, str]]) -> int:
    """Bytes of (dtype, "d0,d1,...") pairs as _ARRAY finds them."""
    return sum(_ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in arrays)


def _group_size(attributes: str) -> int:
    """From replica_groups as a list ({{0,1},{2,3}}), an iota ([2,2]<=[4]) or mesh axes (mesh['a'=2,'b'=4] {'b'})."""
    if (by_axes := _GROUPS_MESH.search(attributes)) is not None:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", by_axes.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", by_axes.group(2)))
    if (iota := _GROUPS_IOTA.search(attributes)) is not None:
        return int(iota.group(1).split(",")[-1])
    if (listed := _GROUPS_LIST.search(attributes)) is not None:
        return len(listed.group(1).split("},{")[0].strip("{}").split(","))
    if "source_target_pairs" in attributes:
        return 2
    return 1


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled program (`jax.jit(f).lower(...).compile().as_text()`), async pairs once."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None or "-done(" in line:
            continue
        result, kind, start, rest = match.groups()
        arrays = _ARRAY.findall(result)
        if start:  # an async pair's start: (operand, result) -> the result
            arrays = arrays[-1:]
        found.append(Collective(kind, _array_bytes(arrays), _group_size(rest)))
    return found


def bytes_in_by_kind(hlo_text: str) -> dict[str, float]:
    """Bytes moved into each device, summed per kind of collective."""
    totals: dict[str, float] = {}
    for c in collectives(hlo_text):
        if c.bytes_in:
            totals[c.kind] = totals.get(c.kind, 0.0) + c.bytes_in
    return totals


def device_share(experts: int, devices: int, top_k: int) -> float:
    """The chance that a token's top_k distinct experts, chosen uniformly among `experts` split evenly over
    `devices`, include one on a given device: 1 - C(E - E/n, k) / C(E, k)."""
    return 1.0 - math.comb(experts - experts // devices, top_k) / math.comb(experts, top_k)


def exchange_bytes(exchange: str, devices: int, tokens: int, hidden: int, top_k: int, element_bytes: int,
                   experts: int | None = None, sent_rows: float | None = None) -> float:
    """Bytes into each device for one MoE layer's token exchange over an expert axis of `devices`, `tokens` per
    device, activations of `element_bytes` (ids int32, weights float32).

    all_gather: the tokens, ids and weights of the other n - 1 devices arrive, and the reduce-scatter returns
    (n - 1) shares of outputs: (n - 1) * T * (2 * d * s + 8 * k).
    all_to_all over a dense all_to_all (XLA:CPU): every slot moves, the same (n - 1) * T * (2 * d * s + 8 * k) (the
    row counts are not needed there, and XLA drops their exchange).
    ragged: the rows sent to the other devices, each a token's activations, ids and weights out and its output back:
    sent_rows * (2 * d * s + 8 * k) + 4 * (n - 1); sent_rows defaults to its expectation under uniform routing,
    (n - 1) * T * device_share(E, n, k)."""
    n = devices
    row = 2 * hidden * element_bytes + 8 * top_k
    if exchange in ("all_gather", "all_to_all"):
        return (n - 1) * tokens * row
    if exchange == "ragged":
        if sent_rows is None:
            sent_rows = (n - 1) * tokens * device_share(experts, n, top_k)
        return sent_rows * row + 4 * (n - 1)
    raise ValueError(f"exchange {exchange!r} is not all_gather, all_to_all or ragged")
