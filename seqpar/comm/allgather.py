"""All-gather K/V attention (LASP-2H for the softmax layers of hybrid models; Llama-3 style CP).

P ranks, rank r holds Q_r, K_r, V_r of its tokens (any layout).

Forward: one all-gather of the packed (K, V) of every rank -- only the Hkv heads travel -- then
the local queries attend to the whole sequence under the causal rule of global positions:

    K, V = all_gather(K_r, V_r)                       [B, S, Hkv, D] each, laid out as below
    o_r, lse_r = attend(Q_r, K, V)                    one local kernel plan

The gathered K/V is laid out in as few runs as possible (`kernels.mask.gathered_runs`):
contiguous and zigzag -> global order (zigzag is permuted once, on arrival), striped -> rank
order (P runs of stride P, matching the queries' stride). `plan_blocks` then cuts the plan to
the keys each causal query block can see: for query run [a, a + n) only keys [0, a + n), as a
full block plus a causal one -- never the masked upper triangle.

Backward: the kernel's dK, dV for the whole sequence (fp32 accumulators, every rank's share)
are summed back to their owners with one reduce-scatter; dQ stays local.

Traffic per rank (K/V itemsize b, accumulators a = 4 bytes, 8 for fp64):
    forward   (P - 1) * 2 * B * S_loc * Hkv * D * b       all-gather of K and V (one message)
    backward  (P - 1) * 2 * B * S_loc * Hkv * D * a       reduce-scatter of dK and dV
Memory: the gathered K/V (P times the local K/V) is kept for the backward.

Windows and documents: the plan (`plan_blocks` with the call's `MaskRule`) cuts the gathered
keys to the sub-blocks some local query sees, so invisible pairs cost no compute; the
collectives (and their bytes) stay those above.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.mask import Runs, SubBlock, gathered_runs, plan_blocks, token_slots
from ..kernels.plan import PlanKernel, accumulator_dtype
from .primitives import CommStats, GroupInfo, Traffic, gather_tokens, reduce_scatter_tokens


@dataclass(frozen=True)
class AllGatherPlan:
    """Everything non-tensor an all-gather call needs; lives on ctx between forward and backward.

    slots: where each rank's tokens sit in the gathered K/V (None: rank order); blocks: the
    kernel plan of the local queries against it.
    """

    info: GroupInfo
    slots: torch.Tensor | None
    blocks: tuple[SubBlock, ...]
    scale: float
    kernel: PlanKernel
    recorders: tuple[CommStats, ...]

    @classmethod
    def build(cls, info: GroupInfo, all_runs: tuple[Runs, ...], causal: bool, scale: float,
              kernel: PlanKernel, recorders: tuple[CommStats, ...]) -> "AllGatherPlan":
        kv_runs = gathered_runs(all_runs, interleave=False)
        return cls(info, token_slots(all_runs, kv_runs),
                   plan_blocks(all_runs[info.rank], kv_runs, causal), scale, kernel, recorders)


def allgather_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AllGatherPlan
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse) in the accumulator dtype, and the gathered [2, B, S, Hkv, D] K/V."""
    acc_dtype = accumulator_dtype(q.dtype)
    kv = gather_tokens(torch.stack((k, v)), plan.info, plan.slots, 2,
                       Traffic.now("allgather.fwd", plan.recorders))
    o = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype,
                     device=q.device)
    plan.kernel.fwd_into(o, lse, q, kv[0], kv[1], plan.blocks, plan.scale)
    return o, lse, kv


def allgather_bwd(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, dlse: torch.Tensor | None, plan: AllGatherPlan
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for this rank's tokens in the accumulator dtype; kv: the gathered K/V."""
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dkv_all = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)
    plan.kernel.bwd_into(dq, dkv_all[0], dkv_all[1], do, q, kv[0], kv[1], o, lse, dlse,
                         plan.blocks, plan.scale)
    dkv = reduce_scatter_tokens(dkv_all, plan.info, plan.slots, 2,
                                Traffic.now("allgather.bwd", plan.recorders))
    return dq, dkv[0], dkv[1]


class AllGatherAttention(torch.autograd.Function):
    """Autograd wrapper: forward `allgather_fwd`, backward `allgather_bwd`; returns (o, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AllGatherPlan):
        o, lse, kv = allgather_fwd(q, k, v, plan)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, kv, o, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, o, lse = ctx.saved_tensors
        if do is None:  # only lse was used downstream
            do = torch.zeros_like(o)
        dq, dk, dv = allgather_bwd(do, q, kv, o, lse, dlse, ctx.plan)
        return dq.to(q.dtype), dk.to(kv.dtype), dv.to(kv.dtype), None
