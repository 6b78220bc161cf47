"""moejax.parallel.hlo: collectives read from HLO text (each replica-group notation XLA prints, tuple results, async
pairs once) and the exchange formula's own arithmetic."""

from __future__ import annotations

import math

import pytest

from moejax.parallel.hlo import Collective, bytes_in_by_kind, collectives, device_share, exchange_bytes

HLO = """
ENTRY %main {
  %ag = f32[64,32]{1,0} all-gather(%p0), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[16,32]{1,0} reduce-scatter(%x), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %ar = f32[4,32,48]{2,1,0} all-reduce(%y), replica_groups=mesh['axis_0'=2,'axis_2'=4] {'axis_2'}, to_apply=%add
  %a2a = (s32[1,8,4]{2,1,0}, s32[1,8,4]{2,1,0}) all-to-all(%a, %b), replica_groups={{0,1}}
  %start = (bf16[8,16]{1,0}, bf16[32,16]{1,0}) all-gather-start(%z), replica_groups={{0,1,2,3}}, dimensions={0}
  %done = bf16[32,16]{1,0} all-gather-done(%start)
  %cp = f32[10]{0} collective-permute(%w), source_target_pairs={{0,1},{1,0}}
  %solo = f32[100]{0} all-reduce(%v), replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %dot = f32[64,64]{1,0} dot(%ag, %ag), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_collectives_are_read_with_their_groups():
    assert collectives(HLO) == [
        Collective("all-gather", 64 * 32 * 4, 4),
        Collective("reduce-scatter", 16 * 32 * 4, 4),
        Collective("all-reduce", 4 * 32 * 48 * 4, 4),
        Collective("all-to-all", 2 * 8 * 4 * 4, 2),
        Collective("all-gather", 32 * 16 * 2, 4),  # the result of the -start's (operand, result); -done not again
        Collective("collective-permute", 40, 2),
        Collective("all-reduce", 400, 1),
    ]


def test_bytes_into_each_device():
    found = bytes_in_by_kind(HLO)
    assert found["all-gather"] == 3 / 4 * 64 * 32 * 4 + 3 / 4 * 32 * 16 * 2
    assert found["reduce-scatter"] == 3 * 16 * 32 * 4  # (n - 1) shares of the reduced array
    assert found["all-reduce"] == 2 * 3 / 4 * 4 * 32 * 48 * 4  # the group of one moves nothing
    assert found["all-to-all"] == 1 / 2 * 2 * 8 * 4 * 4
    assert found["collective-permute"] == 40


def test_exchange_formula():
    n, t, d, k, s = 8, 100, 64, 4, 2
    row = 2 * d * s + 8 * k
    assert exchange_bytes("all_gather", n, t, d, k, s) == exchange_bytes("all_to_all", n, t, d, k, s) == 7 * t * row
    q = 1 - math.comb(32 - 4, k) / math.comb(32, k)
    assert device_share(32, n, k) == pytest.approx(q)
    assert exchange_bytes("ragged", n, t, d, k, s, experts=32) == pytest.approx(7 * t * q * row + 4 * 7)
    assert exchange_bytes("ragged", n, t, d, k, s, sent_rows=10) == 10 * row + 28
    assert device_share(64, 64, 1) == pytest.approx(1 / 64)  # one expert per device, top-1: that device alone
    with pytest.raises(ValueError, match="not all_gather, all_to_all or ragged"):
        exchange_bytes("gather", n, t, d, k, s)
