"""Mask plans with documents, windows and soft caps (`kernels.mask.plan_blocks` with a
`MaskRule`): every visible (query, key) pair is covered exactly once, nothing invisible is
computed, fully visible parts stay on the fused op's kinds, and invisible pairs of runs are not
planned at all."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.mask import (MaskKind, MaskRule, Run, causal_pairs, head_sharded_runs,
                                 plan_blocks, runs_to_positions, split_runs, token_slots,
                                 visible_key_span)
from seqpar.layout import LAYOUTS, local_runs


def element_mask(block) -> torch.Tensor:
    """bool [rows, keys]: what the kernel computes for one sub-block (its element rule)."""
    n, m = block.q1 - block.q0, block.k1 - block.k0
    if block.kind is MaskKind.FULL:
        return torch.ones(n, m, dtype=torch.bool)
    if block.kind is MaskKind.CAUSAL:
        return torch.ones(n, m, dtype=torch.bool).tril()
    if block.kind is MaskKind.BAND:
        diff = torch.arange(m)[None, :] - torch.arange(n)[:, None]
        return (diff >= block.lo) & (diff <= block.hi)
    rule = MaskRule(block.causal, block.window)
    return rule.visible(torch.tensor(block.q_pos), torch.tensor(block.k_pos))


def coverage(blocks, nq, nk) -> torch.Tensor:
    count = torch.zeros(nq, nk, dtype=torch.int64)
    for b in blocks:
        count[b.q0:b.q1, b.k0:b.k1] += element_mask(b).long()
    return count


DOCS = (0, 1, 5, 6, 17, 30, 48)  # lengths 1, 4, 1, 11, 13, 18 over S = 48
RULES = [MaskRule(c, w, d) for c in (True, False) for w in (None, 1, 3, 7, 100)
         for d in (None, DOCS)]
PAIRS = [(local_runs(48, p, r, layout), local_runs(48, p, s, layout))
         for layout in LAYOUTS for p in (2, 3, 4) for r in range(p) for s in range(p)
         if (r + s + p) % 2 == 0 or layout == "zigzag"]
PAIRS += [((Run(0, 48),), (Run(0, 48),)), ((Run(1, 5, 3),), (Run(0, 7),)),
          ((Run(0, 3), Run(40, 3)), (Run(2, 6, 3),))]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_plan_covers_each_visible_pair_exactly_once(rule):
    for q_runs, k_runs in PAIRS:
        qp, kp = runs_to_positions(q_runs), runs_to_positions(k_runs)
        visible = rule.visible(qp, kp)
        blocks = plan_blocks(q_runs, k_runs, rule)
        got = coverage(blocks, len(qp), len(kp))
        assert torch.equal(got, visible.long()), (q_runs, k_runs, rule, blocks)
        assert causal_pairs(blocks) == int(visible.sum())
        if not visible.any():
            assert blocks == ()  # nothing visible: nothing planned, no work


def test_wide_window_uses_the_fused_kinds_and_little_else():
    """A window of 256 over 2048 causal tokens: reversed-causal + causal tiles (both run on the
    fused op), computing about one product per visible pair."""
    rule = MaskRule(True, 256)
    blocks = plan_blocks((Run(0, 2048),), (Run(0, 2048),), rule)
    assert all(b.kind is MaskKind.CAUSAL or b.is_reversed_causal or b.kind is MaskKind.FULL
               for b in blocks), blocks
    visible = causal_pairs(blocks)
    # Products the fused op computes: a causal tile of n rows does n(n+1)/2, like its pairs.
    assert visible == sum(min(i + 1, 256) for i in range(2048))
    assert len(blocks) <= 2 * (2048 // 255 + 1)


def test_narrow_window_is_chunked_bands_over_reachable_keys():
    blocks = plan_blocks((Run(0, 256),), (Run(0, 256),), MaskRule(True, 1))
    assert all(b.kind is MaskKind.BAND for b in blocks)
    # Tiles of MIN_TILE rows, each over only the keys its rows reach (window 1: its diagonal).
    assert [(b.q0, b.q1, b.k0, b.k1) for b in blocks] == [(r, r + 64, r, r + 64)
                                                          for r in range(0, 256, 64)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_sharded_side_is_global_when_dense_and_unpermuted_when_masked(layout):
    """Ulysses' gathered sequence: one global-order run for a dense rule (one causal call), the
    ranks' tokens as they arrive for a masked one (no permutation; the plan needs no order)."""
    members = tuple(local_runs(48, 4, r, layout) for r in range(4))
    assert head_sharded_runs(members, MaskRule(True)) == (Run(0, 48),)
    for rule in (MaskRule(True, 5), MaskRule(False, None, DOCS)):
        runs = head_sharded_runs(members, rule)
        assert token_slots(members, runs) is None
        assert torch.equal(runs_to_positions(runs),
                           torch.cat([runs_to_positions(m) for m in members]))


