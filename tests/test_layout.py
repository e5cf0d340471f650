"""Sharding plans: positions, shard/gather round trips, gather's gradient, divisibility errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.inference import ShardedKVCache
from seqpar.kernels import runs_to_positions
from seqpar.layout import LAYOUTS, local_runs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_every_token_lives_on_exactly_one_rank(world, layout):
    seq = 2 * world * 3
    held = torch.cat([runs_to_positions(local_runs(seq, world, r, layout)) for r in range(world)])
    assert torch.equal(held.sort().values, torch.arange(seq))
    for r in range(world):
        pos = runs_to_positions(local_runs(seq, world, r, layout))
        assert len(pos) == seq // world and torch.all(pos[1:] > pos[:-1])  # increasing


def test_layouts_hold_the_documented_tokens():
    # S = 16, P = 4: contiguous chunks of 4, zigzag chunks r and 7-r of 2, striped t mod 4.
    assert runs_to_positions(local_runs(16, 4, 1, "contiguous")).tolist() == [4, 5, 6, 7]
    assert runs_to_positions(local_runs(16, 4, 1, "zigzag")).tolist() == [2, 3, 12, 13]
    assert runs_to_positions(local_runs(16, 4, 0, "zigzag")).tolist() == [0, 1, 14, 15]
    assert runs_to_positions(local_runs(16, 4, 3, "striped")).tolist() == [3, 7, 11, 15]


@pytest.mark.parametrize("layout,seq,message", [
    ("zigzag", 12, r"sequence length 12 is not divisible by 8 \(2 x 4 ranks\).*pad the sequence to 16"),
    ("contiguous", 10, r"sequence length 10 is not divisible by 4 .*pad the sequence to 12"),
    ("striped", 6, r"not divisible by 4 .*pad the sequence to 8"),
])
def test_divisibility_errors_say_what_to_change(layout, seq, message):
    with pytest.raises(ValueError, match=message):
        local_runs(seq, 4, 0, layout)


def test_single_process_shard_is_identity_and_bad_args_raise():
    x = torch.randn(2, 6, 3)
    for layout in LAYOUTS:
        assert torch.equal(seqpar.shard(x, layout=layout), x)
        assert torch.equal(seqpar.gather(x, layout=layout), x)
    with pytest.raises(ValueError, match=r"seqpar.shard: unknown layout='zig'"):
        seqpar.shard(x, layout="zig")
    with pytest.raises(ValueError, match=r"dim=3 is out of range"):
        seqpar.shard(x, dim=3)
    with pytest.raises(TypeError, match=r"expected a torch.Tensor, got list"):
        seqpar.shard([1, 2], dim=0)
    with pytest.raises(TypeError, match=r"group: expected None, a torch.distributed.ProcessGroup or a seqpar.SPMesh"):
        seqpar.shard(x, group="world")


def round_trips(seq: int, layout: str) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(3 * seq * 2, dtype=torch.float64).reshape(3, seq, 2)
    for dim, full in ((1, x), (0, x.transpose(0, 1).contiguous()), (-2, x)):
        local = seqpar.shard(full, dim=dim, layout=layout)
        pos = seqpar.positions(seq, layout=layout)
        assert torch.equal(local, full.index_select(dim, pos))
        assert torch.equal(seqpar.gather(local, dim=dim, layout=layout), full)
    # gather's gradient is this rank's slice of the incoming gradient
    local = seqpar.shard(x, layout=layout).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (seqpar.gather(local, layout=layout) * weights).sum().backward()
    assert torch.equal(local.grad, seqpar.shard(weights, layout=layout))
    return seqpar.positions(seq, layout=layout).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_gather_round_trip(worlds, world, layout):
    seq = 2 * world * 2
    held = worlds(world).run(round_trips, seq, layout)
    assert sorted(sum(held, [])) == list(range(seq))


def mismatched_gather() -> str:
    local = torch.zeros(1, 4 if dist.get_rank() == 0 else 6)
    with pytest.raises(ValueError) as info:
        seqpar.gather(local, layout="contiguous")
    return str(info.value)


def test_gather_with_mismatched_shards_raises_on_every_rank(worlds):
    messages = worlds(2).run(mismatched_gather)
    for m in messages:
        assert "x_local.shape[1] differs across ranks" in m and "min: 4, max: 6" in m


def test_positions_restart_in_every_document():
    """RoPE positions of packed documents: each document counts from 0, across rank borders."""
    cu = torch.tensor([0, 1, 6, 13, 16], dtype=torch.int32)
    every = torch.cat([torch.arange(1), torch.arange(5), torch.arange(7), torch.arange(3)])
    assert seqpar.positions(16, layout="contiguous", cu_seqlens=cu).tolist() == every.tolist()
    with pytest.raises(ValueError, match=r"seqpar.positions: cu_seqlens must end at the global "
                                         r"sequence length S = 16"):
        seqpar.positions(16, layout="contiguous", cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(TypeError, match=r"cu_seqlens.dtype=torch.float32"):
        seqpar.positions(16, layout="contiguous", cu_seqlens=torch.tensor([0.0, 16.0]))


def positions_of_packed_documents(layout: str) -> list[int]:
    cu = torch.tensor([0, 3, 4, 15, 16])
    pos = seqpar.positions(16, layout=layout, cu_seqlens=cu)
    every = torch.cat([torch.arange(3), torch.arange(1), torch.arange(11), torch.arange(1)])
    assert torch.equal(pos, every[seqpar.positions(16, layout=layout)])
    return pos.tolist()


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_positions_restart_per_document_on_every_rank(worlds, layout):
    worlds(2).run(positions_of_packed_documents, layout)


# ---------------------------------------------------------------- layout="balanced"

def lognormal_documents(seq: int, seed: int) -> tuple[int, ...]:
    """Boundaries of log-normal documents (median 1K, at most 8K), as benchmarks.masks draws."""
    from benchmarks.masks import document_lengths
    lengths = document_lengths(seq, 1024, 8192, seed=seed)
    return tuple(torch.tensor([0] + lengths).cumsum(0).tolist())


def rank_work(seq: int, world: int, layout: str, documents: tuple[int, ...]) -> list[int]:
    """Causal work (visible pairs) of each rank's queries under the documents."""
    bounds = torch.tensor(documents)
    work = []
    for r in range(world):
        pos = runs_to_positions(local_runs(seq, world, r, layout, documents))
        start = bounds[torch.searchsorted(bounds, pos, right=True) - 1]
        work.append(int((pos - start + 1).sum()))
    return work


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_balanced_layout_holds_every_token_once_in_increasing_order(world):
    seq = 4 * world * 5
    documents = (0, 1, 7, 8, seq - 3, seq)
    held = [runs_to_positions(local_runs(seq, world, r, "balanced", documents))
            for r in range(world)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq))
    for pos in held:
        assert len(pos) == seq // world and torch.all(pos[1:] > pos[:-1])


