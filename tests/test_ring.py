"""Ring backend vs the float64 reference on every rank: output, lse, dq, dk, dv."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.layout import LAYOUTS
from seqpar.cost.traffic import ring_volume
from tests.attention_cases import (AttnCase, check_lse_only_gradient, fp32_grid,
                                   low_precision_grid, odd_shape_grid, problem_of, run_case,
                                   run_case_and_count)


def ring_bytes(case: AttnCase, world: int) -> tuple[int, int]:
    """The documented traffic formula (`seqpar.cost.traffic.ring_volume`): K/V hops forward;
    K/V hops + fp32 dK/dV hops backward."""
    fwd, bwd = ring_volume(problem_of(case, world))
    return fwd.bytes, bwd.bytes


def check_ring(case: AttnCase) -> dict:
    return run_case_and_count(case, ring_bytes)


@pytest.mark.parametrize("world,case", fp32_grid("ring"))
def test_ring_fp32(worlds, world, case):
    worlds(world).run(check_ring, case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_fp64_is_exact(worlds, world, layout):
    """In float64 the ring must agree with the reference to ~1e-10: any algorithmic slip shows."""
    case = AttnCase(layout=layout, dtype=torch.float64, heads_q=6, heads_kv=3, seq_local=10,
                    head_dim=8, batch=2)
    worlds(world).run(check_ring, case)


@pytest.mark.parametrize("world,case", odd_shape_grid("ring"))
def test_ring_odd_shapes(worlds, world, case):
    worlds(world).run(check_ring, case)


@pytest.mark.parametrize("world,case", low_precision_grid("ring"))
def test_ring_low_precision(worlds, world, case):
    worlds(world).run(check_ring, case)


def wrong_result_is_caught() -> bool:
    """The comparison must fail on a slightly wrong result (5% off in scale)."""
    case = AttnCase(layout="zigzag", seq_local=8)
    run_case(case)  # the right one passes
    try:
        run_case(AttnCase(layout="zigzag", seq_local=8, scale=0.25 * 1.05), reference_scale=0.25)
    except AssertionError:
        return True
    return False


def test_comparison_rejects_a_wrong_result(worlds):
    assert worlds(2).run(wrong_result_is_caught) == [True, True]


def traffic_when_only_backward_is_counted() -> int:
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    o = seqpar.attention(q, q, q, layout="contiguous")
    with seqpar.comm_stats() as stats:
        o.sum().backward()
    return stats.sent("ring.bwd")


def test_backward_traffic_counted_where_backward_runs(worlds):
    sent = worlds(2).run(traffic_when_only_backward_is_counted)
    kv = 2 * 8 * 2 * 8 * 4
    assert sent == [kv + 2 * kv] * 2  # one K/V hop + two fp32 dK/dV hops


def check_ring_with_subgroup() -> None:
    """A ring over a subgroup (ranks {1, 2} of 4) uses group-local ranks and global peers."""
    sub = dist.new_group([1, 2])
    if dist.get_rank() in (1, 2):
        run_case(AttnCase(layout="zigzag", heads_q=4, heads_kv=2), group=sub)
    dist.barrier()


def test_ring_on_a_subgroup(worlds):
    worlds(4).run(check_ring_with_subgroup)


def test_ring_lse_only_gradient(worlds):
    worlds(2).run(check_lse_only_gradient, "ring", "striped")
