"""Communication primitives every backend shares.

* `GroupInfo` / `resolve_group`: a process group (None = WORLD; no initialised default group =
  a one-rank group) with this rank's index and the group size, resolved once per call.
* `comm_stats()` / `Traffic`: byte accounting. Every message a backend sends is recorded per
  rank under an operation name ("ring.fwd", "ring.bwd", ...), in total and per peer (global
  rank), counted where tensors are handed to torch.distributed, from the sizes of what is
  passed: point-to-point, each tensor sent / received; all-to-all, the piece for each other rank
  and the piece from it; all-gather, this rank's tensor to each other rank and each other
  rank's slot of the output; reduce-scatter, the part of the input reduced into each other
  rank's output and one output-sized contribution from each. An all-reduce hands over one whole
  buffer and has no per-peer split at the API: it is recorded per peer as its bandwidth-optimal
  decomposition (reduce-scatter + all-gather: 2 shards of ceil(bytes / P) with every other
  rank).
  `comm_stats(time_waits=True)` also records, per operation, the seconds this rank spent
  blocked on its communication: every wait on a posted exchange or collective, and the whole
  of every synchronous collective. That is the communication left exposed after overlap (time
  the transfer still needed once the computation posted beside it was done, plus time waiting
  for a slower peer to send); on CUDA the device is synchronised around each wait, so queued
  kernels are not counted as waiting.
* `RingExchange`: send to the next rank / receive from the previous one, asynchronously and
  double-buffered (the block being sent and computed on is never the one being received into),
  refusing misuse (wait before start, start twice). A step may also carry `DirectMessages` to
  and from any other rank, posted in the same batch before any wait: the bidirectional ring
  (TokenRing sends queries forward and partial results straight back to their owners).
* `agree`: one tiny all-reduce that makes every rank see the same verdict on its arguments, so
  a rank with bad input, or ranks with mismatched shapes, raise on *every* rank instead of
  leaving the others blocked in the next collective.
* `start_all_gather` / `start_all_reduce`: collectives posted asynchronously
  (`async_op=True`), so a backend computes while they travel; `.wait()` returns the result.
* Redistribution along the sequence, each with byte accounting and an autograd-aware form
  (the backward of each is the other direction):
  - `seq_to_heads` / `heads_to_seq`: the Ulysses all-to-all between
    sequence-sharded [B, S_loc, H, D] and head-sharded [B, P * S_loc, n, D], placing tokens in
    the order `HeadSplit.slots` gives (global order for a layout gathered whole), heads as
    `HeadSplit.heads` says (a head may go to several ranks: the way back sums them);
  - `gather_tokens` / `reduce_scatter_tokens`: every rank's tokens on every rank, in slot
    order, and the sum of the ranks' full-sequence copies back to each token's owner;
  `redistribute(fn, x, ...)` is the differentiable form of each (its backward is the adjoint).
  `all_gather_along` is `gather_tokens` in rank order.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")


# ---------------------------------------------------------------- groups

@dataclass(frozen=True)
class GroupInfo:
    """A process group as the backends see it: `group` is None for a one-rank run."""

    group: dist.ProcessGroup | None
    rank: int
    world: int

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def comm_device(self, fallback: torch.device) -> torch.device:
        """Where small bookkeeping tensors must live for this group's backend."""
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return fallback if fallback.type == "cpu" else torch.device("cpu")


def resolve_group(group) -> GroupInfo:
    """None -> WORLD (or a one-rank group when torch.distributed is not initialised); a mesh
    (seqpar.SPMesh: anything carrying its whole group as a `GroupInfo` in `.info`) -> that
    whole sequence-parallel group."""
    if isinstance(getattr(group, "info", None), GroupInfo):
        return group.info
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected None, a torch.distributed.ProcessGroup or a "
                        f"seqpar.SPMesh, got {type(group).__name__}; pass the process group "
                        f"the sequence is sharded over")
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group: a ProcessGroup was passed but torch.distributed is not "
                             "initialised; call torch.distributed.init_process_group first")
        return GroupInfo(None, 0, 1)
    pg = group if group is not None else dist.group.WORLD
    return GroupInfo(pg, dist.get_rank(pg), dist.get_world_size(pg))