def test_documents_split_runs_without_padding():
    pieces = split_runs((Run(2, 5, 3),), (0, 4, 5, 15, 20))  # positions 2 5 8 11 14
    assert [(p.run, p.offset, p.doc) for p in pieces] == [
        (Run(2, 1, 3), 0, 0), (Run(5, 4, 3), 1, 2)]


def test_softcap_rides_on_every_sub_block():
    blocks = plan_blocks((Run(0, 8),), (Run(0, 8),), MaskRule(True, 3, softcap=5.0))
    assert blocks and all(b.softcap == 5.0 for b in blocks)


def test_visible_key_span_is_the_window_reach():
    # Contiguous, 4 ranks of 16, window 5: rank 1 sees the last 4 keys of rank 0.
    rule = MaskRule(True, 5)
    assert visible_key_span((Run(16, 16),), (Run(0, 16),), rule) == [(12, 16)]
    assert visible_key_span((Run(32, 16),), (Run(0, 16),), rule) == [(0, 0)]
    # Zigzag (2 chunks of 8 per rank, P = 2): rank 0 holds [0, 8) + [24, 32).
    spans = visible_key_span((Run(8, 8), Run(16, 8)), (Run(0, 8), Run(24, 8)),
                             MaskRule(False, 3))
    assert spans == [(6, 8), (0, 2)]


# ---------------------------------------------------------------- the CPU block kernels run them

KERNEL_CASES = [
    (MaskRule(True, 5, DOCS), (Run(0, 24),), (Run(0, 24),)),
    (MaskRule(False, 4, DOCS, softcap=0.7), (Run(24, 24),), (Run(0, 48),)),
    (MaskRule(True, None, DOCS), (Run(1, 16, 3),), (Run(0, 16, 3),)),
    (MaskRule(True, 2, None, softcap=1.5), (Run(0, 6), Run(42, 6)), (Run(6, 6), Run(36, 6))),
    (MaskRule(False, 9), (Run(0, 5, 3),), (Run(1, 12),)),  # strides differ: POSITIONS
    (MaskRule(True, 70), (Run(0, 160),), (Run(0, 160),)),  # wide: reversed-causal tiles
    (MaskRule(False, 70, (0, 3, 150, 160)), (Run(0, 160),), (Run(0, 160),)),
]


def plan_case(rule, q_runs, k_runs, batch: int, scale: float, seed: int):
    """fp64 inputs for one plan and the reference: (q, k, v, do, dlse, o_ref, lse_ref,
    (dq, dk, dv)_ref); dlse is zero on rows with no visible key (lse = -inf)."""
    from seqpar.kernels import attention_reference
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(r.length for r in q_runs), sum(r.length for r in k_runs)
    q = torch.randn(batch, nq, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, nk, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, nk, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    docs = None if rule.documents is None else torch.tensor(rule.documents)
    o_ref, lse_ref = attention_reference(q, k, v, causal=rule.causal, scale=scale,
                                         q_pos=runs_to_positions(q_runs),
                                         k_pos=runs_to_positions(k_runs), cu_seqlens=docs,
                                         window=rule.window, softcap=rule.softcap)
    do = torch.randn(o_ref.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse_ref.shape, generator=g, dtype=torch.float64)
    dlse = torch.where(torch.isfinite(lse_ref), dlse, 0)
    loss = (o_ref * do).sum() + (torch.where(torch.isfinite(lse_ref), lse_ref, 0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return q.detach(), k.detach(), v.detach(), do, dlse, o_ref.detach(), lse_ref.detach(), grads


@pytest.mark.parametrize("kernel", ["flash", "chunked"])
@pytest.mark.parametrize("rule,q_runs,k_runs", KERNEL_CASES)
def test_block_kernel_runs_masked_plans_exactly(kernel, rule, q_runs, k_runs, monkeypatch):
    from seqpar.kernels import KERNELS, torch_cpu
    monkeypatch.setattr(torch_cpu, "CHUNK", 8)  # several chunks per block at small sizes
    q, k, v, do, dlse, o_ref, lse_ref, grads_ref = plan_case(rule, q_runs, k_runs, 1, 0.9, 4)
    blocks = plan_blocks(q_runs, k_runs, rule)
    run = KERNELS[kernel]
    o, lse = run.fwd(q, k, v, blocks, 0.9)
    assert torch.allclose(o, o_ref, atol=1e-12) and torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert torch.allclose(lse[torch.isfinite(lse)], lse_ref[torch.isfinite(lse_ref)], atol=1e-12)
    grads = run.bwd(do, q, k, v, o, lse, dlse, blocks, 0.9)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-11), (name, (a - b).abs().max())
