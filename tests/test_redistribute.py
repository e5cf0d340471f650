"""The sequence redistributions of comm/primitives.py: Ulysses all-to-all (both directions, with
layout un-permutation and replicated heads), all-gather and reduce-scatter along the sequence.

Each is checked on its own against plain indexing of the full tensor, its autograd form against
the adjoint identity  sum_ranks <f(x), y> == sum_ranks <x, f*(y)>  (which fails for a wrong
backward), and its bytes against the documented volume."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.primitives import (HeadSplit, Traffic, gather_tokens, heads_to_seq,
                                    redistribute, reduce_scatter_tokens, resolve_group,
                                    seq_to_heads)
from seqpar.comm.ulysses import kv_heads_per_rank
from seqpar.kernels.mask import gathered_runs, runs_to_positions, token_slots
from seqpar.layout import LAYOUTS, all_local_runs


def full_tensor(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def split_for(layout: str, seq: int, heads: torch.Tensor, total: int) -> HeadSplit:
    info = resolve_group(None)
    runs = all_local_runs(seq, info.world, layout)
    return HeadSplit(info, heads, total, token_slots(runs, gathered_runs(runs, interleave=True)))


def all_to_all_places_tokens_and_heads(layout: str, heads_q: int, heads_kv: int) -> None:
    info = resolve_group(None)
    world, rank = info.world, info.rank
    seq = 4 * world
    x_full = full_tensor(0, 2, seq, heads_kv, 3)
    x_local = seqpar.shard(x_full, layout=layout)
    heads = kv_heads_per_rank(heads_q, heads_kv, world)
    split = split_for(layout, seq, heads, heads_kv)
    with seqpar.comm_stats() as stats:
        x_heads = seq_to_heads(x_local, split, 1, 2, Traffic.now("a2a"))
    # Whole layouts come back in global order: plain indexing of the full tensor.
    assert torch.equal(x_heads, x_full[:, :, heads[rank]])
    piece = x_local[:, :, :heads.shape[1]]
    assert stats.sent("a2a") == stats.received("a2a") == (world - 1) * piece.numel() * 8
    # The way back sums the copies of replicated heads: copies_h * x for head h.
    back = heads_to_seq(x_heads, split, 1, 2, Traffic.now("a2a"))
    copies = torch.bincount(heads.flatten(), minlength=heads_kv).to(torch.float64)
    assert torch.allclose(back, x_local * copies[None, None, :, None], rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (12, 3)], ids=["partition", "replicated", "uneven"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_to_all_places_tokens_and_heads(worlds, layout, heads):
    worlds(4).run(all_to_all_places_tokens_and_heads, layout, *heads)


def adjoint_gap(fn, x_local: torch.Tensor, args: tuple, y_seed: int) -> float:
    """|sum_ranks <f(x), y> - sum_ranks <x, grad>| through `redistribute`'s backward."""
    x = x_local.clone().requires_grad_()
    out = redistribute(fn, x, *args, op="adjoint")
    y = full_tensor(y_seed + dist.get_rank(), *out.shape)
    (out * y).sum().backward()
    sums = torch.stack([(out.detach() * y).sum(), (x_local * x.grad).sum()])
    dist.all_reduce(sums)
    return abs(sums[0] - sums[1]).item() / max(1.0, abs(sums[0]).item())


def backward_is_the_adjoint(layout: str) -> list[float]:
    info = resolve_group(None)
    world = info.world
    seq = 2 * world * 3
    runs = all_local_runs(seq, world, layout)
    slots = token_slots(runs, gathered_runs(runs, interleave=False))
    heads = kv_heads_per_rank(2 * world, 1, world)   # one head replicated everywhere
    split = split_for(layout, seq, heads, 1)
    x_seq = seqpar.shard(full_tensor(1, 2, seq, 1, 5), layout=layout)
    x_full = full_tensor(2, 2, seq, 1, 5)
    gaps = [adjoint_gap(seq_to_heads, x_seq, (split, 1, 2), 10),
            adjoint_gap(heads_to_seq, seq_to_heads(x_seq, split, 1, 2, Traffic.now("x")),
                        (split, 1, 2), 20),
            adjoint_gap(gather_tokens, x_seq, (info, slots, 1), 30),
            adjoint_gap(reduce_scatter_tokens, x_full, (info, slots, 1), 40)]
    # gather_tokens puts every token at its slot: plain indexing of the full tensor.
    full = torch.zeros(2, seq, 1, 5, dtype=torch.float64)
    full[:, runs_to_positions(gathered_runs(runs, interleave=False))] = gather_tokens(
        x_seq, info, slots, 1, Traffic.now("x"))
    gaps.append((full - seqpar.gather(x_seq, layout=layout)).abs().max().item())
    return gaps


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_backward_is_the_adjoint(worlds, world, layout):
    for gaps in worlds(world).run(backward_is_the_adjoint, layout):
        assert max(gaps) < 1e-12, gaps


def a_wrong_adjoint_is_caught() -> float:
    """The identity above fails for a backward that is not the adjoint (here: no head sum)."""
    info = resolve_group(None)
    split = split_for("contiguous", 2 * info.world, kv_heads_per_rank(info.world, 1, info.world), 1)
    x = full_tensor(3, 1, 2, 1, 4)
    out = seq_to_heads(x, split, 1, 2, Traffic.now("x"))
    y = full_tensor(4 + info.rank, *out.shape)
    not_summed = heads_to_seq(y, split, 1, 2, Traffic.now("x")) / info.world
    sums = torch.stack([(out * y).sum(), (x * not_summed).sum()])
    dist.all_reduce(sums)
    return abs(sums[0] - sums[1]).item()


def test_a_wrong_adjoint_is_caught(worlds):
    assert all(gap > 1e-3 for gap in worlds(2).run(a_wrong_adjoint_is_caught))


def reduce_scatter_bytes() -> tuple[int, int]:
    info = resolve_group(None)
    with seqpar.comm_stats() as stats:
        out = reduce_scatter_tokens(torch.ones(3, 4 * info.world, 2), info, None, 1,
                                    Traffic.now("rs"))
    assert torch.equal(out, torch.full((3, 4, 2), float(info.world)))
    return stats.sent("rs"), stats.received("rs")


def test_reduce_scatter_sums_and_counts(worlds):
    assert worlds(3).run(reduce_scatter_bytes) == [(2 * 3 * 4 * 2 * 4,) * 2] * 3
