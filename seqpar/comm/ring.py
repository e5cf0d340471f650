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

Windows and documents (a `MaskRule` that hides more than causality): the K/V a rank needs of
another rank is usually a small slice, so the K/V go *directly* to the ranks that see them,
never hop by hop. At step t (1 <= t < P) rank r sends to rank r + t the rows of its K/V that
some query of r + t sees -- per run of its layout the hull [first, end) of those keys
(`kernels.mask.visible_key_span`) -- and receives from r - t the rows of r - t's K/V it sees;
a step with nothing to move sends nothing, a pair with no visible entry is never planned.
Backward: the same K/V slices again, and the fp32 dK/dV of each received slice goes straight
back to its owner (one message, the step after it is computed), which adds it into its own.
Traffic per rank, with n_t = rows rank r sends at step t, m_t = rows it receives at step t:
    forward   sum_t n_t * 2 * B * Hkv * D * b
    backward  sum_t n_t * 2 * B * Hkv * D * b  +  sum_t m_t * 2 * B * Hkv * D * 4
Window W <= chunk, contiguous: causal n_1 = W - 1 (rank P - 1: 0), non-causal also
n_(P-1) = W - 1 to r - 1 (rank 0: 0); zigzag (two chunks of C = S / 2P per rank): rank r sends
W - 1 rows of its first chunk to r + 1 (r < P - 1) and W - 1 of its second to r - 1 (r > 0),
causal or not (non-causal adds the mirror rows the other way). So a rank exchanges with its
neighbours only, and its bytes do not depend on P or S. Documents: n_t is the hull of the keys
of r in documents (and, causal, positions) that rank r + t's queries reach.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.mask import MaskRule, Run, Runs, SubBlock, as_rule, plan_blocks, visible_key_span
from ..kernels.plan import PlanKernel, accumulator_dtype
from .primitives import CommStats, DirectMessages, GroupInfo, RingExchange, Traffic


Span = tuple[int, int]  # local rows [first, end) of a K/V block


def _needed_rows(key_runs: Runs, query_runs: Runs, rule: MaskRule) -> tuple[Span, ...]:
    """The local rows of a K/V block (laid out as `key_runs`) that some query of
    `query_runs` sees: one hull per run, empty runs left out."""
    spans, offset = [], 0
    for run, (first, end) in zip(key_runs, visible_key_span(query_runs, key_runs, rule)):
        if end > first:
            spans.append((offset + first, offset + end))
        offset += run.length
    return tuple(spans)


def _rows_as_runs(key_runs: Runs, spans: tuple[Span, ...]) -> Runs:
    """The global positions of the rows `spans` of a block laid out as `key_runs`."""
    out, offset = [], 0
    for run in key_runs:
        for first, end in spans:
            lo, hi = max(first, offset), min(end, offset + run.length)
            if lo < hi:
                out.append(Run(run.start + (lo - offset) * run.stride, hi - lo, run.stride))
        offset += run.length
    return tuple(out)


def _take_rows(x: torch.Tensor, spans: tuple[Span, ...], dim: int) -> torch.Tensor:
    return torch.cat([x.narrow(dim, first, end - first) for first, end in spans], dim=dim)


