"""Ulysses backend vs the float64 reference on every rank: output, lse, dq, dk, dv; bytes moved.

K/V heads take one of three paths (see comm/ulysses.py): partitioned (Hkv % P == 0), replicated
(P % Hkv == 0: one K/V head per rank, dK/dV summed in fp32) and uneven (neither: one K/V head
per local query head). Every test names which it covers.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.ulysses import kv_heads_per_rank
from seqpar.kernels import attention_reference
from seqpar.layout import LAYOUTS
from seqpar.cost.traffic import kv_split, ulysses_volume
from tests.attention_cases import (AttnCase, check_lse_only_gradient, low_precision_case,
                                   odd_shapes, problem_of, run_case_and_count)
from tests.checks import assert_close

kv_path = kv_split  # (K/V heads per rank n, replicated?) as comm/ulysses.py documents them


def ulysses_bytes(case: AttnCase, ranks: int, return_lse: bool = True) -> tuple[int, int]:
    """The documented all-to-all traffic per rank (forward, backward) for `ranks` Ulysses ranks
    (`seqpar.cost.traffic.ulysses_volume`)."""
    fwd, bwd = ulysses_volume(problem_of(case, ranks, return_lse=return_lse), ranks)
    return fwd.bytes, bwd.bytes


def check_ulysses(case: AttnCase) -> dict:
    return run_case_and_count(case, ulysses_bytes)


HEADS = {1: [(8, 8), (8, 2)], 2: [(8, 8), (8, 2)], 3: [(6, 6), (6, 2)], 4: [(8, 8), (8, 2)]}


@pytest.mark.parametrize("variant", [0, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ulysses_fp32(worlds, world, layout, causal, variant):
    """GQA here: P=2 partitions 2 K/V heads, P=4 replicates them, P=3 (6:2) is uneven."""
    heads_q, heads_kv = HEADS[world][variant]
    case = AttnCase(backend="ulysses", layout=layout, causal=causal, heads_q=heads_q,
                    heads_kv=heads_kv, seq_local=12, head_dim=16,
                    lse_grad=(world + len(layout)) % 2 == 0)
    worlds(world).run(check_ulysses, case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_fp64_is_exact(worlds, world, layout):
    """12:6 heads: partitioned at P=2 and P=3, uneven at P=4; B=2."""
    case = AttnCase(backend="ulysses", layout=layout, dtype=torch.float64, heads_q=12,
                    heads_kv=6, seq_local=10, head_dim=8, batch=2)
    worlds(world).run(check_ulysses, case)


@pytest.mark.parametrize("case", [
    AttnCase(backend="ulysses", heads_q=8, heads_kv=1, dtype=torch.float64),    # MQA: replicated
    AttnCase(backend="ulysses", heads_q=12, heads_kv=3, dtype=torch.float64),   # uneven (G=4, m=3)
    AttnCase(backend="ulysses", heads_q=12, heads_kv=6, dtype=torch.float64,
             layout="striped", causal=False),                                   # uneven (G=2, m=3)
    AttnCase(backend="ulysses", heads_q=4, heads_kv=2, dtype=torch.float64,
             layout="contiguous"),                                              # replicated, G/m=2
], ids=str)
def test_ulysses_kv_heads_fewer_than_ranks(worlds, case):
    worlds(4).run(check_ulysses, case)


@pytest.mark.parametrize("case", odd_shapes("ulysses", heads_multiple=4), ids=str)
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_odd_shapes(worlds, world, case):
    worlds(world).run(check_ulysses, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_low_precision(worlds, world, layout, dtype):
    """8:2 heads: partitioned at P=2 (dK/dV travel in the input dtype), replicated at P=4."""
    worlds(world).run(check_ulysses, low_precision_case("ulysses", layout, dtype))


def without_lse(layout: str) -> None:
    """return_lse=False: no lse all-to-alls (bytes), output and gradients still exact."""
    world, rank = dist.get_world_size(), dist.get_rank()
    case = AttnCase(backend="ulysses", layout=layout, heads_q=8, heads_kv=2, seq_local=6,
                    dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, 6 * world, h, 16, generator=g, dtype=torch.float64)
                   for h in (8, 2, 2, 8))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, _ = attention_reference(*ref, causal=True)
    grads = torch.autograd.grad((o_ref * do).sum(), ref)
    local = [seqpar.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    with seqpar.comm_stats() as stats:
        o = seqpar.attention(*local, backend="ulysses", layout=layout)
        (o * seqpar.shard(do, layout=layout)).sum().backward()
    context = f"rank {rank}/{world} without lse:"
    assert_close("o", o, seqpar.shard(o_ref, layout=layout), 1e-10, context)
    for name, t, grad in zip(("dq", "dk", "dv"), local, grads):
        assert_close(name, t.grad, seqpar.shard(grad, layout=layout), 1e-10, context)
    assert (stats.sent("ulysses.fwd"), stats.sent("ulysses.bwd")) == ulysses_bytes(
        case, world, return_lse=False)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ulysses_without_lse_moves_no_lse(worlds, layout):
    worlds(4).run(without_lse, layout)


def test_ulysses_lse_only_gradient(worlds):
    worlds(2).run(check_lse_only_gradient, "ulysses", "striped")


@pytest.mark.parametrize("heads_q, heads_kv, ranks, expected", [
    (8, 8, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),    # MHA: a partition
    (8, 4, 2, [[0, 1], [2, 3]]),                    # Hkv % P == 0: a partition
    (8, 2, 4, [[0], [0], [1], [1]]),                # P % Hkv == 0: each K/V head to G/m ranks
    (8, 1, 4, [[0], [0], [0], [0]]),                # MQA: everywhere
    (12, 3, 4, [[0, 0, 0], [0, 1, 1], [1, 1, 2], [2, 2, 2]]),  # uneven: per query head
    (6, 2, 3, [[0, 0], [0, 1], [1, 1]]),            # uneven: per query head
])
def test_kv_heads_per_rank(heads_q, heads_kv, ranks, expected):
    assert kv_heads_per_rank(heads_q, heads_kv, ranks).tolist() == expected
