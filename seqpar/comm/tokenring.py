"""TokenRing: bidirectional ring attention. Queries travel; partial results go straight home.

P ranks, rank r holds queries Q_r and keys/values K_r, V_r of its tokens (any layout; runs[p]
are the global positions rank p holds). K and V never move.

Forward, P steps. At step t rank r holds the *visiting* queries of rank x = (r - t) mod P and
computes their partial (o, lse) against its local K_r, V_r under the causal rule of the global
positions of both (`plan_blocks(runs[x], runs[r])`). Posted together in ONE batch of
point-to-point operations before that compute, and waited for after it:

    queries   Q_x           -> r + 1           Q_(x-1)        <- r - 1         (ring direction)
    partials  of step t - 1 -> its owner r-t+1   ours, of step t - 1 <- rank r + t - 1

The owner merges its own block (step 0) and every partial as it arrives into fp32
accumulators (`merge_into`); the partial of the last step goes home after the loop. A partial
leaves one step after it is computed because it is only complete then: queries move during
steps 0 .. P-2, partials during steps 2 .. P-1 and one last exchange, so steps 2 .. P-2 carry
both (queries one way, partials the other; at step 2 to and from the two ring neighbours).

Backward, same schedule, with the final (o, lse). The visiting queries travel with dO, lse
and delta = rowsum(dO * O) - dLSE (one fp32 number per row instead of O; `softmax_delta`);
the visited rank adds the gradient of its local K/V into local fp32 accumulators (dK, dV never
move) and sends the partial dQ (fp32) straight to the owner, which adds it.

Partials go straight to the owner, not hop by hop back around the ring. They do not combine on
the way (the ranks behind r met these queries at earlier steps and have already sent their
own partials), so a hop-by-hop return would relay the step-t partial t times: P(P-1)/2
transfers per rank instead of P - 1, and t hops of latency instead of one. Sent directly, each
partial is injected once. On a fully connected mesh (NVLink / NVSwitch, Ascend HCCS: the
TokenRing paper's setting) rank r then uses its link to r + 1 for queries and its link to
r - t + 1 for partials -- different links at every step, so both directions of each pair of
ranks carry data at once and a step's busiest link holds one query block or one partial
instead of the ring's K and V blocks. On a physical ring the fabric relays the partial; the
bytes each rank injects stay the same.

Nothing is sent for work that is never done: a rank whose keys no visiting query can see
computes nothing and returns no partial; a partial carries only the rows that see a key
(rows [lo, hi) of the plan; zigzag: the later half when the queries' owner precedes this rank);
queries are forwarded only while some rank further along sees one of their keys (contiguous
causal: rank 0's queries never leave it).

Traffic per rank (b: input itemsize, a: accumulator itemsize, 4; 8 for fp64; N = B * Hq),
summed over the query blocks rank r forwards (F of them) and the partials it returns (rows_i
rows each):
    forward   F * N * S_loc * D * b        +  sum_i N * rows_i * (D * b + a)
    backward  F * N * S_loc * (2 D b + 2 a) +  sum_i N * rows_i * D * a
Non-causal, and causal zigzag / striped (S_loc > 1), forward every query block P - 1 times;
causal contiguous (and striped with S_loc = 1) never forwards rank 0's. Rows returned by rank r
for the queries of rank x != r: all S_loc when non-causal or x > r (x's tokens come later),
else zigzag S_loc / 2, striped S_loc - 1, contiguous 0 (no message).
Ring attention moves K and V of Hkv heads instead: forward (P - 1) * 2 * B * S_loc * Hkv * D * b.
MHA (Hq == Hkv): Q + O partial ~ K + V, the same bytes split over two directions; backward
TokenRing sends less (no travelling fp32 dK/dV). GQA: TokenRing moves Hq / Hkv times more.

Windows and documents (a `MaskRule` that hides more than causality; `direct`): the queries do
not walk the ring. At step t rank r sends straight to rank r + t the rows of its queries that
r + t's keys serve (the hull [lo, hi) of `returns[t]`; nothing when none) and receives from
r - t the rows of its queries it serves (`rows[t]`); the partials go home as above. Each step's
queries are posted one step early, with the previous step's partial. Traffic per rank, with
q_t = |returns[t]| (rows of ours rank r + t sees) and rows_t = |rows[t]| (rows of r - t's we
serve):
    forward   sum_t N * q_t * D * b             +  sum_t N * rows_t * (D * b + a)
    backward  sum_t N * q_t * (2 D b + 2 a)      +  sum_t N * rows_t * D * a
With a window W <= S_loc, contiguous and causal, only r - 1 sees rank r's first W - 1 queries:
q_(P-1) = W - 1 (rank 0: none) and rows_1 = W - 1 (rank P - 1: none) -- neighbours only,
bytes independent of P and S.

Shapes: q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D]; o like q; lse [B, Hq, S_loc].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..kernels.mask import MaskRule, Runs, SubBlock, as_rule, plan_blocks
from ..kernels.merge import merge_into
from ..kernels.plan import PlanKernel, accumulator_dtype, softmax_delta
from .primitives import CommStats, DirectMessages, GroupInfo, RingExchange, Traffic
from .ring import finish_forward, run_backward

RowSpan = tuple[int, int]  # local query rows [lo, hi)


def _first_and_last(runs: Runs) -> tuple[int, int]:
    return min(min(r.start, r.last) for r in runs), max(max(r.start, r.last) for r in runs)


@dataclass(frozen=True)
class TokenRingPlan:
    """Everything non-tensor a TokenRing call needs; lives on ctx between forward and backward.

    Step t concerns the visiting queries of rank (r - t) mod P (t = 0: our own):
      rows[t]     the visiting rows [lo, hi) that see a local key; None: nothing to compute
      blocks[t]   the kernel plan of those rows against the local K/V (rows relative to lo)
      forward[t]  the visiting queries go on to r + 1 during step t
      arrives[t]  the queries of step t + 1 arrive from r - 1 during step t
      returns[t]  rows of OUR queries that rank r + t sees at its step t; their partial
                  arrives during step t + 1 (None: it sees none, nothing arrives)
    """

    info: GroupInfo
    causal: bool
    scale: float
    kernel: PlanKernel
    recorders: tuple[CommStats, ...]
    rows: tuple[RowSpan | None, ...]
    blocks: tuple[tuple[SubBlock, ...], ...]
    forward: tuple[bool, ...]
    arrives: tuple[bool, ...]
    returns: tuple[RowSpan | None, ...]
    direct: bool = False  # windows / documents: query rows go straight to the rank that sees them

    @classmethod
    def build(cls, info: GroupInfo, runs: tuple[Runs, ...], causal: bool | MaskRule, scale: float,
              kernel: PlanKernel, recorders: tuple[CommStats, ...]) -> "TokenRingPlan":
        world, rank = info.world, info.rank
        rule = as_rule(causal)
        causal = rule.causal
        bounds = [_first_and_last(r) for r in runs]
        seen: dict[tuple[int, int], bool] = {}

        def sees(x: int, y: int) -> bool:
            """Does some query of rank x see some key of rank y (causal: first key <= last
            query; a window or documents: the plan of the pair is not empty)?"""
            x, y = x % world, y % world
            if not rule.masked:
                return not causal or bounds[y][0] <= bounds[x][1]
            if (x, y) not in seen:
                seen[x, y] = bool(plan_blocks(runs[x], runs[y], rule))
            return seen[x, y]

        def forwarded(x: int, step: int) -> bool:
            """Do rank x's queries go on from rank x + step, i.e. does a rank after it see them?"""
            return any(sees(x, x + later) for later in range(step + 1, world))

        def span(x: int, y: int) -> tuple[RowSpan | None, tuple[SubBlock, ...]]:
            blocks = plan_blocks(runs[x % world], runs[y % world], rule)
            if bool(blocks) != sees(x, y):
                raise AssertionError(f"TokenRingPlan: plan_blocks and sees() disagree on {x, y}")
            if not blocks:
                return None, ()
            lo, hi = min(b.q0 for b in blocks), max(b.q1 for b in blocks)
            return (lo, hi), tuple(dataclasses.replace(b, q0=b.q0 - lo, q1=b.q1 - lo)
                                   for b in blocks)

        visits = [span(rank - step, rank) for step in range(world)]
        direct = rule.masked and world > 1
        return cls(info, causal, scale, kernel, recorders,
                   rows=tuple(rows for rows, _ in visits),
                   blocks=tuple(blocks for _, blocks in visits),
                   forward=tuple(not direct and forwarded(rank - step, step)
                                 for step in range(world)),
                   arrives=tuple(not direct and forwarded(rank - 1 - step, step)
                                 for step in range(world)),
                   returns=tuple(span(rank, rank + step)[0] if step else None
                                 for step in range(world)),
                   direct=direct)

    def query_messages(self, rows_of: Callable[[RowSpan], torch.Tensor], step: int,
                       empty: Callable[[int], torch.Tensor]
                       ) -> tuple[DirectMessages, torch.Tensor | None]:
        """The direct schedule's queries of `step` (posted one step early): the rows of ours
        that rank r + step sees (`rows_of(span)`, a contiguous message) out, and the rows of
        rank r - step's queries that we see in (`empty(n)`: a buffer for n rows)."""
        rank, world = self.info.rank, self.info.world
        if step >= world:
            return DirectMessages(), None
        ours, theirs = self.returns[step], self.rows[step]
        buffer = None if theirs is None else empty(theirs[1] - theirs[0])
        return (DirectMessages(send=[] if ours is None else [rows_of(ours)],
                               to=(rank + step) % world,
                               receive=[] if buffer is None else [buffer],
                               source=(rank - step) % world), buffer)

    def partial_messages(self, step: int, outgoing: torch.Tensor | None,
                         incoming: torch.Tensor | None) -> DirectMessages:
        """Our partial of step - 1 home to r - step + 1, and ours from r + step - 1 in."""
        rank, world = self.info.rank, self.info.world
        return DirectMessages(send=[] if outgoing is None else [outgoing],
                              to=(rank - step + 1) % world,
                              receive=[] if incoming is None else [incoming],
                              source=(rank + step - 1) % world)

    def start_step(self, ring: RingExchange, step: int, queries: torch.Tensor,
                   outgoing: torch.Tensor | None, incoming: torch.Tensor | None) -> None:
        """Post the messages of `step` in one batch: `queries` (the visiting block, or our own
        as the shape of the next) on to r + 1 and the next block in from r - 1, where
        needed; `outgoing` (our partial of step - 1) home to r - step + 1, and `incoming` (the
        partial of our queries from rank r + step - 1) in."""
        rank, world = self.info.rank, self.info.world
        ring.start([queries], send=step < world and self.forward[step],
                   receive=step < world and self.arrives[step],
                   direct=DirectMessages(send=[] if outgoing is None else [outgoing],
                                         to=(rank - step + 1) % world,
                                         receive=[] if incoming is None else [incoming],
                                         source=(rank + step - 1) % world))

    def incoming_rows(self, step: int) -> RowSpan | None:
        """Rows of our queries whose partial arrives during `step` (computed at step - 1)."""
        return self.returns[step - 1] if 1 <= step <= self.info.world else None


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One byte buffer (one message per hop) holding tensors of mixed dtypes, widest dtype
    first so each part starts aligned for `_unpack`'s zero-copy views."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