# ---------------------------------------------------------------- byte accounting

@dataclass
class OpTraffic:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    wait_seconds: float = 0.0  # blocked on this op's communication (time_waits=True only)
    sent_to: dict[int, int] = field(default_factory=dict)  # global rank -> bytes
    received_from: dict[int, int] = field(default_factory=dict)


@dataclass
class CommStats:
    """Traffic of this rank, per operation name. Read it after the `comm_stats()` block.

    time_waits: also time the waits on communication (`waited`)."""

    ops: dict[str, OpTraffic] = field(default_factory=dict)
    time_waits: bool = False

    def add(self, op: str, sent_to: dict[int, int], received_from: dict[int, int],
            messages: int) -> None:
        entry = self.ops.setdefault(op, OpTraffic())
        for peer, n in sent_to.items():
            entry.sent_to[peer] = entry.sent_to.get(peer, 0) + n
            entry.bytes_sent += n
        for peer, n in received_from.items():
            entry.received_from[peer] = entry.received_from.get(peer, 0) + n
            entry.bytes_received += n
        entry.messages += messages

    def add_wait(self, op: str, seconds: float) -> None:
        self.ops.setdefault(op, OpTraffic()).wait_seconds += seconds

    def waited(self, prefix: str = "") -> float:
        """Seconds blocked on the communication of operations whose name starts with `prefix`:
        the communication time left exposed after overlap (needs time_waits=True)."""
        return sum(t.wait_seconds for name, t in self.ops.items() if name.startswith(prefix))

    def sent(self, prefix: str = "") -> int:
        """Bytes sent by operations whose name starts with `prefix` (all by default)."""
        return sum(t.bytes_sent for name, t in self.ops.items() if name.startswith(prefix))

    def received(self, prefix: str = "") -> int:
        return sum(t.bytes_received for name, t in self.ops.items() if name.startswith(prefix))

    def sent_to(self, prefix: str = "") -> dict[int, int]:
        """Bytes sent per peer (global rank) by operations whose name starts with `prefix`."""
        peers: dict[int, int] = {}
        for name, t in self.ops.items():
            if name.startswith(prefix):
                for peer, n in t.sent_to.items():
                    peers[peer] = peers.get(peer, 0) + n
        return peers

    @property
    def bytes_sent(self) -> int:
        return self.sent()

    @property
    def bytes_received(self) -> int:
        return self.received()


_active_stats: contextvars.ContextVar[tuple[CommStats, ...]] = contextvars.ContextVar(
    "seqpar_active_comm_stats", default=())


@contextlib.contextmanager
def comm_stats(time_waits: bool = False) -> Iterator[CommStats]:
    """Count the bytes this rank sends and receives inside the block (nesting allowed).

    Backward passes are counted by the blocks active when their forward ran *and* by those
    active where backward is called, so `with comm_stats() as s: loss.backward()` works too.
    time_waits=True also records the seconds blocked on communication (`CommStats.waited`);
    on CUDA that synchronises the device around every wait, so keep it for measurements.
    """
    stats = CommStats(time_waits=time_waits)
    token = _active_stats.set(_active_stats.get() + (stats,))
    try:
        yield stats
    finally:
        _active_stats.reset(token)