def test_balanced_layout_evens_the_work_of_packed_documents():
    # The benchmark's documents (S = 32K, P = 4): zigzag leaves its busiest rank 1.33-1.51x the
    # mean over these seeds; the greedy deal is within the longest-processing-time bound
    # (mean + the largest chunk's work) and, measured, within 3% of the mean.
    from seqpar.balanced import CHUNKS_PER_RANK, chunk_work
    seq, world = 32768, 4
    for seed in range(4):
        documents = lognormal_documents(seq, seed)
        zigzag = rank_work(seq, world, "zigzag", documents)
        balanced = rank_work(seq, world, "balanced", documents)
        assert sum(balanced) == sum(zigzag)
        mean = sum(balanced) / world
        assert max(zigzag) > 1.3 * mean
        assert max(balanced) <= mean + max(chunk_work(seq, CHUNKS_PER_RANK * world, documents))
        assert max(balanced) <= 1.2 * mean, (seed, [w / mean for w in balanced])


def test_balanced_layout_needs_the_documents():
    with pytest.raises(ValueError, match=r"seqpar.shard: layout='balanced' deals chunks to ranks "
                                         r"by the documents' work, so it needs cu_seqlens="):
        seqpar.shard(torch.zeros(1, 16, 2), layout="balanced")
    with pytest.raises(ValueError, match=r"seqpar.positions: layout='balanced'.*needs cu_seqlens="):
        seqpar.positions(16, layout="balanced")
    with pytest.raises(ValueError, match=r"seqpar.shard: cu_seqlens must end at the global "
                                         r"sequence length S = 16"):
        seqpar.shard(torch.zeros(1, 16, 2), layout="balanced", cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"seqpar.shard: x.shape\[1\]: sequence length 6 is not "
                                         r"divisible by 4"):
        seqpar.shard(torch.zeros(1, 6, 2), layout="balanced", cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"ShardedKVCache: layout='balanced' places a packed"):
        ShardedKVCache(layout="balanced")


def balanced_round_trip(seq: int) -> list:
    documents = torch.tensor([0, 3, 4, seq - 5, seq])
    full = torch.arange(seq * 2, dtype=torch.float64).reshape(1, seq, 2).requires_grad_()
    local = seqpar.shard(full, layout="balanced", cu_seqlens=documents)
    pos = seqpar.positions(seq, layout="balanced", cu_seqlens=documents)
    global_ids = runs_to_positions(local_runs(seq, dist.get_world_size(), dist.get_rank(),
                                              "balanced", tuple(documents.tolist())))
    assert torch.equal(local[0, :, 0], 2.0 * global_ids)
    bounds = documents[torch.searchsorted(documents, global_ids, right=True) - 1]
    assert torch.equal(pos, global_ids - bounds)
    back = seqpar.gather(local, layout="balanced", cu_seqlens=documents)
    assert torch.equal(back, full.detach())
    try:
        seqpar.gather(local, layout="balanced")
    except ValueError as error:
        return [str(error)]
    return ["nothing raised"]


@pytest.mark.parametrize("world", [2, 3])
def test_balanced_shard_gather_positions_round_trip(worlds, world):
    for (message,) in worlds(world).run(balanced_round_trip, 4 * world * 6):
        assert re.search(r"seqpar.gather: layout='balanced'.*needs cu_seqlens=", message), message
