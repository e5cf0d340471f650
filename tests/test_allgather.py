"""All-gather K/V backend vs the float64 reference on every rank: output, lse, dq, dk, dv; bytes
moved; and the plan computes only the keys a causal query block can see."""

from __future__ import annotations

import pytest
import torch

from seqpar.comm.allgather import AllGatherPlan
from seqpar.comm.primitives import GroupInfo
from seqpar.kernels.dispatch import KERNELS
from seqpar.kernels.mask import MaskKind, causal_pairs, gathered_runs, runs_to_positions
from seqpar.layout import LAYOUTS, all_local_runs
from seqpar.cost.traffic import allgather_volume
from tests.attention_cases import (AttnCase, check_lse_only_gradient, low_precision_case,
                                   odd_shapes, problem_of, run_case_and_count)


def allgather_bytes(case: AttnCase, world: int) -> tuple[int, int]:
    """The documented traffic (`seqpar.cost.traffic.allgather_volume`): all-gather of K and V
    forward, reduce-scatter of the fp32 (fp64) dK and dV backward, (P - 1) local blocks each."""
    fwd, bwd = allgather_volume(problem_of(case, world))
    return fwd.bytes, bwd.bytes


def check_allgather(case: AttnCase) -> dict:
    return run_case_and_count(case, allgather_bytes)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa8:2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_allgather_fp32(worlds, world, layout, causal, heads):
    case = AttnCase(backend="allgather", layout=layout, causal=causal, heads_q=heads[0],
                    heads_kv=heads[1], seq_local=12, head_dim=16,
                    lse_grad=(world + len(layout)) % 2 == 0)
    worlds(world).run(check_allgather, case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_allgather_fp64_is_exact(worlds, world, layout):
    case = AttnCase(backend="allgather", layout=layout, dtype=torch.float64, heads_q=6,
                    heads_kv=3, seq_local=10, head_dim=8, batch=2)
    worlds(world).run(check_allgather, case)


@pytest.mark.parametrize("case", odd_shapes("allgather"), ids=str)
@pytest.mark.parametrize("world", [2, 4])
def test_allgather_odd_shapes(worlds, world, case):
    worlds(world).run(check_allgather, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 4])
def test_allgather_low_precision(worlds, world, layout, dtype):
    worlds(world).run(check_allgather, low_precision_case("allgather", layout, dtype))


def test_allgather_lse_only_gradient(worlds):
    worlds(2).run(check_lse_only_gradient, "allgather", "zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_causal_plan_touches_only_visible_keys(world, layout):
    """Every kept (query, key) product is computed exactly once, no sub-block reaches past the
    last key its queries can see, and none needs an explicit position mask (all run fused)."""
    seq = 2 * world * 6
    all_runs = all_local_runs(seq, world, layout)
    key_pos = runs_to_positions(gathered_runs(all_runs, interleave=False))
    assert sorted(key_pos.tolist()) == list(range(seq))
    for rank in range(world):
        plan = AllGatherPlan.build(GroupInfo(None, rank, world), all_runs, True, 1.0,
                                   KERNELS["flash"], ())
        q_pos = runs_to_positions(all_runs[rank])
        visible = int((q_pos[:, None] >= key_pos[None, :]).sum())
        assert causal_pairs(plan.blocks) == visible
        for block in plan.blocks:
            assert block.kind is not MaskKind.POSITIONS
            assert key_pos[block.k1 - 1] <= q_pos[block.q0:block.q1].max(), block
        assert len(plan.blocks) <= 2 * world
