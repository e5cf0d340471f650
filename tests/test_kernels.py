"""Local kernels (single process): merge, mask plans, flash and chunked paths vs the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar.kernels import KERNELS, MaskKind, Run, attention_reference, merge, merge_into
from seqpar.kernels import plan_blocks, runs_to_positions
from seqpar.kernels import torch_cpu
from seqpar.kernels.mask import causal_pairs
from seqpar.layout import LAYOUTS, local_runs
from tests.checks import assert_close


# ---------------------------------------------------------------- merge

def test_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64)
    o_all, lse_all = attention_reference(q, k, v, causal=False)
    o1, lse1 = attention_reference(q, k[:, :4], v[:, :4], causal=False)
    o2, lse2 = attention_reference(q, k[:, 4:], v[:, 4:], causal=False)
    o, lse = merge(o1, lse1, o2, lse2)
    assert_close("o", o, o_all, 1e-12)
    assert_close("lse", lse, lse_all, 1e-12)
    acc_o, acc_lse = o1.clone(), lse1.clone()
    merge_into(acc_o, acc_lse, o2, lse2)
    assert_close("o in place", acc_o, o_all, 1e-12)
    assert_close("lse in place", acc_lse, lse_all, 1e-12)


def test_merge_is_inf_safe():
    shape_o, shape_lse = (1, 3, 2, 4), (1, 2, 3)
    empty_o, empty_lse = torch.zeros(shape_o), torch.full(shape_lse, float("-inf"))
    some_o, some_lse = torch.randn(shape_o), torch.randn(shape_lse)
    o, lse = merge(empty_o, empty_lse, empty_o, empty_lse)  # nothing seen at all
    assert torch.equal(o, empty_o) and torch.equal(lse, empty_lse)
    o, lse = merge(empty_o, empty_lse, some_o, some_lse)
    assert torch.equal(o, some_o) and torch.equal(lse, some_lse)
    o, lse = merge(some_o, some_lse, empty_o, empty_lse)
    assert torch.equal(o, some_o) and torch.equal(lse, some_lse)


def test_merge_is_stable_for_far_apart_lse():
    o1, o2 = torch.ones(1, 1, 1, 2), torch.full((1, 1, 1, 2), 3.0)
    o, lse = merge(o1, torch.tensor([[[1e4]]]), o2, torch.tensor([[[-1e4]]]))
    assert torch.equal(o, o1) and lse.item() == 1e4


# ---------------------------------------------------------------- mask plans

def dense_coverage(blocks, nq, nk) -> torch.Tensor:
    """How many sub-blocks cover each (query, key) pair."""
    count = torch.zeros(nq, nk, dtype=torch.int64)
    for b in blocks:
        n, m = b.q1 - b.q0, b.k1 - b.k0
        if b.kind is MaskKind.FULL:
            cover = torch.ones(n, m, dtype=torch.int64)
        elif b.kind is MaskKind.CAUSAL:
            cover = torch.ones(n, m, dtype=torch.int64).tril()
        else:
            cover = (torch.tensor(b.k_pos)[None] <= torch.tensor(b.q_pos)[:, None]).long()
        count[b.q0:b.q1, b.k0:b.k1] += cover
    return count


RUN_PAIRS = [
    ((Run(0, 8),), (Run(0, 8),)), ((Run(8, 8),), (Run(0, 8),)), ((Run(0, 8),), (Run(8, 8),)),
    ((Run(4, 8),), (Run(0, 8),)), ((Run(0, 8),), (Run(3, 8),)), ((Run(0, 5),), (Run(2, 9),)),
    ((Run(1, 5, 3),), (Run(2, 5, 3),)), ((Run(2, 5, 3),), (Run(1, 5, 3),)),
    ((Run(0, 5, 3),), (Run(1, 7),)), ((Run(7, 1),), (Run(0, 3, 4),)),
    ((Run(0, 3), Run(9, 3)), (Run(3, 3), Run(6, 3))), ((Run(0, 3), Run(9, 3)), (Run(0, 3), Run(9, 3))),
] + [(local_runs(24, p, r, layout), local_runs(24, p, s, layout))
     for layout in LAYOUTS for p in (2, 3, 4) for r in range(p) for s in range(p)]


@pytest.mark.parametrize("q_runs,k_runs", RUN_PAIRS)
def test_plan_covers_each_visible_pair_exactly_once(q_runs, k_runs):
    qp, kp = runs_to_positions(q_runs), runs_to_positions(k_runs)
    visible = (kp[None] <= qp[:, None]).long()
    causal = plan_blocks(q_runs, k_runs, causal=True)
    assert torch.equal(dense_coverage(causal, len(qp), len(kp)), visible)
    assert causal_pairs(causal) == int(visible.sum())
    full = plan_blocks(q_runs, k_runs, causal=False)
    assert torch.equal(dense_coverage(full, len(qp), len(kp)), torch.ones_like(visible))


def test_plan_uses_the_fused_op_for_every_layout():
    """Layouts never need the slow explicit-positions mask, and zigzag steps are one call."""
    for layout, p in itertools.product(LAYOUTS, (2, 3, 4, 8)):
        for r, s in itertools.product(range(p), repeat=2):
            blocks = plan_blocks(local_runs(64 * p, p, r, layout), local_runs(64 * p, p, s, layout), True)
            assert all(b.kind is not MaskKind.POSITIONS for b in blocks)
            if layout == "zigzag":
                assert len(blocks) == 1, (r, s, blocks)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_at_every_step(world):
    seq = 16 * world
    for step in range(world):
        work = {causal_pairs(plan_blocks(local_runs(seq, world, r, "zigzag"),
                                         local_runs(seq, world, (r - step) % world, "zigzag"), True))
                for r in range(world)}
        assert len(work) == 1, f"step {step}: per-rank work {work}"
    contiguous = {sum(causal_pairs(plan_blocks(local_runs(seq, world, r, "contiguous"),
                                               local_runs(seq, world, s, "contiguous"), True))
                      for s in range(world)) for r in range(world)}
    assert len(contiguous) == world  # the imbalance zigzag exists to fix


# ---------------------------------------------------------------- block kernels

@pytest.mark.parametrize("q_runs,k_runs", RUN_PAIRS[:12])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lse_grad", [False, True])
@pytest.mark.parametrize("given", ["output", "delta"])
def test_block_kernel_matches_reference(q_runs, k_runs, kernel, causal, lse_grad, given,
                                        monkeypatch):
    """Forward, and backward from the final output (+ dlse) or from delta alone (TokenRing)."""
    monkeypatch.setattr(torch_cpu, "CHUNK", 4)  # exercise the chunk loops at small sizes
    g = torch.Generator().manual_seed(1)
    nq, nk = sum(r.length for r in q_runs), sum(r.length for r in k_runs)
    q = torch.randn(2, nq, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, nk, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, nk, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    o_ref, lse_ref = attention_reference(q, k, v, causal=causal, scale=0.3,
                                         q_pos=runs_to_positions(q_runs),
                                         k_pos=runs_to_positions(k_runs))
    do = torch.randn(o_ref.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse_ref.shape, generator=g, dtype=torch.float64) if lse_grad else None
    loss = (o_ref * do).sum()
    if lse_grad:
        loss = loss + (torch.where(torch.isfinite(lse_ref), lse_ref, 0) * dlse).sum()
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(loss, (q, k, v))

    blocks = plan_blocks(q_runs, k_runs, causal)
    o = torch.zeros(o_ref.shape, dtype=torch.float64)
    lse = torch.full(lse_ref.shape, float("-inf"), dtype=torch.float64)
    with torch.no_grad():
        KERNELS[kernel].fwd_into(o, lse, q, k, v, blocks, 0.3)
        grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
        if given == "output":
            KERNELS[kernel].bwd_into(*grads, do, q, k, v, o, lse, dlse, blocks, 0.3)
            fresh_grads = KERNELS[kernel].bwd(do, q, k, v, o, lse, dlse, blocks, 0.3)
        else:
            delta = torch_cpu.softmax_delta(do, o, dlse)
            KERNELS[kernel].bwd_into(*grads, do, q, k, v, None, lse, None, blocks, 0.3, delta=delta)
            fresh_grads = KERNELS[kernel].bwd(do, q, k, v, None, lse, None, blocks, 0.3, delta=delta)
        # The fresh-accumulator forms (one-block plans skip the merge) agree.
        fresh = (*KERNELS[kernel].fwd(q, k, v, blocks, 0.3), *fresh_grads)
    assert all(t.dtype == torch.float64 for t in fresh)
    for name, a, b, e in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), fresh,
                             (o_ref, lse_ref, dq_ref, dk_ref, dv_ref)):
        assert_close(name, a, e, 1e-12)
        assert_close(f"fresh {name}", b, e, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_backward_from_delta_keeps_low_precision_accuracy(dtype):
    """A delta given in fp32 reaches the fused op as two input-precision numbers (hi + lo, or
    the two columns of the stand-in output), so the gradients match those computed from o
    itself to one rounding of their magnitude. Values off zero make delta large next to the
    ds = p (dp - delta) it cancels in: a delta rounded to the input precision alone misses
    that bound by 2.5x (bf16) to 3.6x (fp16). Both ways of feeding delta are checked."""
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 48, 4, 16, generator=g) for _ in range(4))
    q, k, v, do = (t.to(dtype) for t in (q, k, v + 3, do + 2))
    o, lse = torch_cpu.flash_fwd(q, k, v, True, 0.25)
    from_output = torch_cpu.flash_bwd(do, q, k, v, o, lse, True, 0.25)
    delta = torch_cpu.softmax_delta(do, o)
    stand_in = torch_cpu.flash_bwd(do, q, k, v, None, lse, True, 0.25, delta=delta)
    padded = torch_cpu._flash_bwd_with_delta(do, q, k, v, delta, lse, True, 0.25)
    for way, from_delta in (("stand-in output", stand_in), ("padded columns", padded)):
        for name, a, e in zip(("dq", "dk", "dv"), from_delta, from_output):
            assert_close(name, a, e, torch.finfo(dtype).eps, way)


@pytest.mark.parametrize("lse_grad", [False, True])
def test_backward_from_delta_where_do_has_zero_rows(lse_grad):
    """Rows with dO = 0 (masked tokens): with no lse gradient there delta is 0 and the stand-in
    output still exists; with one (only lse used there) it cannot, and the padded path runs."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 12, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    do = torch.randn(1, 12, 2, 6, generator=g, dtype=torch.float64)
    do[:, 3:7] = 0
    dlse = torch.randn(1, 2, 12, generator=g, dtype=torch.float64) * lse_grad
    o, lse = attention_reference(q, k, v, causal=True, scale=0.3)
    expected = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    delta = torch_cpu.softmax_delta(do, o.detach(), dlse)
    assert (torch_cpu._output_for_delta(do, delta) is None) == lse_grad
    grads = torch_cpu.flash_bwd(do, q.detach(), k.detach(), v.detach(), None, lse.detach(), True,
                                0.3, delta=delta)
    for name, a, e in zip(("dq", "dk", "dv"), grads, expected):
        assert_close(name, a, e, 1e-12)