@dataclass(frozen=True)
class Traffic:
    """Where one operation's bytes are recorded: the op name and the recorders to add to."""

    op: str
    recorders: tuple[CommStats, ...]

    @classmethod
    def now(cls, op: str, also: tuple[CommStats, ...] = ()) -> "Traffic":
        active = _active_stats.get()
        return cls(op, active + tuple(r for r in also if all(r is not a for a in active)))

    def add(self, sent_to: dict[int, int], received_from: dict[int, int],
            messages: int | None = None) -> None:
        """Record bytes handed to torch.distributed, per peer (global rank); messages default
        to one per peer sent to."""
        if messages is None:
            messages = sum(1 for n in sent_to.values() if n)
        for stats in self.recorders:
            stats.add(self.op, sent_to, received_from, messages)

    def add_collective(self, info: GroupInfo, sent: Sequence[int], received: Sequence[int]
                       ) -> None:
        """A collective: sent[p] / received[p] bytes to / from group rank p (own entry left
        out), from the sizes of the tensors handed over."""
        others = [p for p in range(info.world) if p != info.rank]
        self.add({info.global_rank(p): sent[p] for p in others},
                 {info.global_rank(p): received[p] for p in others})

    def wait(self, blocking: Callable[[], _T]) -> _T:
        """Run `blocking` (a wait on this op's communication, or a synchronous collective) and
        add the seconds it blocked to the recorders that time waits."""
        timers = [stats for stats in self.recorders if stats.time_waits]
        if not timers:
            return blocking()
        _synchronize_device()  # queued kernels finish first: they are computation, not waiting
        start = time.perf_counter()
        result = blocking()
        _synchronize_device()  # a CUDA wait only orders streams; the transfer ends here
        for stats in timers:
            stats.add_wait(self.op, time.perf_counter() - start)
        return result


def _synchronize_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def active_recorders() -> tuple[CommStats, ...]:
    return _active_stats.get()


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- ring exchange

@dataclass(frozen=True)
class DirectMessages:
    """Messages a ring step also posts, to and from ranks other than its ring neighbours.

    `send` goes to group rank `to`, `receive` (buffers the caller owns, filled once the step's
    `wait()` returns) comes from group rank `source`; either side may be empty.
    """

    send: Sequence[torch.Tensor] = ()
    to: int | None = None
    receive: Sequence[torch.Tensor] = ()
    source: int | None = None


