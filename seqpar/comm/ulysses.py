"""Ulysses (head-sharded) attention: all-to-all, full-sequence attention on H/U heads, all-to-all back.

U ranks, rank p holds the local tokens of its layout, q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D].

Forward:
    q_h  = seq_to_heads(q)      [B, U * S_loc, Hq / U, D]   query heads p*Hq/U .. (p+1)*Hq/U - 1
    kv_h = seq_to_heads(k, v)   [2, B, U * S_loc, n, D]    the K/V heads those query heads use
    o_h, lse_h = attention(q_h, kv_h)  over all U * S_loc tokens (causal by global position)
    o    = heads_to_seq(o_h)    [B, S_loc, Hq, D]          lse likewise when it is returned
Without a window or documents the head-sharded side holds the group's tokens in global order
(the all-to-all undoes the layout's permutation), so plain Ulysses runs one causal kernel call
per rank. With them it keeps the tokens rank-major, as they arrive (no permutation): the masked
plan is many sub-blocks in any order (`kernels.mask.head_sharded_runs`).

K/V heads (G = Hq / Hkv query heads per K/V head, m = Hq / U query heads per rank):
* Hkv % U == 0: rank p gets K/V heads p*Hkv/U .. (p+1)*Hkv/U - 1 (n = Hkv / U), a partition;
* U % Hkv == 0 (Hkv < U): the m query heads of a rank share one K/V head, which is replicated
  to the G / m ranks that use it (n = 1); the backward sums their dK/dV;
* otherwise the heads of a rank straddle K/V groups unevenly: each rank gets the K/V head of
  each of its query heads (n = m, duplicates included) and attends as MHA.
Never a silent split: every query head meets exactly its K/V head.

The "attention" in the middle (`UlyssesPlan.inner`) is the ring backend's code: a one-rank ring
for Ulysses; for USP (`usp.py`) the ring across the R Ulysses groups, each holding the tokens of
its U ranks; for backend "s2" the block-sparse S2 kernel (`kernels/s2.py`), whose masks are built
from the GLOBAL ids of the K/V heads this rank holds (`kv_split.heads[rank]`).

Backward: do (and dlse when lse was returned) go through seq_to_heads, the ring backward runs on
the head-sharded side, dq comes back through heads_to_seq, dK/dV too (summing replicated heads).

Traffic per rank of the all-to-alls (itemsize b, accumulator itemsize a = 4, or 8 for fp64;
each all-to-all sends the (U-1)/U of its buffer destined to other ranks):
    forward   (U-1) * B * S_loc * D * (2 m + 2 n) * b        q, k+v (one message), o
              + (U-1) * B * S_loc * m * a                    lse, only with return_lse=True
    backward  (U-1) * B * S_loc * D * (2 m * b + 2 n * c)    do, dq, dk+dv
              + (U-1) * B * S_loc * m * a                    dlse, only with return_lse=True
with c = b, or c = a when K/V heads are replicated (their dK/dV are summed in fp32).
Replication costs n = 1 K/V head per rank instead of Hkv / U, i.e. U/Hkv times the K/V bytes
of an even split; the uneven case sends m K/V heads per rank. The ring part (USP) adds the
ring's own traffic on the head-sharded tensors (see ring.py), under "<op>.fwd.ring".

Windows and documents: the middle runs the plan of the call's `MaskRule` on the gathered
sequence (invisible pairs cost no compute); the all-to-alls, and their bytes, are unchanged.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.mask import Runs, as_rule, head_sharded_runs, runs_length, token_slots
from ..kernels.s2 import S2Pattern, S2Plan
from ..kernels.plan import PlanKernel, accumulator_dtype
from .primitives import CommStats, GroupInfo, HeadSplit, Traffic, heads_to_seq, seq_to_heads
from .ring import RingPlan


def kv_heads_per_rank(heads_q: int, heads_kv: int, ranks: int) -> torch.Tensor:
    """[ranks, n] int64: the K/V heads each rank needs for its Hq / ranks query heads, in an order
    where local query head i uses local K/V head i // (m / n) (plain GQA on every rank)."""
    per_rank, group = heads_q // ranks, heads_q // heads_kv
    used = [[(p * per_rank + i) // group for i in range(per_rank)] for p in range(ranks)]
    distinct = [sorted(set(heads)) for heads in used]
    n = len(distinct[0])
    uniform = (all(len(d) == n for d in distinct) and per_rank % n == 0
               and all(used[p][i] == distinct[p][i // (per_rank // n)]
                       for p in range(ranks) for i in range(per_rank)))
    return torch.tensor(distinct if uniform else used, dtype=torch.int64)


@dataclass(frozen=True)
class UlyssesPlan:
    """Everything non-tensor a Ulysses / USP call needs; lives on ctx between forward and backward.

    q_split / kv_split: the all-to-alls of the query and K/V heads inside the Ulysses group;
    inner: the attention over the head-sharded tokens, anything with `fwd(q, k, v)` and
    `bwd(do, q, k, v, o, lse, dlse)` in the accumulator dtype: a RingPlan (one rank: plain
    Ulysses) or an S2Plan.
    """

    q_split: HeadSplit
    kv_split: HeadSplit
    inner: RingPlan | S2Plan
    return_lse: bool
    op: str
    recorders: tuple[CommStats, ...]

    @classmethod
    def build(cls, ulysses: GroupInfo, ring: GroupInfo, all_runs: tuple[Runs, ...], heads_q: int,
              heads_kv: int, causal: bool, scale: float, kernel: PlanKernel,
              recorders: tuple[CommStats, ...], return_lse: bool, op: str,
              s2: S2Pattern | None = None) -> "UlyssesPlan":
        """all_runs[r]: the global positions of the tokens of sequence-parallel rank
        r = g * U + u (Ulysses group g = this rank's ring index, u = its Ulysses index).
        With `s2` (plain Ulysses only, ring.world == 1) the middle is S2 sparse attention."""
        size = ulysses.world
        members = [all_runs[g * size:(g + 1) * size] for g in range(ring.world)]
        group_runs = tuple(head_sharded_runs(m, as_rule(causal)) for m in members)
        slots = token_slots(members[ring.rank], group_runs[ring.rank])
        q_heads = torch.arange(heads_q).reshape(size, heads_q // size)
        q_split = HeadSplit(ulysses, q_heads, heads_q, slots)
        kv_split = HeadSplit(ulysses, kv_heads_per_rank(heads_q, heads_kv, size), heads_kv, slots)
        if s2 is not None:
            seq_len = sum(runs_length(runs) for runs in all_runs)
            inner = S2Plan.build(s2, seq_len, kv_split.heads[ulysses.rank].tolist(), heads_q,
                                 scale, kernel)
        else:
            inner = RingPlan.build(ring, group_runs[ring.rank], group_runs, causal, scale, kernel,
                                   recorders, op=op, op_suffix=".ring")
        return cls(q_split, kv_split, inner, return_lse, op, recorders)

    def traffic(self, direction: str) -> Traffic:
        return Traffic.now(f"{self.op}.{direction}.all_to_all", self.recorders)


def ulysses_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: UlyssesPlan):
    """Returns (o in q's dtype, lse in the accumulator dtype or None, the head-sharded
    (q_h, k_h, v_h, o_h, lse_h) the backward needs)."""
    traffic = plan.traffic("fwd")
    q_h = seq_to_heads(q, plan.q_split, 1, 2, traffic)
    kv_h = seq_to_heads(torch.stack((k, v)), plan.kv_split, 2, 3, traffic)
    o_h, lse_h = plan.inner.fwd(q_h, kv_h[0], kv_h[1])
    o_h = o_h.to(q.dtype)  # the output's own rounding, once, before it travels
    o = heads_to_seq(o_h, plan.q_split, 1, 2, traffic)
    lse = heads_to_seq(lse_h, plan.q_split, 2, 1, traffic) if plan.return_lse else None
    return o, lse, (q_h, kv_h[0], kv_h[1], o_h, lse_h)


def ulysses_bwd(do: torch.Tensor, dlse: torch.Tensor | None, q_h, k_h, v_h, o_h, lse_h,
                plan: UlyssesPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for this rank's tokens: dq in the input dtype, dk/dv in the accumulator
    dtype when K/V heads are replicated (summed across ranks), else in the input dtype."""
    traffic = plan.traffic("bwd")
    do_h = seq_to_heads(do, plan.q_split, 1, 2, traffic)
    dlse_h = seq_to_heads(dlse, plan.q_split, 2, 1, traffic) if dlse is not None else None
    dq_h, dk_h, dv_h = plan.inner.bwd(do_h, q_h, k_h, v_h, o_h, lse_h, dlse_h)
    dq = heads_to_seq(dq_h.to(q_h.dtype), plan.q_split, 1, 2, traffic)
    acc_dtype = accumulator_dtype(q_h.dtype)
    dkv_h = torch.stack((dk_h, dv_h))
    if not plan.kv_split.replicates:
        dkv_h = dkv_h.to(k_h.dtype)  # each dK/dV row has one owner: round once, send small
    dkv = heads_to_seq(dkv_h, plan.kv_split, 2, 3, traffic, sum_dtype=acc_dtype)
    return dq, dkv[0], dkv[1]


class UlyssesAttention(torch.autograd.Function):
    """Autograd wrapper: forward `ulysses_fwd`, backward `ulysses_bwd`; returns (o, lse or None)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: UlyssesPlan):
        o, lse, saved = ulysses_fwd(q, k, v, plan)
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q_h, k_h, v_h, o_h, lse_h = ctx.saved_tensors
        plan = ctx.plan
        batch, heads = q_h.shape[0], plan.q_split.total_heads
        seq_local = q_h.shape[1] // plan.q_split.info.world
        if do is None:  # only lse was used downstream
            do = torch.zeros((batch, seq_local, heads, q_h.shape[3]), dtype=q_h.dtype,
                             device=q_h.device)
        if plan.return_lse and dlse is None:
            # Every rank must run the same all-to-alls, whether or not its lse was used.
            dlse = torch.zeros((batch, heads, seq_local), dtype=lse_h.dtype, device=lse_h.device)
        dq, dk, dv = ulysses_bwd(do.contiguous(), dlse, q_h, k_h, v_h, o_h, lse_h, plan)
        return dq, dk.to(k_h.dtype), dv.to(v_h.dtype), None
