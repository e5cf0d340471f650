"""Communication primitives every backend shares.

* `GroupInfo` / `resolve_group`: a process group (None = WORLD; no initialised default group =
  a one-rank group) with this rank's index and the group size, resolved once per call.
* `comm_stats()` / `Traffic`: byte accounting. Every message a backend sends is recorded per
  rank under an operation name ("ring.fwd", "ring.bwd", ...). Point-to-point traffic is exact;
  collectives are recorded at the volume of their bandwidth-optimal algorithm
  (all-gather: (P-1) shards sent and received; all-reduce: 2 (P-1) / P of the buffer).
* `RingExchange`: send to the next rank / receive from the previous one, asynchronously and
  double-buffered (the block being sent and computed on is never the one being received into),
  refusing misuse (wait before start, start twice). A step may also carry `DirectMessages` to
  and from any other rank, posted in the same batch before any wait: the bidirectional ring
  (TokenRing sends queries forward and partial results straight back to their owners).
* `agree`: one tiny all-reduce that makes every rank see the same verdict on its arguments, so
  a rank with bad input, or ranks with mismatched shapes, raise on *every* rank instead of
  leaving the others blocked in the next collective.
* `all_gather_along`: all-gather along any dimension.
* `start_all_gather` / `start_all_reduce`: the same collectives posted asynchronously
  (`async_op=True`), so a backend computes while they travel; `.wait()` returns the result.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
    """None -> WORLD (or a one-rank group when torch.distributed is not initialised)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected None or a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}; pass the process group the sequence is "
                        f"sharded over")
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


@dataclass
class CommStats:
    """Traffic of this rank, per operation name. Read it after the `comm_stats()` block."""

    ops: dict[str, OpTraffic] = field(default_factory=dict)

    def add(self, op: str, sent: int, received: int, messages: int) -> None:
        entry = self.ops.setdefault(op, OpTraffic())
        entry.bytes_sent += sent
        entry.bytes_received += received
        entry.messages += messages

    def sent(self, prefix: str = "") -> int:
        """Bytes sent by operations whose name starts with `prefix` (all by default)."""
        return sum(t.bytes_sent for name, t in self.ops.items() if name.startswith(prefix))

    def received(self, prefix: str = "") -> int:
        return sum(t.bytes_received for name, t in self.ops.items() if name.startswith(prefix))

    @property
    def bytes_sent(self) -> int:
        return self.sent()

    @property
    def bytes_received(self) -> int:
        return self.received()


_active_stats: contextvars.ContextVar[tuple[CommStats, ...]] = contextvars.ContextVar(
    "seqpar_active_comm_stats", default=())


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the bytes this rank sends and receives inside the block (nesting allowed).

    Backward passes are counted by the blocks active when their forward ran *and* by those
    active where backward is called, so `with comm_stats() as s: loss.backward()` works too.
    """
    stats = CommStats()
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

    def add(self, sent: int, received: int, messages: int = 1) -> None:
        for stats in self.recorders:
            stats.add(self.op, sent, received, messages)


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
              direct: DirectMessages | None = None) -> None:
        if self._pending is not None:
            raise RuntimeError("RingExchange.start: the previous exchange was not waited for; "
                               "call wait() once per start()")
        tensors = list(tensors)
        for t in tensors:
            if send and not t.is_contiguous():
                raise ValueError("RingExchange.start: tensors must be contiguous")
        direct = direct or DirectMessages()
        direct_ops = self._direct_ops(direct)
        group = self.info.group
        sent = tensors if send else []
        receive_into = self._free_buffer_set(tensors) if receive else []
        # One batch: both directions are posted before anything is waited for.
        ops = ([dist.P2POp(dist.isend, t, self.send_peer, group) for t in sent]
               + [dist.P2POp(dist.irecv, b, self.recv_peer, group) for b in receive_into]
               + direct_ops)
        requests = dist.batch_isend_irecv(ops) if ops else []
        self.traffic.add(nbytes(sent) + nbytes(direct.send),
                         nbytes(receive_into) + nbytes(direct.receive),
                         len(sent) + len(direct.send))
        self._pending = (requests, receive_into)

    def wait(self) -> list[torch.Tensor]:
        """The ring receive buffers (empty with receive=False); direct receives are filled too."""
        if self._pending is None:
            raise RuntimeError("RingExchange.wait: no exchange in flight; call start() first")
        requests, receive = self._pending
        self._pending = None
        for request in requests:
            request.wait()
        return receive


# ---------------------------------------------------------------- collectives

def all_reduce_bytes(nbytes_total: int, world: int) -> int:
    """Bytes a rank sends (and receives) in a bandwidth-optimal all-reduce of `nbytes_total`:
    a reduce-scatter and an all-gather, each of (P - 1) shards of ceil(nbytes / P)."""
    return 2 * (world - 1) * -(-nbytes_total // world)


@dataclass
class PendingCollective:
    """A collective in flight: `wait()` blocks until it is done and returns its result."""

    work: object | None
    result: torch.Tensor

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
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
    traffic.add(nbytes([x]) * (info.world - 1), nbytes([x]) * (info.world - 1), info.world - 1)
    return PendingCollective(work, gathered)


def start_all_reduce(x: torch.Tensor, info: GroupInfo, traffic: Traffic) -> PendingCollective:
    """Post a sum all-reduce of a copy of `x`; the result is the sum over ranks, shaped like x."""
    total = x.contiguous().clone()
    if info.world == 1:
        return PendingCollective(None, total)
    work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=info.group, async_op=True)
    moved = all_reduce_bytes(nbytes([total]), info.world)
    traffic.add(moved, moved, 2 * (info.world - 1))
    return PendingCollective(work, total)


def all_gather_along(x: torch.Tensor, info: GroupInfo, dim: int, op: str,
                     traffic: Traffic | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape everywhere) along `dim`, in rank order."""
    if info.world == 1:
        return x
    gathered = start_all_gather(x, info, traffic or Traffic.now(op)).wait()
    return torch.cat(list(gathered.unbind(0)), dim=dim)


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
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=info.group)
    moved = all_reduce_bytes(packed.numel() * 8, info.world)
    Traffic.now("agree").add(moved, moved, 2 * (info.world - 1))
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