@dataclass(frozen=True)
class RingPlan:
    """Everything non-tensor a ring call needs; lives on ctx between forward and backward.

    kv_runs[p] are the global positions of the K/V block ring rank p holds; q_runs those of
    this rank's queries. step_blocks[t] is the kernel plan for the block seen at step t.
    Traffic is recorded under "<op>.fwd<op_suffix>" / "<op>.bwd<op_suffix>": "ring.fwd" for the
    ring backend, "usp.fwd.ring" for the ring part inside USP (so "usp.fwd" counts both parts).
    direct: the windowed / document schedule (module docstring): sends[t] are the rows of our
    K/V that rank r + t sees, receives[t] the rows of rank r - t's K/V we see (and
    step_blocks[t] is planned against exactly those rows).
    """

    info: GroupInfo
    q_runs: Runs
    kv_runs: tuple[Runs, ...]
    causal: bool | MaskRule
    scale: float
    kernel: PlanKernel
    recorders: tuple[CommStats, ...]
    step_blocks: tuple[tuple[SubBlock, ...], ...]
    op: str = "ring"
    op_suffix: str = ""
    direct: bool = False
    sends: tuple[tuple[Span, ...], ...] = ()
    receives: tuple[tuple[Span, ...], ...] = ()

    @classmethod
    def build(cls, info: GroupInfo, q_runs: Runs, kv_runs: tuple[Runs, ...], causal: bool | MaskRule,
              scale: float, kernel: PlanKernel, recorders: tuple[CommStats, ...],
              op: str = "ring", op_suffix: str = "") -> "RingPlan":
        """kv_runs[p]: the tokens of ring rank p, whose queries are the same tokens."""
        rule = as_rule(causal)
        world, rank = info.world, info.rank
        if not rule.masked or world == 1:
            steps = tuple(plan_blocks(q_runs, kv_runs[(rank - t) % world], rule)
                          for t in range(world))
            return cls(info, q_runs, kv_runs, causal, scale, kernel, recorders, steps, op,
                       op_suffix)
        sends = tuple(() if t == 0 else
                      _needed_rows(kv_runs[rank], kv_runs[(rank + t) % world], rule)
                      for t in range(world))
        receives = tuple(() if t == 0 else
                         _needed_rows(kv_runs[(rank - t) % world], q_runs, rule)
                         for t in range(world))
        steps = (plan_blocks(q_runs, kv_runs[rank], rule),) + tuple(
            plan_blocks(q_runs, _rows_as_runs(kv_runs[(rank - t) % world], receives[t]), rule)
            for t in range(1, world))
        return cls(info, q_runs, kv_runs, causal, scale, kernel, recorders, steps, op,
                   op_suffix, True, sends, receives)

    def traffic(self, direction: str) -> Traffic:
        return Traffic.now(f"{self.op}.{direction}{self.op_suffix}", self.recorders)

    # The attention a Ulysses / USP plan runs on its head-sharded tensors (see ulysses.py).
    def fwd(self, q, k, v):
        return ring_fwd(q, k, v, self)

    def bwd(self, do, q, k, v, o, lse, dlse):
        return ring_bwd(do, q, k, v, o, lse, dlse, self)

    # ------------------------------------------------------------ the direct (masked) schedule
    def kv_messages(self, kv: torch.Tensor, step: int) -> tuple[DirectMessages, torch.Tensor | None]:
        """Step `step`'s K/V slices: ours to r + step, rank r - step's into a new buffer."""
        rank, world = self.info.rank, self.info.world
        send, recv = self.sends[step], self.receives[step]
        out = [_take_rows(kv, send, 2).contiguous()] if send else []
        buffer = None
        if recv:
            rows = sum(end - first for first, end in recv)
            buffer = kv.new_empty(kv.shape[:2] + (rows,) + kv.shape[3:])
        return (DirectMessages(send=out, to=(rank + step) % world,
                               receive=[] if buffer is None else [buffer],
                               source=(rank - step) % world), buffer)

    def dkv_messages(self, dkv: torch.Tensor | None, step: int, like: torch.Tensor
                     ) -> tuple[DirectMessages, torch.Tensor | None]:
        """dK/dV of rank r - step's slice (computed at `step`) home, ours from r + step in."""
        rank, world = self.info.rank, self.info.world
        sent = self.sends[step]
        buffer = None
        if sent:
            rows = sum(end - first for first, end in sent)
            buffer = like.new_empty(like.shape[:2] + (rows,) + like.shape[3:])
        return (DirectMessages(send=[] if dkv is None else [dkv], to=(rank - step) % world,
                               receive=[] if buffer is None else [buffer],
                               source=(rank + step) % world), buffer)


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One contiguous buffer (one message per hop) holding equally shaped tensors."""
    return torch.stack(tensors)


def ring_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) in the accumulator dtype (fp32; fp64 for fp64 inputs)."""
    world = plan.info.world
    if world == 1:
        return plan.kernel.fwd(q, k, v, plan.step_blocks[0], plan.scale)
    if plan.direct:
        return _direct_fwd(q, k, v, plan)
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
    if plan.direct:
        return _direct_bwd(do, q, k, v, o, lse, dlse, plan)
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


def _direct_fwd(q, k, v, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked schedule: step t's slices travel while step t - 1's block is computed."""
    world = plan.info.world
    kv = _pack(k, v)
    exchange = RingExchange(plan.info, plan.traffic("fwd"))
    message, incoming = plan.kv_messages(kv, 1)
    exchange.start([], send=False, receive=False, direct=message)
    o, lse = plan.kernel.fwd(q, k, v, plan.step_blocks[0], plan.scale)
    for step in range(1, world):
        exchange.wait()
        block = incoming
        if step + 1 < world:
            message, incoming = plan.kv_messages(kv, step + 1)
            exchange.start([], send=False, receive=False, direct=message)
        if block is not None:
            plan.kernel.fwd_into(o, lse, q, block[0], block[1], plan.step_blocks[step], plan.scale)
    return o, lse


def _direct_bwd(do, q, k, v, o, lse, dlse, plan: RingPlan):
    """The masked schedule's backward. The batch posted at step t carries the K/V slices of
    step t + 1 and the dK/dV of the slice computed at step t - 1 home to its owner (ours come
    back in from rank r + t - 1); it travels while step t's slice is computed."""
    world = plan.info.world
    acc_dtype = accumulator_dtype(q.dtype)
    kv = _pack(k, v)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)
    exchange = RingExchange(plan.info, plan.traffic("bwd"))
    message, incoming = plan.kv_messages(kv, 1)
    exchange.start([], send=False, receive=False, direct=[message])
    plan.kernel.bwd_into(dq, dkv[0], dkv[1], do, q, k, v, o, lse, dlse, plan.step_blocks[0],
                         plan.scale)
    outgoing = None  # dK/dV of the slice computed at the previous step
    coming_home = None  # (buffer, rows) of our own dK/dV in the batch in flight
    for step in range(1, world + 1):
        exchange.wait()
        if coming_home is not None:
            dkv.index_add_(2, _row_index(coming_home[1], q.device), coming_home[0])
        block, incoming, messages = incoming, None, []
        if step + 1 < world:
            message, incoming = plan.kv_messages(kv, step + 1)
            messages.append(message)
        home, buffer = plan.dkv_messages(outgoing, step - 1, dkv) if step > 1 else (None, None)
        if home is not None:
            messages.append(home)
        coming_home = None if buffer is None else (buffer, plan.sends[step - 1])
        exchange.start([], send=False, receive=False, direct=messages)
        outgoing = None
        if step < world and block is not None:
            outgoing = torch.zeros(block.shape, dtype=acc_dtype, device=q.device)
            plan.kernel.bwd_into(dq, outgoing[0], outgoing[1], do, q, block[0], block[1], o, lse,
                                 dlse, plan.step_blocks[step], plan.scale)
    exchange.wait()
    if coming_home is not None:
        dkv.index_add_(2, _row_index(coming_home[1], q.device), coming_home[0])
    return dq, dkv[0], dkv[1]


def _row_index(spans: tuple[Span, ...], device) -> torch.Tensor:
    return torch.cat([torch.arange(first, end, device=device) for first, end in spans])


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