class RingExchange:
    """Point-to-point ring step: send to rank (r + shift) mod P, receive from (r - shift) mod P.

    Usage, one step per block:

        ring.start([kv])      # post send of kv and receive of the next block, return at once
        ... compute on kv ...
        kv = ring.wait()[0]   # the received block

    Receive buffers are two alternating sets allocated on first use, so the set being sent
    (and computed on) is never received into. Peers are resolved to global ranks once.

    Bidirectional use: `start(tensors, direct=DirectMessages(...))` posts the ring send and
    receive *and* the direct messages in one `batch_isend_irecv`, so both directions of the
    links are busy during the compute that follows. `send=False` / `receive=False` leave out
    the ring send / receive of a step (`tensors` then only give the receive buffers' shapes):
    a block nobody further along needs is not forwarded.
    """

    def __init__(self, info: GroupInfo, traffic: Traffic, shift: int = 1):
        if info.world < 2:
            raise ValueError("RingExchange needs a group of at least 2 ranks")
        self.info = info
        self.traffic = traffic
        self.send_peer = info.global_rank((info.rank + shift) % info.world)
        self.recv_peer = info.global_rank((info.rank - shift) % info.world)
        self._buffer_sets: list[list[torch.Tensor] | None] = [None, None]
        self._pending: tuple[list, list[torch.Tensor]] | None = None

    def _free_buffer_set(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sending = {t.data_ptr() for t in tensors}
        for i, buffers in enumerate(self._buffer_sets):
            if buffers is None:
                buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
                self._buffer_sets[i] = buffers
            if all(b.data_ptr() not in sending for b in buffers):
                if [(b.shape, b.dtype) for b in buffers] != [(t.shape, t.dtype) for t in tensors]:
                    raise ValueError("RingExchange: every step must send tensors of the same "
                                     "shapes and dtypes")
                return buffers
        raise RuntimeError("RingExchange: both receive buffers are being sent")

    def _direct_ops(self, direct: DirectMessages) -> list:
        for name, tensors, peer in (("send", direct.send, direct.to),
                                    ("receive", direct.receive, direct.source)):
            if tensors and not (isinstance(peer, int) and 0 <= peer < self.info.world
                                and peer != self.info.rank):
                raise ValueError(f"RingExchange.start: direct {name} needs another rank of the "
                                 f"group as its peer, got {peer!r}")
            if any(not t.is_contiguous() for t in tensors):
                raise ValueError("RingExchange.start: tensors must be contiguous")
        group = self.info.group
        ops = [dist.P2POp(dist.isend, t, self.info.global_rank(direct.to), group)
               for t in direct.send]
        ops += [dist.P2POp(dist.irecv, b, self.info.global_rank(direct.source), group)
                for b in direct.receive]
        return ops

    def start(self, tensors: Sequence[torch.Tensor], *, send: bool = True, receive: bool = True,
              direct: DirectMessages | Sequence[DirectMessages] | None = None) -> None:
        """Post the step. `direct`: one `DirectMessages` or several (each its own peers),
        posted in the order given -- every rank must list them in the same order."""
        if self._pending is not None:
            raise RuntimeError("RingExchange.start: the previous exchange was not waited for; "
                               "call wait() once per start()")
        tensors = list(tensors)
        for t in tensors:
            if send and not t.is_contiguous():
                raise ValueError("RingExchange.start: tensors must be contiguous")
        directs = [direct] if isinstance(direct, DirectMessages) else list(direct or ())
        direct_ops = [op for d in directs for op in self._direct_ops(d)]
        group = self.info.group
        sent = tensors if send else []
        receive_into = self._free_buffer_set(tensors) if receive else []
        # One batch: both directions are posted before anything is waited for.
        ops = ([dist.P2POp(dist.isend, t, self.send_peer, group) for t in sent]
               + [dist.P2POp(dist.irecv, b, self.recv_peer, group) for b in receive_into]
               + direct_ops)
        requests = dist.batch_isend_irecv(ops) if ops else []
        sent_to: dict[int, int] = {}
        received_from: dict[int, int] = {}
        for peers, peer, tensors in ((sent_to, self.send_peer, sent),
                                     (received_from, self.recv_peer, receive_into)):
            if tensors:
                peers[peer] = peers.get(peer, 0) + nbytes(tensors)
        for d in directs:
            if d.send:
                to = self.info.global_rank(d.to)
                sent_to[to] = sent_to.get(to, 0) + nbytes(d.send)
            if d.receive:
                source = self.info.global_rank(d.source)
                received_from[source] = received_from.get(source, 0) + nbytes(d.receive)
        self.traffic.add(sent_to, received_from, len(sent) + sum(len(d.send) for d in directs))
        self._pending = (requests, receive_into)

    def wait(self) -> list[torch.Tensor]:
        """The ring receive buffers (empty with receive=False); direct receives are filled too."""
        if self._pending is None:
            raise RuntimeError("RingExchange.wait: no exchange in flight; call start() first")
        requests, receive = self._pending
        self._pending = None
        self.traffic.wait(lambda: [request.wait() for request in requests])
        return receive


# ---------------------------------------------------------------- collectives

def _record_all_reduce(buffer: torch.Tensor, info: GroupInfo, traffic: Traffic) -> None:
    """An all-reduce hands over one whole buffer: recorded per peer as its bandwidth-optimal
    decomposition, a reduce-scatter and an all-gather of P shards of ceil(bytes / P), so 2 shards
    to and from every other rank (2 messages each)."""
    per_peer = [2 * -(-nbytes([buffer]) // info.world)] * info.world
    others = [p for p in range(info.world) if p != info.rank]
    traffic.add({info.global_rank(p): per_peer[p] for p in others},
                {info.global_rank(p): per_peer[p] for p in others}, 2 * len(others))


# Renamed in torch 2.13 (the old names warn); older releases have only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class PendingCollective:
    """A collective in flight: `wait()` blocks until it is done and returns its result."""

    work: object | None
    result: torch.Tensor
    traffic: Traffic | None = None  # where the time blocked in wait() is recorded

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            if self.traffic is None:
                self.work.wait()
            else:
                self.traffic.wait(self.work.wait)
            self.work = None
        return self.result


def start_all_gather(x: torch.Tensor, info: GroupInfo, traffic: Traffic) -> PendingCollective:
    """Post an all-gather of `x` (same shape on every rank); the result is [P, *x.shape] in
    rank order. Recorded as (P - 1) copies of `x` sent and received."""
    x = x.contiguous()
    if info.world == 1:
        return PendingCollective(None, x.unsqueeze(0))
    gathered = torch.empty((info.world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    work = dist.all_gather(list(gathered.unbind(0)), x, group=info.group, async_op=True)
    traffic.add_collective(info, [nbytes([x])] * info.world, [nbytes([g]) for g in gathered])
    return PendingCollective(work, gathered, traffic)


def start_all_reduce(x: torch.Tensor, info: GroupInfo, traffic: Traffic) -> PendingCollective:
    """Post a sum all-reduce of a copy of `x`; the result is the sum over ranks, shaped like x."""
    total = x.contiguous().clone()
    if info.world == 1:
        return PendingCollective(None, total)
    work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=info.group, async_op=True)
    _record_all_reduce(total, info, traffic)
    return PendingCollective(work, total, traffic)


def _split_dim(x: torch.Tensor, dim: int, outer: int) -> torch.Tensor:
    """View dim `dim` of size outer * inner as two dims (outer, inner)."""
    return x.reshape(x.shape[:dim] + (outer, x.shape[dim] // outer) + x.shape[dim + 1:])


def _rank_major(x: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """[..., world * n, ...] -> contiguous [world, ..., n, ...]: piece p of dim `dim` first."""
    return _split_dim(x, dim, world).movedim(dim, 0).contiguous()


def _concat_pieces(pieces: torch.Tensor, dim: int) -> torch.Tensor:
    """[world, ..., n, ...] -> [..., world * n, ...]: the pieces side by side along `dim`."""
    return pieces.movedim(0, dim).flatten(dim, dim + 1)


def _pick_tokens(x: torch.Tensor, slots: torch.Tensor | None, dim: int, world: int) -> torch.Tensor:
    """[world, ..., n, ...]: the tokens of `x` (dim `dim`) that go to each rank, in its order."""
    if slots is not None:
        x = x.index_select(dim, slots.flatten().to(x.device))
    return _rank_major(x, dim, world)


def _place_tokens(pieces: torch.Tensor, slots: torch.Tensor | None, dim: int) -> torch.Tensor:
    """[world, ..., n, ...] received per rank -> [..., world * n, ...] in slot order."""
    if slots is None:
        return _concat_pieces(pieces, dim)
    shape = list(pieces.shape[1:])
    shape[dim] *= pieces.shape[0]
    out = pieces.new_empty(shape)
    for rank, piece in enumerate(pieces):
        out.index_copy_(dim, slots[rank].to(out.device), piece)
    return out


def _all_to_all(pieces: torch.Tensor, info: GroupInfo, traffic: Traffic) -> torch.Tensor:
    """pieces[p] goes to rank p; returns what every rank sent here, indexed by sender."""
    if info.world == 1:
        return pieces
    received = torch.empty_like(pieces)
    traffic.wait(lambda: dist.all_to_all_single(received.view(-1), pieces.view(-1),
                                                group=info.group))
    traffic.add_collective(info, [nbytes([p]) for p in pieces], [nbytes([p]) for p in received])
    return received


@dataclass(frozen=True, eq=False)
class HeadSplit:
    """Where heads and tokens go in the all-to-all between sequence- and head-sharded tensors.

    heads [P, n]: the heads (indices into the sequence-sharded side's `total_heads`) rank p holds
    on the head-sharded side, n per rank. A head listed for several ranks is replicated to each
    (K/V heads shared by query heads on several ranks); the way back sums the copies.
    slots [P, S_loc] or None: where rank p's t-th local token sits in the head-sharded sequence
    of P * S_loc tokens; None means rank-major (rank p's tokens at [p * S_loc, (p + 1) * S_loc)).
    """

    info: GroupInfo
    heads: torch.Tensor
    total_heads: int
    slots: torch.Tensor | None

    @property
    def is_partition(self) -> bool:
        """Rank p holds heads [p * n, (p + 1) * n): no copies, no index lists."""
        return (self.heads.numel() == self.total_heads
                and torch.equal(self.heads.flatten(), torch.arange(self.total_heads)))

    @property
    def replicates(self) -> bool:
        """Some head is held by several ranks, so the way back adds contributions."""
        return self.heads.flatten().unique().numel() < self.heads.numel()


def seq_to_heads(x: torch.Tensor, split: HeadSplit, seq_dim: int, head_dim: int,
                 traffic: Traffic) -> torch.Tensor:
    """Sequence-sharded x (S_loc tokens at `seq_dim`, all heads at `head_dim`) -> this rank's
    heads `split.heads[rank]` over the P * S_loc tokens of the group, in slot order."""
    if not split.is_partition:
        x = x.index_select(head_dim, split.heads.flatten().to(x.device))
    pieces = _rank_major(x, head_dim, split.info.world)
    return _place_tokens(_all_to_all(pieces, split.info, traffic), split.slots, seq_dim)


def heads_to_seq(x: torch.Tensor, split: HeadSplit, seq_dim: int, head_dim: int,
                 traffic: Traffic, sum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of `seq_to_heads`: head-sharded x -> this rank's tokens with all heads.

    A head held by several ranks comes back as the sum of their copies, added in `sum_dtype`
    (default: x's dtype) -- the adjoint of replicating it, as backward passes need.
    """
    world = split.info.world
    received = _all_to_all(_pick_tokens(x, split.slots, seq_dim, world), split.info, traffic)
    if split.is_partition:
        return _concat_pieces(received, head_dim)
    sum_dtype = sum_dtype or x.dtype
    shape = list(received.shape[1:])
    shape[head_dim] = split.total_heads
    out = torch.zeros(shape, dtype=sum_dtype, device=x.device)
    out.index_add_(head_dim, split.heads.flatten().to(x.device),
                   _concat_pieces(received, head_dim).to(sum_dtype))
    return out


def gather_tokens(x: torch.Tensor, info: GroupInfo, slots: torch.Tensor | None, seq_dim: int,
                  traffic: Traffic) -> torch.Tensor:
    """Every rank's x (same shape everywhere) side by side along `seq_dim`, in slot order
    (None: rank order). One all-gather."""
    if info.world == 1 and slots is None:
        return x
    return _place_tokens(gather_pieces(x, info, traffic), slots, seq_dim)


def gather_pieces(x: torch.Tensor, info: GroupInfo, traffic: Traffic) -> torch.Tensor:
    """[world, *x.shape]: every rank's x (same shape everywhere), piece p from rank p. One
    all-gather."""
    x = x.contiguous()
    pieces = x.new_empty((info.world,) + tuple(x.shape))
    if info.world > 1:
        traffic.wait(lambda: all_gather_single(pieces.view(-1), x.view(-1), group=info.group))
        traffic.add_collective(info, [nbytes([x])] * info.world, [nbytes([p]) for p in pieces])
    else:
        pieces[0] = x
    return pieces


def reduce_scatter_tokens(x: torch.Tensor, info: GroupInfo, slots: torch.Tensor | None,
                          seq_dim: int, traffic: Traffic) -> torch.Tensor:
    """The adjoint of `gather_tokens`: every rank holds a full-sequence x; returns, for this
    rank's tokens, the sum over ranks of their rows. One reduce-scatter."""
    return reduce_scatter_pieces(_pick_tokens(x, slots, seq_dim, info.world), info, traffic)


def reduce_scatter_pieces(pieces: torch.Tensor, info: GroupInfo, traffic: Traffic) -> torch.Tensor:
    """pieces [world, ...] contiguous, piece p this rank's contribution to rank p; returns the
    sum over ranks of their piece for this rank. One reduce-scatter."""
    if info.world == 1:
        return pieces[0]
    out = pieces.new_empty(pieces.shape[1:])
    traffic.wait(lambda: reduce_scatter_single(out.view(-1), pieces.view(-1), group=info.group))
    # each other rank's part of the input goes into its output; one out-sized part comes back
    traffic.add_collective(info, [nbytes([p]) for p in pieces], [nbytes([out])] * info.world)
    return out


def all_gather_along(x: torch.Tensor, info: GroupInfo, dim: int, op: str,
                     traffic: Traffic | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape everywhere) along `dim`, in rank order."""
    return gather_tokens(x, info, None, dim, traffic or Traffic.now(op))


class Redistribute(torch.autograd.Function):
    """Autograd for one of the redistributions above: forward runs it, backward its adjoint
    (`ADJOINT`), with the same arguments. Traffic goes to `op + ".fwd"` / `op + ".bwd"`, counted
    by the comm_stats blocks active at forward and at backward."""

    @staticmethod
    def forward(ctx, x, fn, args: tuple, op: str):
        traffic = Traffic.now(f"{op}.fwd")
        ctx.adjoint, ctx.args, ctx.op, ctx.recorders = ADJOINT[fn], args, op, traffic.recorders
        return fn(x, *args, traffic)

    @staticmethod
    def backward(ctx, grad):
        traffic = Traffic.now(f"{ctx.op}.bwd", ctx.recorders)
        return ctx.adjoint(grad.contiguous(), *ctx.args, traffic), None, None, None


ADJOINT = {seq_to_heads: heads_to_seq, heads_to_seq: seq_to_heads,
           gather_tokens: reduce_scatter_tokens, reduce_scatter_tokens: gather_tokens}


def redistribute(fn, x: torch.Tensor, *args, op: str) -> torch.Tensor:
    """Differentiable `fn(x, *args)` for fn in `ADJOINT`, e.g.
    ``redistribute(seq_to_heads, q, split, 1, 2, op="mylayer")``."""
    return Redistribute.apply(x, fn, args, op)


def agree(info: GroupInfo, where: str, values: dict[str, int], local_error: Exception | None,
          device: torch.device) -> None:
    """Raise on every rank if any rank's arguments are bad or the ranks' arguments disagree.

    `values` are integers every rank must have equal (local length, heads, dtype code, ...),
    under the same keys on every rank; `local_error` is this rank's own verdict, raised here
    (its type kept, prefixed with `where`), while the other ranks raise a ValueError naming
    the first bad rank. One all-reduce(MAX) of
    [error flag, P - first bad rank, v_1, -v_1, v_2, -v_2, ...] gives every rank the flags and
    both the max and the min of each value.
    """
    if info.world == 1:
        if local_error is not None:
            raise type(local_error)(f"{where}: {local_error}")
        return
    names = list(values)
    failed = local_error is not None
    vector = [int(failed), info.world - info.rank if failed else 0]
    for name in names:
        vector += [int(values[name]), -int(values[name])]
    packed = torch.tensor(vector, dtype=torch.int64, device=info.comm_device(device))
    traffic = Traffic.now("agree")
    traffic.wait(lambda: dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=info.group))
    _record_all_reduce(packed, info, traffic)
    result = packed.tolist()
    if failed:
        raise type(local_error)(f"{where}: {local_error}")
    if result[0]:
        raise ValueError(f"{where}: rank {info.world - result[1]} of the group rejected its "
                         f"arguments (its error says why); every rank raises so none waits forever")
    for i, name in enumerate(names):
        high, low = result[2 + 2 * i], -result[3 + 2 * i]
        if high != low:
            raise ValueError(f"{where}: {name} differs across ranks (this rank: {values[name]}, "
                             f"min: {low}, max: {high}); every rank of the group must pass the "
                             f"same {name}")