Parts = Sequence[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype) of each packed part


def _part_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def _unpack(buffer: torch.Tensor, parts: Parts) -> list[torch.Tensor]:
    views, offset = [], 0
    for shape, dtype in parts:
        size = _part_bytes(shape, dtype)
        views.append(buffer[offset:offset + size].view(dtype).view(shape))
        offset += size
    return views


def _empty_message(parts: Parts, device: torch.device) -> torch.Tensor:
    return torch.empty(sum(_part_bytes(*part) for part in parts), dtype=torch.uint8, device=device)


def _partial_parts(q: torch.Tensor, rows: RowSpan) -> Parts:
    """A forward partial on the wire: lse [B, Hq, rows] (accumulator dtype), o [B, rows, Hq, D]
    in the input dtype (rounded once, like the ring's per-block outputs before their merge)."""
    batch, _, heads, dim = q.shape
    n = rows[1] - rows[0]
    return [((batch, heads, n), accumulator_dtype(q.dtype)), ((batch, n, heads, dim), q.dtype)]


def tokenring_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TokenRingPlan
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) in the accumulator dtype (fp32; fp64 for fp64 inputs)."""
    acc_dtype = accumulator_dtype(q.dtype)
    batch, seq, heads, _ = q.shape
    o = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((batch, heads, seq), float("-inf"), dtype=acc_dtype, device=q.device)
    world = plan.info.world
    if world == 1:
        plan.kernel.fwd_into(o, lse, q, k, v, plan.blocks[0], plan.scale)
        return o, lse
    if plan.direct:
        return _direct_fwd(q, k, v, o, lse, plan)
    ring = RingExchange(plan.info, Traffic.now("tokenring.fwd", plan.recorders))
    visiting, outgoing = q.contiguous(), None
    for step in range(world + 1):  # step == world: the last partial goes home
        back = plan.incoming_rows(step)
        incoming = None if back is None else _empty_message(_partial_parts(q, back), q.device)
        plan.start_step(ring, step, q if visiting is None else visiting, outgoing, incoming)
        partial = None
        if step == 0:
            plan.kernel.fwd_into(o, lse, q, k, v, plan.blocks[0], plan.scale)
        elif step < world and plan.rows[step] is not None:
            lo, hi = plan.rows[step]
            part_o, part_lse = plan.kernel.fwd(visiting[:, lo:hi], k, v, plan.blocks[step],
                                               plan.scale)
            partial = _pack(part_lse, part_o.to(q.dtype))
        arrived = ring.wait()
        if incoming is not None:
            lo, hi = back
            back_lse, back_o = _unpack(incoming, _partial_parts(q, back))
            merge_into(o[:, lo:hi], lse[:, :, lo:hi], back_o, back_lse)
        visiting = arrived[0] if arrived else None
        outgoing = partial
    return o, lse


def tokenring_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                  plan: TokenRingPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulator dtype. o/lse: the forward's final output and lse."""
    acc_dtype = accumulator_dtype(q.dtype)
    batch, seq, heads, dim = q.shape
    world = plan.info.world
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    if world == 1:
        plan.kernel.bwd_into(dq, dk, dv, do, q, k, v, o, lse, dlse, plan.blocks[0], plan.scale)
        return dq, dk, dv
    if plan.direct:
        return _direct_bwd(do, q, k, v, o, lse, dlse, dq, dk, dv, plan)
    # What travels with the queries: lse and delta (accumulator dtype) first, then q and dO.
    travelling = [((batch, heads, seq), acc_dtype)] * 2 + [(tuple(q.shape), q.dtype)] * 2
    own = _pack(lse.to(acc_dtype), softmax_delta(do, o, dlse), q, do)
    ring = RingExchange(plan.info, Traffic.now("tokenring.bwd", plan.recorders))
    visiting, outgoing = own, None
    for step in range(world + 1):
        back = plan.incoming_rows(step)
        incoming = None if back is None else torch.empty(
            (batch, back[1] - back[0], heads, dim), dtype=acc_dtype, device=q.device)
        plan.start_step(ring, step, own if visiting is None else visiting, outgoing, incoming)
        partial = None
        if step == 0:
            plan.kernel.bwd_into(dq, dk, dv, do, q, k, v, o, lse, dlse, plan.blocks[0],
                                 plan.scale)
        elif step < world and plan.rows[step] is not None:
            lo, hi = plan.rows[step]
            lse_v, delta_v, q_v, do_v = _unpack(visiting, travelling)
            partial = torch.zeros((batch, hi - lo, heads, dim), dtype=acc_dtype, device=q.device)
            plan.kernel.bwd_into(partial, dk, dv, do_v[:, lo:hi], q_v[:, lo:hi], k, v, None,
                                 lse_v[:, :, lo:hi], None, plan.blocks[step], plan.scale,
                                 delta=delta_v[:, :, lo:hi])
        arrived = ring.wait()
        if incoming is not None:
            dq[:, back[0]:back[1]] += incoming
        visiting = arrived[0] if arrived else None
        outgoing = partial
    return dq, dk, dv


