"""LASP-2: sequence-parallel linear attention with one all-gather of memory states per pass.

The global sequence is N logical chunks of C tokens; rank r holds some of them in local order
(contiguous: chunk r, N = P; zigzag: chunks r and 2P-1-r, N = 2P). Per head lambda = exp(-s),
local index l in [0, C), q pre-multiplied by `scale` below. For every local chunk c:

    M_c = (K_c * lambda^(C-l))^T V_c                          d x e, fp32: the ONE all-gather
    S_c = sum_{c' < c} lambda^(C(c-1-c')) M_c'                 exclusive prefix in chunk order
    O_c = [(Q_c K_c^T) * Lambda] V_c + (Q_c * lambda^l) S_c    intra (local kernel) + inter

The intra-chunk term needs no remote data, so the all-gather of M is posted first
(async_op=True) and travels while the local kernel runs. Backward mirrors it:

    D_c  = (Q_c * lambda^l)^T dO_c                             the ONE all-gather (backward)
    G_c  = sum_{c' > c} lambda^(C(c'-1-c)) D_c'                exclusive suffix in chunk order
    dQ_c = intra + (dO_c S_c^T) * lambda^l
    dK_c = intra + (V_c G_c^T) * lambda^(C-l)
    dV_c = intra + (K_c * lambda^(C-l)) G_c

with the intra-chunk backward overlapping the all-gather of D. (The reference formulas with
Lambda are DESIGN §4; `kernels/linear_state.py` has the state algebra, every decay exponent
<= 0.)

Non-causal, with decay (lambda^|i-j|): a prefix state as above and a suffix state
U_c = sum_{c' > c} lambda^(C(c'-1-c)) M'_c', M'_c = (K_c * lambda^(l+1))^T V_c, entering as
(Q_c * lambda^(C-1-l)) U_c; M and M' ride in the same all-gather (and D, D' backward); the
intra term is the bidirectional local pass. Non-causal without decay: every query sees the
whole sequence, o_i = q_i sum_all K^T V, so one all-reduce of K^T V forward (and of Q^T dO
backward) is all the communication and there is no intra-chunk pass at all.

Traffic per rank, state bytes X = B * H * Dk * Dv * 4 (8 for fp64 inputs), n_loc local chunks
(1 contiguous, 2 zigzag), forward and backward alike — independent of the sequence length:
    causal                   (P - 1) * n_loc * X           all-gather
    non-causal, decay        (P - 1) * n_loc * 2 X         all-gather
    non-causal, no decay     2 (P - 1) * ceil(X / P)       all-reduce

Shapes: q/k [B, S_loc, H, Dk], v [B, S_loc, H, Dv], log_decay [H]; o [B, S_loc, H, Dv].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.linear_state import LinearKernel, chunk_weights, outer_sum, scan_states, times_state
from ..kernels.mask import Runs
from ..kernels.plan import accumulator_dtype
from .primitives import CommStats, GroupInfo, Traffic, start_all_gather, start_all_reduce


@dataclass(frozen=True)
class Lasp2Plan:
    """Everything non-tensor a LASP-2 call needs; lives on ctx between forward and backward.

    local_chunks: logical chunk ids this rank holds, in local order. gathered_index[c]: where
    chunk c sits in the all-gathered (rank, local chunk) list.
    """

    info: GroupInfo
    chunk_len: int
    local_chunks: tuple[int, ...]
    gathered_index: tuple[int, ...]
    causal: bool
    decayed: bool
    scale: float
    kernel: LinearKernel
    recorders: tuple[CommStats, ...]

    @classmethod
    def build(cls, info: GroupInfo, all_runs: tuple[Runs, ...], causal: bool, decayed: bool,
              scale: float, kernel: LinearKernel, recorders: tuple[CommStats, ...]) -> "Lasp2Plan":
        chunk_len = all_runs[0][0].length
        if any(run.length != chunk_len or run.stride != 1 for runs in all_runs for run in runs):
            raise ValueError("LASP-2 needs every rank to hold whole chunks of equal length "
                             "(layout 'contiguous' or 'zigzag')")
        ids = [run.start // chunk_len for runs in all_runs for run in runs]
        gathered_index = tuple(sorted(range(len(ids)), key=ids.__getitem__))
        local = tuple(run.start // chunk_len for run in all_runs[info.rank])
        return cls(info, chunk_len, local, gathered_index, causal, decayed, scale, kernel,
                   recorders)

    @property
    def summed(self) -> bool:
        """Non-causal without decay: one all-reduced K^T V serves every query."""
        return not self.causal and not self.decayed

    @property
    def directions(self) -> int:
        """States per chunk: the prefix, and for non-causal attention also the suffix."""
        return 1 if self.causal else 2


def _chunks(t: torch.Tensor, plan: Lasp2Plan) -> torch.Tensor:
    """[B, S_loc, H, D] -> [B * n_loc, C, H, D]: each local chunk its own batch entry."""
    return t.reshape(t.shape[0] * len(plan.local_chunks), plan.chunk_len, *t.shape[2:])


def _weights(log_decay: torch.Tensor, plan: Lasp2Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(from_start, to_end) per direction; the suffix direction is the prefix one reversed."""
    from_start, to_end = chunk_weights(log_decay, plan.chunk_len)
    return [(from_start, to_end), (from_start.flip(0), to_end.flip(0))][:plan.directions]