def test_backward_needs_the_output_or_delta_not_both():
    q = torch.randn(1, 4, 2, 8)
    lse = torch.zeros(1, 2, 4)
    blocks = plan_blocks((Run(0, 4),), (Run(0, 4),), causal=True)
    grads = [torch.zeros_like(q) for _ in range(3)]
    for o, dlse, delta in ((None, None, None), (q, None, lse), (None, lse, lse)):
        with pytest.raises(ValueError, match="pass the final o \\(and dlse\\), or delta alone"):
            KERNELS["chunked"].bwd_into(*grads, q, q, q, q, o, lse, dlse, blocks, 1.0, delta=delta)


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    """Queries before every key (a ring step a zigzag rank never needs) produce nothing."""
    q_runs, k_runs = (Run(0, 4),), (Run(2, 4),)
    blocks = plan_blocks(q_runs, k_runs, causal=True)
    q = torch.randn(1, 4, 2, 8)
    for kernel in KERNELS.values():
        o = torch.zeros(1, 4, 2, 8)
        lse = torch.full((1, 2, 4), float("-inf"))
        kernel.fwd_into(o, lse, q, q, q, blocks, 0.5)
        assert torch.isinf(lse[:, :, :2]).all() and (o[:, :2] == 0).all()
        assert torch.isfinite(lse[:, :, 2:]).all() and not torch.isnan(o).any()


