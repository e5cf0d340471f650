"""Ring P2P attention (Ring Self-Attention / ring attention) over a sequence-parallel group.

P ranks, rank r holds queries Q_r and keys/values K_r, V_r of its tokens (any layout).

Forward, P steps. At step t rank r holds the K/V block of rank (r - t) mod P; it computes the
partial (o, lse) of Q_r against that block under the causal rule of the *global* positions of
both (`kernels.mask.plan_blocks`; blocks no query can see are skipped), merges it into fp32
accumulators, and meanwhile sends the block to r + 1 and receives the next from r - 1:

    o, lse = merge over t of attend(Q_r, K_(r-t), V_(r-t))        (merge: kernels/merge.py)

Backward, P steps, with the final (o, lse) so every block's gradient is exact on its own:
dQ_r accumulates locally; the fp32 accumulators dK, dV of a block travel with it — at each
step a rank adds its contribution and passes them on — and arrive home after P hops.

Traffic per rank (K/V itemsize b, fp32 gradient accumulators), with only the Hkv heads moving:
    forward   (P - 1) * 2 * B * S_loc * Hkv * D * b
    backward  (P - 1) * 2 * B * S_loc * Hkv * D * b  +  P * 2 * B * S_loc * Hkv * D * 4

Each transfer is posted before the compute of the current block and waited for after it, so
communication overlaps computation. With the zigzag layout every rank does the same number of
(query, key) products at every step, so no rank waits for another.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.mask import Runs, SubBlock, plan_blocks
from ..kernels.plan import PlanKernel, accumulator_dtype
from .primitives import CommStats, GroupInfo, RingExchange, Traffic


@dataclass(frozen=True)
class RingPlan:
    """Everything non-tensor a ring call needs; lives on ctx between forward and backward.

    kv_runs[p] are the global positions of the K/V block ring rank p holds; q_runs those of
    this rank's queries. step_blocks[t] is the kernel plan for the block seen at step t.
    Traffic is recorded under "<op>.fwd<op_suffix>" / "<op>.bwd<op_suffix>": "ring.fwd" for the
    ring backend, "usp.fwd.ring" for the ring part inside USP (so "usp.fwd" counts both parts).
    """

    info: GroupInfo
    q_runs: Runs
    kv_runs: tuple[Runs, ...]
    causal: bool
    scale: float
    kernel: PlanKernel
    recorders: tuple[CommStats, ...]
    step_blocks: tuple[tuple[SubBlock, ...], ...]
    op: str = "ring"
    op_suffix: str = ""

    @classmethod
    def build(cls, info: GroupInfo, q_runs: Runs, kv_runs: tuple[Runs, ...], causal: bool,
              scale: float, kernel: PlanKernel, recorders: tuple[CommStats, ...],
              op: str = "ring", op_suffix: str = "") -> "RingPlan":
        steps = tuple(plan_blocks(q_runs, kv_runs[(info.rank - t) % info.world], causal)
                      for t in range(info.world))
        return cls(info, q_runs, kv_runs, causal, scale, kernel, recorders, steps, op, op_suffix)

    def traffic(self, direction: str) -> Traffic:
        return Traffic.now(f"{self.op}.{direction}{self.op_suffix}", self.recorders)

    # The attention a Ulysses / USP plan runs on its head-sharded tensors (see ulysses.py).
    def fwd(self, q, k, v):
        return ring_fwd(q, k, v, self)

    def bwd(self, do, q, k, v, o, lse, dlse):
        return ring_bwd(do, q, k, v, o, lse, dlse, self)


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One contiguous buffer (one message per hop) holding equally shaped tensors."""
    return torch.stack(tensors)


def ring_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) in the accumulator dtype (fp32; fp64 for fp64 inputs)."""
    world = plan.info.world
    if world == 1:
        return plan.kernel.fwd(q, k, v, plan.step_blocks[0], plan.scale)
    kv = _pack(k, v)
    ring = RingExchange(plan.info, plan.traffic("fwd"))
    for step in range(world):
        if step + 1 < world:
            ring.start([kv])  # the next block travels while this one is computed
        if step == 0:  # our own block: fresh accumulators, nothing to merge yet
            o, lse = plan.kernel.fwd(q, kv[0], kv[1], plan.step_blocks[0], plan.scale)
        else:
            plan.kernel.fwd_into(o, lse, q, kv[0], kv[1], plan.step_blocks[step], plan.scale)
        if step + 1 < world:
            kv = ring.wait()[0]
    return o, lse


def ring_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, plan: RingPlan
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulator dtype. o/lse: the forward's final output and lse."""
    world = plan.info.world
    if world == 1:
        return plan.kernel.bwd(do, q, k, v, o, lse, dlse, plan.step_blocks[0], plan.scale)
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dkv_local = torch.zeros((2,) + tuple(k.shape), dtype=acc_dtype, device=q.device)
    traffic = plan.traffic("bwd")
    kv_ring, dkv_ring = RingExchange(plan.info, traffic), RingExchange(plan.info, traffic)
    kv = _pack(k, v)
    for step in range(world):
        if step + 1 < world:
            kv_ring.start([kv])
        if step > 0:
            dkv_local.zero_()
        plan.kernel.bwd_into(dq, dkv_local[0], dkv_local[1], do, q, kv[0], kv[1], o, lse, dlse,
                             plan.step_blocks[step], plan.scale)
        if step == 0:
            # This block's accumulator starts as our contribution; keep a fresh scratch.
            dkv_travelling, dkv_local = dkv_local, torch.empty_like(dkv_local)
        else:
            # The accumulator of the block we just used arrives from r - 1; add and pass on.
            dkv_travelling = dkv_ring.wait()[0]
            dkv_travelling += dkv_local
        dkv_ring.start([dkv_travelling])
        if step + 1 < world:
            kv = kv_ring.wait()[0]
    dkv_home = dkv_ring.wait()[0]
    return dq, dkv_home[0], dkv_home[1]


def finish_forward(ctx, q, k, v, plan, o: torch.Tensor, lse: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The common end of an attention Function's forward: o in the input dtype, lse as
    accumulated; keeps what the backward needs (inputs, final o and lse, the plan)."""
    o = o.to(q.dtype, memory_format=torch.contiguous_format)  # the kernel's may be strided
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.plan = plan
    ctx.set_materialize_grads(False)
    return o, lse


def run_backward(ctx, do, dlse, backward: Callable) -> tuple:
    """The common backward of an attention Function: `backward(do, q, k, v, o, lse, dlse,
    plan)` gives (dq, dk, dv) in the accumulator dtype; they return in the input dtypes."""
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:  # only lse was used downstream
        do = torch.zeros_like(o)
    # Traffic is recorded by the comm_stats blocks active now and those of the forward.
    dq, dk, dv = backward(do, q, k, v, o, lse, dlse, ctx.plan)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class RingAttention(torch.autograd.Function):
    """Autograd wrapper: forward `ring_fwd`, backward `ring_bwd`; returns (o, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        return finish_forward(ctx, q, k, v, plan, *ring_fwd(q, k, v, plan))

    @staticmethod
    def backward(ctx, do, dlse):
        return run_backward(ctx, do, dlse, ring_bwd)
