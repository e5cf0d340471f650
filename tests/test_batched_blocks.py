"""The CPU fused op's batched plan runner (`kernels.batched_blocks`): triangles cut into
squares cover each visible pair of their sub-block exactly once, and plans run through batches,
the one-pass merge and index-added gradients equal the fp64 reference -- with the cut, batch and
merge sizes shrunk so that small shapes take every path (recursion, reversed order, several
batches per shape, several merges per plan, lone pieces merged at once)."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import batched_blocks as batched
from seqpar.kernels.mask import MaskKind, MaskRule, Run, SubBlock, plan_blocks

from .test_mask_plan import element_mask, plan_case


def piece_mask(piece: batched.Piece, nq: int, nk: int) -> torch.Tensor:
    """int [nq, nk]: 1 where the piece computes (its rows see its keys, in its own order)."""
    out = torch.zeros(nq, nk, dtype=torch.int64)
    seen = torch.ones(piece.rows, piece.keys, dtype=torch.int64)
    if piece.kind == batched.LOWER:
        seen = seen.tril()
    if piece.kind == batched.UPPER:
        seen = seen.triu()
    out[piece.q_start:piece.q_start + piece.rows, piece.k_start:piece.k_start + piece.keys] += seen
    return out


SHAPES = [(n, m) for n in (1, 3, 4, 5, 8, 9, 13, 16, 31, 40) for m in (1, 4, 9, 16, 40)]


@pytest.mark.parametrize("base,split_max", [(4, 1000), (1, 1000), (3, 12)])
def test_pieces_cover_each_visible_pair_exactly_once(base, split_max, monkeypatch):
    monkeypatch.setattr(batched, "BASE", base)
    monkeypatch.setattr(batched, "SPLIT_MAX", split_max)
    for n, m in SHAPES:
        blocks = [SubBlock(2, 2 + n, 1, 1 + m, MaskKind.FULL),
                  SubBlock(2, 2 + n, 1, 1 + m, MaskKind.CAUSAL),
                  SubBlock(2, 2 + n, 1, 1 + m, MaskKind.BAND, lo=m - n, hi=m - 1)]
        for block in blocks:
            pieces = batched.pieces_of(block)
            if pieces is None:  # only a big triangle keeps its own path
                assert block.kind is not MaskKind.FULL and min(n, m) > split_max
                continue
            got = sum(piece_mask(p, 2 + n, 1 + m) for p in pieces)
            want = torch.zeros(2 + n, 1 + m, dtype=torch.int64)
            want[2:, 1:] = element_mask(block).long()
            assert torch.equal(got, want), (block, pieces)
            triangles = [p for p in pieces if p.kind != batched.FULL]
            assert all(p.rows == p.keys for p in triangles)
            if min(n, m) <= split_max:
                assert all(p.rows <= base for p in triangles)


def test_power_of_two_triangles_cut_into_batchable_squares(monkeypatch):
    monkeypatch.setattr(batched, "BASE", 128)
    pieces = batched.pieces_of(SubBlock(0, 512, 0, 512, MaskKind.CAUSAL))
    shapes = sorted(p.shape for p in pieces)
    assert shapes == [(128, 128, "full")] * 2 + [(128, 128, "lower")] * 4 + [(256, 256, "full")]
    # The window's lower edge: the same cut above the diagonal.
    upper = batched.pieces_of(SubBlock(0, 512, 0, 512, MaskKind.BAND, lo=0, hi=511))
    assert sorted(p.shape for p in upper) == [(128, 128, "full")] * 2 + [
        (128, 128, "upper")] * 4 + [(256, 256, "full")]
    assert not batched.splits(SubBlock(0, 4096, 0, 4096, MaskKind.CAUSAL))  # dense diagonal


# Windows of at least MIN_TILE (64) keys: narrower bands are chunked BANDs, not triangles.
CASES = [
    (MaskRule(True, 70), (Run(0, 160),), (Run(0, 160),)),  # window: both edges cut, batched
    (MaskRule(False, 66, (0, 3, 90, 91, 160)), (Run(0, 160),), (Run(0, 160),)),
    (MaskRule(True, None, (0, 70, 71, 160)), (Run(0, 40), Run(120, 40)),
     (Run(0, 40), Run(120, 40))),
    (MaskRule(True, 64), (Run(80, 80), Run(160, 80)), (Run(0, 80), Run(160, 80), Run(80, 80))),
    (MaskRule(True), (Run(0, 64),), (Run(0, 64),)),  # a dense triangle below SPLIT_MAX
    (MaskRule(True, 80, softcap=2.0), (Run(0, 160),), (Run(0, 160),)),  # capped: per sub-block
]


@pytest.mark.parametrize("limits,batch", [("tiny", 1), ("default", 1), ("tiny", 2)])
@pytest.mark.parametrize("rule,q_runs,k_runs", CASES)
def test_batched_plans_equal_the_reference(rule, q_runs, k_runs, limits, batch, monkeypatch):
    """batch 1: evenly spaced pieces run as strided views; batch 2: gathered copies."""
    from seqpar.kernels import KERNELS
    monkeypatch.setattr(batched, "BASE", 4)
    if limits == "tiny":  # several batches per shape, merges per plan; lone pieces at once
        monkeypatch.setattr(batched, "BATCH_ELEMENTS", 3 * 8 * 8 * 6)  # ~3 pieces of 4 rows
        monkeypatch.setattr(batched, "PENDING_ELEMENTS", 500)
        monkeypatch.setattr(batched, "MERGE_AT_ONCE", 64)
    q, k, v, do, dlse, o_ref, lse_ref, grads_ref = plan_case(rule, q_runs, k_runs, batch, 0.7, 7)
    blocks = plan_blocks(q_runs, k_runs, rule)
    kernel = KERNELS["flash"]
    assert any(batched.splits(b) for b in blocks) or rule.softcap is not None
    # fwd_into on top of a partial result already in the accumulators (a ring's later step)
    half = len(blocks) // 2
    o, lse = kernel.fwd(q, k, v, blocks[:half], 0.7)
    kernel.fwd_into(o, lse, q, k, v, blocks[half:], 0.7)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert torch.allclose(o, o_ref, atol=1e-12)
    assert torch.allclose(lse[torch.isfinite(lse)], lse_ref[torch.isfinite(lse_ref)], atol=1e-12)
    from seqpar.kernels.plan import softmax_delta
    for given in ("o", "delta"):
        if given == "o":
            grads = kernel.bwd(do, q, k, v, o, lse, dlse, blocks, 0.7)
        else:  # TokenRing's visiting queries: delta, no output
            grads = kernel.bwd(do, q, k, v, None, lse, None, blocks, 0.7,
                               delta=softmax_delta(do, o, dlse))
        for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert torch.allclose(a, b, atol=1e-11), (given, name, (a - b).abs().max())