# ---------------------------------------------------------------- linear-attention reference

def recurrent_linear_attention(q, k, v, log_decay, scale):
    """The recurrent form: state_t = lambda * state_{t-1} + k_t^T v_t;  o_t = scale * q_t state_t."""
    b, s, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=q.dtype)
    lam = torch.exp(-log_decay)[None, :, None, None]
    out = []
    for t in range(s):
        state = lam * state + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        out.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], state))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("log_decay", [[0.0, 0.0], [0.05, 0.5], [3.0, 40.0]], ids=["none", "mild", "strong"])
def test_linear_attention_reference_matches_the_recurrence(log_decay):
    from seqpar.kernels import linear_attention_reference
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 11, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 11, 2, 5, generator=g, dtype=torch.float64)  # Dk != Dv
    decay = torch.tensor(log_decay, dtype=torch.float64)
    expected = recurrent_linear_attention(q, k, v, decay, 0.7)
    assert_close("causal", linear_attention_reference(q, k, v, decay=decay, scale=0.7), expected, 1e-12)
    if not any(log_decay):
        assert_close("decay=None", linear_attention_reference(q, k, v, scale=0.7), expected, 1e-12)
    # non-causal: a forward and a backward recurrence, minus the double-counted diagonal
    flipped = recurrent_linear_attention(q.flip(1), k.flip(1), v.flip(1), decay, 0.7).flip(1)
    diagonal = 0.7 * torch.einsum("bshd,bshd->bsh", q, k)[..., None] * v
    assert_close("non-causal", linear_attention_reference(q, k, v, decay=decay, causal=False, scale=0.7),
                 expected + flipped - diagonal, 1e-12)


def test_causal_plans_touch_only_reachable_keys():
    """A query block against a longer key block (all-gather K/V) never spans unseen keys."""
    blocks = plan_blocks((Run(8, 4),), (Run(0, 32),), causal=True)
    assert max(b.k1 for b in blocks) == 12  # keys 12.. are after every query
    assert causal_pairs(blocks) == sum(min(32, p + 1) for p in range(8, 12))