def _direct_fwd(q, k, v, o, lse, plan: TokenRingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows / documents: step t's batch carries the query rows of step t + 1 (ours that
    r + t + 1 sees out, those of r - t - 1 that we see in) and the partial of step t - 1 home."""
    world = plan.info.world
    ring = RingExchange(plan.info, Traffic.now("tokenring.fwd", plan.recorders))
    batch, _, heads, dim = q.shape

    def rows_of(span: RowSpan) -> torch.Tensor:
        return q[:, span[0]:span[1]].contiguous()

    def empty(n: int) -> torch.Tensor:
        return q.new_empty((batch, n, heads, dim))

    visiting, outgoing = None, None
    for step in range(world + 1):  # step == world: the last partial goes home
        back = plan.incoming_rows(step)
        incoming = None if back is None else _empty_message(_partial_parts(q, back), q.device)
        queries, arriving = plan.query_messages(rows_of, step + 1, empty)
        ring.start([], send=False, receive=False,
                   direct=[queries, plan.partial_messages(step, outgoing, incoming)])
        partial = None
        if step == 0:
            plan.kernel.fwd_into(o, lse, q, k, v, plan.blocks[0], plan.scale)
        elif step < world and visiting is not None:
            part_o, part_lse = plan.kernel.fwd(visiting, k, v, plan.blocks[step], plan.scale)
            partial = _pack(part_lse, part_o.to(q.dtype))
        ring.wait()
        if incoming is not None:
            lo, hi = back
            back_lse, back_o = _unpack(incoming, _partial_parts(q, back))
            merge_into(o[:, lo:hi], lse[:, :, lo:hi], back_o, back_lse)
        visiting, outgoing = arriving, partial
    return o, lse


def _direct_bwd(do, q, k, v, o, lse, dlse, dq, dk, dv, plan: TokenRingPlan):
    """The direct schedule's backward: query rows travel with their dO, lse and delta."""
    world = plan.info.world
    acc_dtype = accumulator_dtype(q.dtype)
    batch, _, heads, dim = q.shape
    lse_acc, delta = lse.to(acc_dtype), softmax_delta(do, o, dlse)

    def parts(n: int):
        return [((batch, heads, n), acc_dtype)] * 2 + [((batch, n, heads, dim), q.dtype)] * 2

    def rows_of(span: RowSpan) -> torch.Tensor:
        lo, hi = span
        return _pack(lse_acc[:, :, lo:hi], delta[:, :, lo:hi], q[:, lo:hi], do[:, lo:hi])

    def empty(n: int) -> torch.Tensor:
        return _empty_message(parts(n), q.device)

    ring = RingExchange(plan.info, Traffic.now("tokenring.bwd", plan.recorders))
    visiting, outgoing = None, None
    for step in range(world + 1):
        back = plan.incoming_rows(step)
        incoming = None if back is None else torch.empty(
            (batch, back[1] - back[0], heads, dim), dtype=acc_dtype, device=q.device)
        queries, arriving = plan.query_messages(rows_of, step + 1, empty)
        ring.start([], send=False, receive=False,
                   direct=[queries, plan.partial_messages(step, outgoing, incoming)])
        partial = None
        if step == 0:
            plan.kernel.bwd_into(dq, dk, dv, do, q, k, v, o, lse, dlse, plan.blocks[0],
                                 plan.scale)
        elif step < world and visiting is not None:
            n = plan.rows[step][1] - plan.rows[step][0]
            lse_v, delta_v, q_v, do_v = _unpack(visiting, parts(n))
            partial = torch.zeros((batch, n, heads, dim), dtype=acc_dtype, device=q.device)
            plan.kernel.bwd_into(partial, dk, dv, do_v, q_v, k, v, None, lse_v, None,
                                 plan.blocks[step], plan.scale, delta=delta_v)
        ring.wait()
        if incoming is not None:
            dq[:, back[0]:back[1]] += incoming
        visiting, outgoing = arriving, partial
    return dq, dk, dv


class TokenRingAttention(torch.autograd.Function):
    """Autograd wrapper: forward `tokenring_fwd`, backward `tokenring_bwd`; returns (o, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: TokenRingPlan):
        return finish_forward(ctx, q, k, v, plan, *tokenring_fwd(q, k, v, plan))

    @staticmethod
    def backward(ctx, do, dlse):
        return run_backward(ctx, do, dlse, tokenring_bwd)
