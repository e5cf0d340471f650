"""TokenRing backend vs the float64 reference on every rank (output, lse, dq, dk, dv), its
traffic against the documented formula, and the operations each step posts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.kernels import torch_cpu
from seqpar.layout import LAYOUTS
from seqpar.cost.traffic import tokenring_volume
from tests.attention_cases import (AttnCase, fp32_grid, low_precision_grid, odd_shape_grid,
                                   problem_of, run_case)

def tokenring_traffic(case: AttnCase, world: int, rank: int) -> dict[str, int]:
    """The documented formula (`seqpar.cost.traffic.tokenring_volume`, itself checked against
    a rule read off the layouts in tests/test_cost.py): bytes and messages this rank sends.
    Query blocks go on while a rank further along sees them; a partial goes home only for rows
    that see a key, and not at all when none does."""
    fwd, bwd = tokenring_volume(problem_of(case, world), rank)
    return {"bytes_fwd": fwd.bytes, "bytes_bwd": bwd.bytes, "messages_fwd": fwd.messages,
            "messages_bwd": bwd.messages}


def check_tokenring(case: AttnCase, group=None) -> dict:
    case = dataclasses.replace(case, backend="tokenring")
    errors = run_case(case, group)
    expected = tokenring_traffic(case, dist.get_world_size(group), dist.get_rank(group))
    for key, value in expected.items():
        assert errors[key] == value, (key, errors[key], value)
    return errors


@pytest.mark.parametrize("world,case", fp32_grid("tokenring"))
def test_tokenring_fp32(worlds, world, case):
    worlds(world).run(check_tokenring, case)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_tokenring_fp64_is_exact(worlds, world, layout, causal):
    """In float64 TokenRing must agree with the reference to ~1e-10: any algorithmic slip shows."""
    case = AttnCase(layout=layout, causal=causal, dtype=torch.float64, heads_q=6, heads_kv=3,
                    seq_local=10, head_dim=8, batch=2)
    worlds(world).run(check_tokenring, case)


@pytest.mark.parametrize("world,case", odd_shape_grid("tokenring", extra=(
    AttnCase(layout="striped", seq_local=5, heads_q=4, heads_kv=2, output_grad=False),
    AttnCase(layout="contiguous", seq_local=6, causal=False, output_grad=False),
)))
def test_tokenring_odd_shapes(worlds, world, case):
    worlds(world).run(check_tokenring, case)


@pytest.mark.parametrize("world,case", low_precision_grid("tokenring"))
def test_tokenring_low_precision(worlds, world, case):
    worlds(world).run(check_tokenring, case)


def check_on_subgroup() -> None:
    """Ranks {1, 2, 3} of 4: group ranks for the plan, global ranks for every peer."""
    sub = dist.new_group([1, 2, 3])
    if dist.get_rank() != 0:
        check_tokenring(AttnCase(layout="zigzag", heads_q=4, heads_kv=2), group=sub)
        check_tokenring(AttnCase(layout="contiguous", heads_q=4, heads_kv=2), group=sub)
    dist.barrier()


def test_tokenring_on_a_subgroup(worlds):
    worlds(4).run(check_on_subgroup)


def lost_partial_is_caught() -> bool:
    """Dropping the partials that come home (no merge) must fail the comparison."""
    case = AttnCase(backend="tokenring", layout="zigzag", seq_local=8)
    run_case(case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("seqpar.comm.tokenring.merge_into", lambda *args: None)
        try:
            run_case(case)
        except AssertionError:
            return True
    return False


def test_a_lost_partial_is_caught(worlds):
    assert worlds(2).run(lost_partial_is_caught) == [True, True]


# ---------------------------------------------------------------- what each step posts

def record_steps() -> dict[str, list]:
    """Record the point-to-point batches, local kernel calls and waits of one forward and one
    backward: {"fwd": [...], "bwd": [...]}, each event ("post", ops) | ("compute",) | ("wait",)."""
    events: list = []
    batch_isend_irecv = dist.batch_isend_irecv

    class RecordedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append(("wait",))
            return self.work.wait()

    def post(ops):
        events.append(("post", sorted((op.op.__name__, op.peer) for op in ops)))
        return [RecordedWork(w) for w in batch_isend_irecv(ops)]

    def computing(kernel):
        def run(*args, **kwargs):
            events.append(("compute",))
            return kernel(*args, **kwargs)
        return run

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 8, generator=g).requires_grad_() for _ in range(3))
    recorded = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "batch_isend_irecv", post)
        patch.setattr(torch_cpu, "flash_fwd", computing(torch_cpu.flash_fwd))
        patch.setattr(torch_cpu, "flash_bwd", computing(torch_cpu.flash_bwd))
        o = seqpar.attention(q, k, v, backend="tokenring", layout="zigzag")
        recorded["fwd"], events[:] = list(events), []
        o.sum().backward()
        recorded["bwd"] = list(events)
    return recorded


def test_each_step_posts_both_directions_before_waiting(worlds):
    """P = 4, zigzag (every block is computed). Step t posts, in one batch: queries to r + 1 and
    from r - 1 (steps 0 .. P-2), the partial of step t - 1 to its owner r - t + 1 and ours from
    r + t - 1 (steps 2 .. P); step 2 sends both ways. Each step's compute runs between its post
    and its first wait."""
    world = 4
    for rank, recorded in enumerate(worlds(world).run(record_steps)):
        for direction, events in recorded.items():
            posts = [i for i, e in enumerate(events) if e[0] == "post"]
            assert len(posts) == world + 1, (direction, events)
            for step, start in enumerate(posts):
                expected = []
                if step <= world - 2:
                    expected += [("isend", (rank + 1) % world), ("irecv", (rank - 1) % world)]
                if step >= 2:
                    expected += [("isend", (rank - step + 1) % world),
                                 ("irecv", (rank + step - 1) % world)]
                assert events[start][1] == sorted(expected), (rank, direction, step, events[start])
                end = posts[step + 1] if step + 1 < len(posts) else len(events)
                kinds = [e[0] for e in events[start + 1:end]]
                assert "wait" in kinds, (rank, direction, step, kinds)
                if step < world:  # the last post only brings the last partial home
                    assert "compute" in kinds[:kinds.index("wait")], (rank, direction, step, kinds)
            both_ways = events[posts[2]][1]
            assert ("isend", (rank + 1) % world) in both_ways and ("isend", (rank - 1) % world) in both_ways


# ---------------------------------------------------------------- malformed calls

def tokenring_rejects_bad_calls() -> list[str]:
    """The api edge's checks hold for this backend too; the group stays usable after."""
    from tests.test_errors import good, on_rank
    messages = []
    for call in (lambda: seqpar.attention(*good(seq_local=on_rank(1, 6, 8)), backend="tokenring",
                                          layout="contiguous"),
                 lambda: seqpar.attention(*good(seq_local=7), backend="tokenring", layout="zigzag")):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    seqpar.attention(*good(), backend="tokenring")
    return messages


def test_malformed_tokenring_calls_raise_on_every_rank(worlds):
    for rank, (lengths, odd) in enumerate(worlds(2).run(tokenring_rejects_bad_calls, timeout=60)):
        assert "local sequence length differs across ranks" in lengths, (rank, lengths)
        assert "local length must be even, got q.shape[1]=7" in odd, (rank, odd)
