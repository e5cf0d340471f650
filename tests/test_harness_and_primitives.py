"""The multi-process harness never hangs; the ring exchange and byte accounting behave."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.primitives import DirectMessages, RingExchange, Traffic, resolve_group
from tests.harness import RankFailure, StaleResult, World, WorldPool, WorldTimeout


def fail_on_rank_one_while_rank_zero_waits():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 broke")
    dist.barrier()  # rank 0 would wait here forever (until the gloo timeout) without the harness


def sleep_forever():
    time.sleep(3600)


def test_a_failing_rank_fails_the_test_fast():
    world = World(2)
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 broke"):
        world.run(fail_on_rank_one_while_rank_zero_waits, grace=2)
    assert time.monotonic() - start < 30
    assert world.broken  # killed, so nothing is left blocked in a collective


def test_a_hanging_case_times_out():
    world = World(2)
    with pytest.raises(WorldTimeout, match="did not finish"):
        world.run(sleep_forever, timeout=3)
    assert world.broken


def answer_after(seconds: float, answer: str) -> str:
    time.sleep(seconds)
    return answer


class Interrupted(Exception):
    """What pytest-timeout's signal method raises in the test while a case is collected."""


def test_an_interrupted_case_cannot_leak_into_the_next_one():
    """A run interrupted from outside kills its world; the next case on that size gets a fresh
    world and its own answer, never the interrupted case's late one."""
    import signal

    pool = WorldPool()
    try:
        world = pool(2)
        previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Interrupted()))
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            with pytest.raises(Interrupted):
                world.run(answer_after, 3.0, "late answer of the interrupted case", timeout=60)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert world.broken
        time.sleep(3.0)  # the interrupted case would have answered by now
        fresh = pool(2)
        assert fresh is not world
        assert fresh.run(answer_after, 0.0, "next case") == ["next case", "next case"]
    finally:
        pool.close()


def test_a_result_of_another_case_is_an_error():
    """Results carry their case's id: one of another case fails the run and kills the world."""
    world = World(2)
    assert world.run(answer_after, 0.0, "first") == ["first", "first"]
    world._results.put((0, 1, "ok", "first, again"))  # a stray answer of case #1
    with pytest.raises(StaleResult, match=r"rank 0 answered case #1 while case #2"):
        world.run(answer_after, 0.5, "second")
    assert world.broken


def ring_exchange_behaviour():
    info = resolve_group(None)
    ring = RingExchange(info, Traffic.now("test"))
    with pytest.raises(RuntimeError, match="no exchange in flight; call start"):
        ring.wait()
    block = torch.full((3,), float(info.rank))
    ring.start([block])
    with pytest.raises(RuntimeError, match="previous exchange was not waited for"):
        ring.start([block])
    first = ring.wait()[0]
    seen = [first[0].item()]
    ring.start([first])
    second = ring.wait()[0]
    seen.append(second[0].item())
    ring.start([second])
    third = ring.wait()[0]
    seen.append(third[0].item())
    # two alternating receive buffers, never the one being sent
    assert first.data_ptr() != second.data_ptr() and third.data_ptr() == first.data_ptr()
    with pytest.raises(ValueError, match="must be contiguous"):
        ring.start([torch.zeros(3, 2).t()])
    return seen


def test_ring_exchange_passes_blocks_around_and_refuses_misuse(worlds):
    received = worlds(3).run(ring_exchange_behaviour)
    # rank r receives the blocks of r-1, r-2, r-3 in turn
    assert received == [[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]]


def direct_messages_behaviour():
    """A ring step that also sends to / receives from non-neighbours, and one with only those."""
    info = resolve_group(None)
    r, p = info.rank, info.world
    with seqpar.comm_stats() as stats:
        ring = RingExchange(info, Traffic.now("test"))
        reply = torch.empty(3)
        ring.start([torch.full((2,), float(r))],
                   direct=DirectMessages(send=[torch.full((3,), 10.0 + r)], to=(r + 2) % p,
                                         receive=[reply], source=(r - 2) % p))
        ring_block = ring.wait()[0]
        alone = torch.empty(1)
        ring.start([ring_block], send=False, receive=False,
                   direct=DirectMessages(send=[torch.ones(1) * r], to=(r - 2) % p,
                                         receive=[alone], source=(r + 2) % p))
        assert ring.wait() == []
    with pytest.raises(ValueError, match="direct send needs another rank of the group as its peer"):
        ring.start([ring_block], direct=DirectMessages(send=[reply], to=r))
    return ring_block[0].item(), reply[0].item(), alone.item(), stats.sent("test"), stats.ops["test"].messages


def test_ring_exchange_carries_direct_messages(worlds):
    # 4 ranks: ring from r - 1, direct from r - 2, then direct alone from r + 2
    results = worlds(4).run(direct_messages_behaviour)
    assert results == [((r - 1) % 4, 10.0 + (r - 2) % 4, (r + 2) % 4, 4 * (2 + 3 + 1), 3)
                       for r in range(4)]


def nested_stats():
    q = torch.randn(1, 4, 2, 8)
    with seqpar.comm_stats() as outer:
        with seqpar.comm_stats() as inner:
            seqpar.attention(q, q, q, layout="contiguous")
        seqpar.attention(q, q, q, layout="contiguous")
    return outer.sent("ring.fwd"), inner.sent("ring.fwd"), outer.ops["ring.fwd"].messages


def test_comm_stats_nest(worlds):
    kv = 2 * 4 * 2 * 8 * 4
    assert worlds(2).run(nested_stats) == [(2 * kv, kv, 2)] * 2
