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

Windows and documents: the plan (`plan_blocks` with the call's `MaskRule`) cuts the keys to
the sub-blocks some local query sees, so invisible pairs cost no compute. What travels shrinks
too: rank p shares only its *halo* -- per local run, the hull of the key rows some other rank's
queries see (`kernels.mask.halo_runs`), h_p rows -- padded to H = max_p h_p so the collectives
stay one all-gather and one reduce-scatter:
    forward   (P - 1) * 2 * B * H * Hkv * D * b       all-gather of the halos' K and V
    backward  (P - 1) * 2 * B * H * Hkv * D * a       reduce-scatter of their dK and dV
Each rank attends to its own K/V (local, not sent) followed by the others' halos. A window of
W <= the shortest chunk gives H <= (runs per rank) * (W - 1): bytes independent of S, like the
ring's. When the halos are as large as the shards (documents spanning ranks, wide windows) the
plain gather above runs instead.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.mask import (Runs, SubBlock, as_rule, gathered_runs, halo_runs, plan_blocks,
                            runs_length, token_slots)
from ..kernels.plan import PlanKernel, accumulator_dtype
from .primitives import (CommStats, GroupInfo, Traffic, gather_pieces, gather_tokens,
                         reduce_scatter_pieces, reduce_scatter_tokens)


@dataclass(frozen=True)
class AllGatherPlan:
    """Everything non-tensor an all-gather call needs; lives on ctx between forward and backward.

    slots: where each rank's tokens sit in the gathered K/V (None: rank order); blocks: the
    kernel plan of the local queries against it. halo (masked calls whose halos are smaller
    than the shards): per rank, the local rows it shares (int64 indices), padded to
    `halo_size`; the keys are then this rank's own K/V followed by the other ranks' halos.
    """

    info: GroupInfo
    slots: torch.Tensor | None
    blocks: tuple[SubBlock, ...]
    scale: float
    kernel: PlanKernel
    recorders: tuple[CommStats, ...]
    halo: tuple[torch.Tensor, ...] | None = None
    halo_size: int = 0

    @classmethod
    def build(cls, info: GroupInfo, all_runs: tuple[Runs, ...], causal, scale: float,
              kernel: PlanKernel, recorders: tuple[CommStats, ...]) -> "AllGatherPlan":
        rule = as_rule(causal)
        local = all_runs[info.rank]
        if rule.masked and info.world > 1:
            pieces = [halo_runs(all_runs, p, rule) for p in range(info.world)]
            size = max(sum(run.length for _, run in rank_pieces) for rank_pieces in pieces)
            if size < runs_length(local):
                halo = tuple(torch.cat([torch.arange(offset, offset + run.length)
                                        for offset, run in rank_pieces] or
                                       [torch.empty(0, dtype=torch.int64)])
                             for rank_pieces in pieces)
                key_runs = local + tuple(run for p, rank_pieces in enumerate(pieces)
                                         if p != info.rank for _, run in rank_pieces)
                return cls(info, None, plan_blocks(local, key_runs, rule), scale, kernel,
                           recorders, halo, size)
        kv_runs = gathered_runs(all_runs, interleave=False)
        return cls(info, token_slots(all_runs, kv_runs), plan_blocks(local, kv_runs, rule),
                   scale, kernel, recorders)

    def halo_places(self, seq_local: int) -> list[tuple[int, int, int]]:
        """(rank p, first row, rows) of each other rank's halo in the gathered keys, which hold
        this rank's own `seq_local` rows first: where `_halo_kv` puts what arrives and where
        `_halo_grads` takes the gradients it sends back."""
        places, offset = [], seq_local
        for p, rows_p in enumerate(self.halo):
            if p != self.info.rank:
                places.append((p, offset, len(rows_p)))
                offset += len(rows_p)
        return places


def _halo_kv(k: torch.Tensor, v: torch.Tensor, plan: AllGatherPlan, traffic: Traffic
             ) -> torch.Tensor:
    """Own K/V [B, S_loc, Hkv, D] each -> [2, B, S_loc + sum of the others' halos, Hkv, D]: own
    K/V followed by every other rank's halo rows. Each row is copied once into the result (a
    CPU rank pays for every large temporary in page faults: no stacked or concatenated
    intermediates)."""
    rows = plan.halo[plan.info.rank].to(k.device)
    send = k.new_empty((2, k.shape[0], plan.halo_size) + tuple(k.shape[2:]))
    for i, t in enumerate((k, v)):
        target = send[i, :, :len(rows)]
        if target.is_contiguous():  # B = 1: gathered straight into the send buffer
            torch.index_select(t, 1, rows, out=target)
        else:
            target.copy_(t.index_select(1, rows))
    send[:, :, len(rows):].zero_()  # padding to the largest halo: sent, never read
    pieces = gather_pieces(send, plan.info, traffic)  # [P, 2, B, size, Hkv, D]
    seq_local = k.shape[1]
    places = plan.halo_places(seq_local)
    total = seq_local + sum(n for _, _, n in places)
    kv = k.new_empty((2, k.shape[0], total) + tuple(k.shape[2:]))
    kv[0, :, :seq_local] = k
    kv[1, :, :seq_local] = v
    for p, start, n in places:
        kv[:, :, start:start + n] = pieces[p, :, :, :n]
    return kv


def _halo_grads(dkv_all: torch.Tensor, seq_local: int, plan: AllGatherPlan,
                traffic: Traffic) -> torch.Tensor:
    """The adjoint of `_halo_kv`: own dK/dV plus what the other ranks computed for its halo.
    The reduce-scatter's input is written rank-major in place (no zeroed full buffer, no
    reordering copy)."""
    back = dkv_all.new_empty((plan.info.world,) + tuple(dkv_all.shape[:2]) + (plan.halo_size,)
                             + tuple(dkv_all.shape[3:]))
    back[plan.info.rank].zero_()  # this rank's own halo rows are in dkv_all's own part
    for p, start, n in plan.halo_places(seq_local):
        back[p, :, :, :n] = dkv_all[:, :, start:start + n]
        back[p, :, :, n:].zero_()
    received = reduce_scatter_pieces(back, plan.info, traffic)
    own = dkv_all[:, :, :seq_local].clone()
    rows = plan.halo[plan.info.rank].to(own.device)
    own.index_add_(2, rows, received[:, :, :len(rows)])
    return own


def allgather_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AllGatherPlan
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse) in the accumulator dtype, and the gathered [2, B, S, Hkv, D] K/V (with a
    halo: own K/V and the other ranks' halos)."""
    acc_dtype = accumulator_dtype(q.dtype)
    traffic = Traffic.now("allgather.fwd", plan.recorders)
    if plan.halo is not None:
        kv = _halo_kv(k, v, plan, traffic)
    else:
        kv = gather_tokens(torch.stack((k, v)), plan.info, plan.slots, 2, traffic)
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
    traffic = Traffic.now("allgather.bwd", plan.recorders)
    if plan.halo is not None:
        dkv = _halo_grads(dkv_all, q.shape[1], plan, traffic)
    else:
        dkv = reduce_scatter_tokens(dkv_all, plan.info, plan.slots, 2, traffic)
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
