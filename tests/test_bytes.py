"""Bytes each backend hands to torch.distributed, per peer, against numbers derived by hand.

`comm_stats` counts what is passed to torch.distributed (tensor sizes, per peer: see
comm/primitives.py); the expectations below are worked out here from each algorithm's
description (DESIGN §4 and the backend docstrings), not taken from `seqpar.cost.traffic`, so the
library's formulas are not on both sides of the comparison.

One problem for all: P = 4 ranks, B = 1, S_loc = 8 tokens per rank, Hq = 4, Hkv = 2, D = 16,
fp32 (4 bytes; gradient accumulators fp32 too), causal, zigzag. A K/V block of one rank
(K and V) is 2 * 8 * 2 * 16 * 4 = 2048 bytes.
"""

from __future__ import annotations

import pytest
import torch

import seqpar

P, S_LOC, HQ, HKV, D = 4, 8, 4, 2, 16


def traffic_per_peer(backend: str, ulysses: int | None) -> dict[str, dict[int, int]]:
    group = seqpar.SPMesh(ulysses=ulysses) if ulysses else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (seqpar.shard(torch.randn(1, S_LOC * P, h, D, generator=g), layout="zigzag")
               .requires_grad_() for h in (HQ, HKV, HKV))
    with seqpar.comm_stats() as stats:
        seqpar.attention(q, k, v, group, backend=backend, layout="zigzag").sum().backward()
    return {op: {"sent": t.sent_to, "received": t.received_from} for op, t in stats.ops.items()
            if op != "agree"}


def expect_from(rank: int, **per_op) -> dict:
    """per_op: op -> ({peer offset: bytes sent}, {peer offset: bytes received})."""
    return {op.replace("__", "."): {"sent": {(rank + o) % P: n for o, n in sent.items()},
                                   "received": {(rank + o) % P: n for o, n in received.items()}}
            for op, (sent, received) in per_op.items()}


def test_ring_bytes_per_peer(worlds):
    # forward: the K/V block hops to r + 1, P - 1 times: 3 * 2048, and 3 blocks arrive from r - 1.
    # backward: K/V again (3 hops) plus the fp32 dK/dV accumulators of each block, P hops home:
    # 3 * 2048 + 4 * 2048 = 14336 to r + 1.
    for rank, got in enumerate(worlds(P).run(traffic_per_peer, "ring", None)):
        assert got == expect_from(rank, ring__fwd=({1: 6144}, {-1: 6144}),
                                  ring__bwd=({1: 14336}, {-1: 14336})), (rank, got)


def test_allgather_bytes_per_peer(worlds):
    # forward: this rank's K and V (2048) to each other rank, theirs back; backward: the fp32
    # dK, dV rows of each other rank's tokens (2048) into its reduce-scatter, 2048 from each.
    each = {1: 2048, 2: 2048, 3: 2048}
    for rank, got in enumerate(worlds(P).run(traffic_per_peer, "allgather", None)):
        assert got == expect_from(rank, allgather__fwd=(each, each),
                                  allgather__bwd=(each, each)), (rank, got)


def test_ulysses_bytes_per_peer(worlds):
    # U = 4 ranks, m = Hq / U = 1 query head each; Hkv = 2 < U: every rank gets one (replicated)
    # K/V head. To each other rank, forward: its query head of my 8 tokens 8 * 1 * 16 * 4 = 512,
    # K and V of its K/V head 2 * 512 = 1024, and its output rows back 512: 2048. Backward: dO
    # 512, dQ 512, dK + dV of the replicated head in fp32 1024: 2048.
    each = {1: 2048, 2: 2048, 3: 2048}
    for rank, got in enumerate(worlds(P).run(traffic_per_peer, "ulysses", None)):
        assert got == expect_from(rank, ulysses__fwd__all_to_all=(each, each),
                                  ulysses__bwd__all_to_all=(each, each)), (rank, got)


def test_usp_bytes_per_peer(worlds):
    # U = 2 (ranks {0, 1}, {2, 3}), R = 2 (rings {0, 2}, {1, 3}). All-to-all with the Ulysses
    # partner: m = 2 query heads, n = 1 K/V head (a partition): q 8 * 2 * 16 * 4 = 1024, K + V
    # 1024, o 1024 forward; dO 1024, dQ 1024, dK + dV 1024 backward. Ring with the other group:
    # a head-sharded K/V block holds U * S_loc = 16 tokens of 1 head: 2 * 16 * 16 * 4 = 2048,
    # one hop forward; backward one K/V hop plus the fp32 dK/dV of each of the 2 blocks, 2048
    # each: 6144.
    for rank, got in enumerate(worlds(P).run(traffic_per_peer, "usp", 2)):
        partner = 1 if rank % 2 == 0 else -1
        assert got == expect_from(rank, usp__fwd__all_to_all=({partner: 3072}, {partner: 3072}),
                                  usp__bwd__all_to_all=({partner: 3072}, {partner: 3072}),
                                  usp__fwd__ring=({2: 2048}, {2: 2048}),
                                  usp__bwd__ring=({2: 6144}, {2: 6144})), (rank, got)


def lasp2_traffic_per_peer(layout: str) -> dict[str, dict[int, int]]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (seqpar.shard(torch.randn(1, S_LOC * P, 2, d, generator=g), layout=layout)
               .requires_grad_() for d in (8, 8, 12))
    with seqpar.comm_stats() as stats:
        seqpar.linear_attention(q, k, v, layout=layout).sum().backward()
    return {op: {"sent": t.sent_to, "received": t.received_from} for op, t in stats.ops.items()
            if op != "agree"}


@pytest.mark.parametrize("layout, chunks", [("contiguous", 1), ("zigzag", 2)])
def test_lasp2_bytes_per_peer(worlds, layout, chunks):
    # H = 2 heads, Dk = 8, Dv = 12: one fp32 state is 2 * 8 * 12 * 4 = 768 bytes. Forward: the
    # state of each local chunk to every other rank (all-gather); backward: the same for dO's
    # state. Nothing depends on the sequence length.
    each = {o: 768 * chunks for o in (1, 2, 3)}
    for rank, got in enumerate(worlds(P).run(lasp2_traffic_per_peer, layout)):
        assert got == expect_from(rank, lasp2__fwd=(each, each), lasp2__bwd=(each, each)), \
            (rank, got)


def all_reduce_per_peer() -> dict[int, int]:
    from seqpar.comm.primitives import Traffic, resolve_group, start_all_reduce
    with seqpar.comm_stats() as stats:
        start_all_reduce(torch.zeros(10, dtype=torch.float64), resolve_group(None),
                         Traffic.now("sum")).wait()
    return stats.ops["sum"].sent_to


def test_all_reduce_is_recorded_as_its_decomposition(worlds):
    # 80 bytes in 4 shards of 20: a reduce-scatter and an all-gather, 2 shards with each peer.
    for rank, got in enumerate(worlds(P).run(all_reduce_per_peer)):
        assert got == {p: 40 for p in range(P) if p != rank}