def _incoming(gathered: torch.Tensor, log_decay: torch.Tensor, plan: Lasp2Plan, reverse: bool
              ) -> torch.Tensor:
    """Gathered per-chunk states [P, B, n_loc, H, d, e] -> the state entering each local chunk
    from the others, [B * n_loc, H, d, e]: an exclusive scan in logical chunk order (reverse:
    from the later chunks)."""
    in_order = gathered.permute(1, 3, 0, 2, 4, 5).flatten(2, 3)  # [B, H, P * n_loc, d, e]
    index = torch.tensor(plan.gathered_index, device=gathered.device)
    scanned = scan_states(in_order.index_select(2, index), log_decay, plan.chunk_len, reverse)
    mine = scanned[:, :, list(plan.local_chunks)]  # [B, H, n_loc, d, e]
    return mine.transpose(1, 2).flatten(0, 1)


def lasp2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
              plan: Lasp2Plan) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(o in the accumulator dtype, the states backward needs)."""
    traffic = Traffic.now("lasp2.fwd", plan.recorders)
    if plan.summed:
        total = start_all_reduce(outer_sum(k, v), plan.info, traffic).wait()
        return plan.scale * times_state(q, total), (total,)
    s = log_decay.to(accumulator_dtype(q.dtype))
    qc, kc, vc = (_chunks(t, plan) for t in (q, k, v))
    weights = _weights(s, plan)
    outgoing = torch.stack([outer_sum(kc, vc, to_end) for _, to_end in weights])
    pending = start_all_gather(outgoing.unflatten(1, (q.shape[0], -1)), plan.info, traffic)
    o = plan.kernel.intra_fwd(qc, kc, vc, s, plan.scale, plan.causal)  # while states travel
    gathered = pending.wait()
    states = tuple(_incoming(gathered[:, d], s, plan, reverse=d == 1)
                   for d in range(plan.directions))
    for (from_start, _), state in zip(weights, states):
        o += times_state(qc, state, from_start * plan.scale)
    return o.reshape(*q.shape[:3], v.shape[3]), states


def lasp2_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              log_decay: torch.Tensor | None, states: tuple[torch.Tensor, ...], plan: Lasp2Plan
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulator dtype. states: what `lasp2_fwd` returned."""
    traffic = Traffic.now("lasp2.bwd", plan.recorders)
    if plan.summed:
        (total,) = states
        pending = start_all_reduce(plan.scale * outer_sum(q, do), plan.info, traffic)
        dq = plan.scale * times_state(do, total.transpose(-1, -2))  # while the sum travels
        grad = pending.wait()
        return dq, times_state(v, grad.transpose(-1, -2)), times_state(k, grad)
    s = log_decay.to(accumulator_dtype(q.dtype))
    qc, kc, vc, doc = (_chunks(t, plan) for t in (q, k, v, do))
    weights = _weights(s, plan)
    outgoing = torch.stack([plan.scale * outer_sum(qc, doc, from_start)
                            for from_start, _ in weights])
    pending = start_all_gather(outgoing.unflatten(1, (q.shape[0], -1)), plan.info, traffic)
    dq, dk, dv = plan.kernel.intra_bwd(doc, qc, kc, vc, s, plan.scale, plan.causal)
    for (from_start, _), state in zip(weights, states):
        dq += times_state(doc, state.transpose(-1, -2), from_start * plan.scale)
    gathered = pending.wait()
    for d, (_, to_end) in enumerate(weights):
        # The prefix states flowed forward, so their gradients come from later chunks.
        grad = _incoming(gathered[:, d], s, plan, reverse=d == 0)
        dk += times_state(vc, grad.transpose(-1, -2), to_end)
        dv += times_state(kc, grad, to_end)
    return tuple(t.reshape(*q.shape[:3], t.shape[-1]) for t in (dq, dk, dv))


class Lasp2Attention(torch.autograd.Function):
    """Autograd wrapper: forward `lasp2_fwd`, backward `lasp2_bwd`; returns o in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, plan: Lasp2Plan):
        o, states = lasp2_fwd(q, k, v, log_decay, plan)
        ctx.save_for_backward(q, k, v, log_decay, *states)
        ctx.plan = plan
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, *states = ctx.saved_tensors
        # Traffic is recorded by the comm_stats blocks active now and those of the forward.
        dq, dk, dv = lasp2_bwd(do, q, k, v, log_decay, tuple(states), ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
