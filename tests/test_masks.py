"""Masks (documents, sliding windows, soft caps, sinks) on every softmax backend and layout,
against the float64 reference on every rank: output, lse, dq, dk, dv and dsinks (the per-rank
shares summed). A combinatorial cover, not the full product, to keep the suite fast."""

from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.cost.traffic import backend_volume
from tests.attention_cases import AttnCase, problem_of, run_case

SOFTMAX = ("ring", "tokenring", "ulysses", "usp", "allgather")
LAYOUT_CYCLE = ("zigzag", "contiguous", "striped")

# (docs, window, softcap, sinks, causal, heads q:kv) -- each row runs on several
# (backend, P, layout) below; between them every backend meets every layout and P in {1..4}.
MASKS = [
    ("mixed", None, None, False, True, (4, 2)),     # documents alone (length-1 ones included)
    ("span", 3, None, True, True, (4, 1)),          # MQA, a document spanning every rank, sinks
    (None, 1, None, False, False, (4, 4)),          # window 1, non-causal
    (None, 5, 2.0, True, False, (4, 2)),            # window + a soft cap that bites + sinks
    ("random", 7, None, False, True, (8, 2)),
    (None, 1000, None, True, True, (4, 2)),         # window > S
    ("mixed", None, 1.0, True, False, (4, 4)),
    (None, None, None, True, True, (4, 2)),         # sinks alone
    (None, None, 3.0, False, True, (8, 2)),         # a soft cap alone (the dense schedules)
]


def mask_grid() -> list:
    params = []
    for i, (docs, window, softcap, sinks, causal, heads) in enumerate(MASKS):
        for j, backend in enumerate(SOFTMAX):
            hq, hkv = heads
            world = 1 + (i + j) % 4
            if backend == "usp" and world not in (2, 4):
                world = 4 if world == 3 else 2
            layout = LAYOUT_CYCLE[(i + 2 * j) % 3]
            if backend == "ulysses" and hq % world:  # heads are sharded over the ranks
                hq, hkv = 6, (hkv if 6 % hkv == 0 else 3)
            case = AttnCase(backend=backend, layout=layout, causal=causal, heads_q=hq,
                            heads_kv=hkv, seq_local=12, head_dim=8, docs=docs, window=window,
                            softcap=softcap, sinks=sinks, lse_grad=(i + j) % 2 == 0,
                            dtype=torch.float64 if (i + j) % 3 == 0 else torch.float32)
            params.append(pytest.param(world, case, id=f"{world}-{case}"))
    return params


def test_auto_runs_masked_attention_exactly(worlds):
    case = AttnCase(backend="auto", layout="zigzag", heads_q=4, heads_kv=2, head_dim=8,
                    seq_local=12, docs="mixed", window=4, sinks=True, dtype=torch.float64)
    worlds(2).run(run_case, case)


def run_masked(case: AttnCase) -> dict:
    if case.backend == "usp":
        return run_case(case, group=seqpar.SPMesh(ulysses=2))
    return run_case(case)


@pytest.mark.parametrize("world,case", mask_grid())
def test_masks_match_reference(worlds, world, case):
    worlds(world).run(run_masked, case)


# Windows with B = 2 (documents need B = 1): the batched halo gather of all-gather and the
# rank-major head-sharded side of Ulysses / USP copy per batch entry.
BATCHED_WINDOWS = [AttnCase(backend=backend, layout=layout, causal=causal, heads_q=4, heads_kv=2,
                            seq_local=12, head_dim=8, batch=2, window=5)
                   for backend, layout, causal in (("allgather", "zigzag", True),
                                                   ("allgather", "contiguous", False),
                                                   ("ulysses", "striped", True),
                                                   ("usp", "zigzag", False))]


@pytest.mark.parametrize("case", BATCHED_WINDOWS, ids=str)
def test_batched_windows_match_reference(worlds, case):
    worlds(4).run(run_masked, case)


# (docs, window, causal, heads q:kv, dtype): layout="balanced" (chunks dealt by the documents'
# work) on every backend, each row on a different P; documents crossing the balanced chunks.
BALANCED_ROWS = [
    ("mixed", None, True, (4, 2), torch.float64),
    ("random", 5, True, (4, 1), torch.float32),
    ("span", None, False, (4, 4), torch.float64),
    ("0,5,6,40,41,77,96", 30, True, (8, 2), torch.float32),
]


def balanced_grid() -> list:
    params = []
    for i, (docs, window, causal, heads, dtype) in enumerate(BALANCED_ROWS):
        for j, backend in enumerate(SOFTMAX):
            world = (2, 3, 4)[(i + j) % 3]
            if backend == "usp" and world == 3:
                world = 4
            hq, hkv = heads
            if backend == "ulysses" and hq % world:
                hq, hkv = 6, 3 if hkv != 1 else 1
            seq_local = 96 // world if "," in docs else 12
            case = AttnCase(backend=backend, layout="balanced", causal=causal, heads_q=hq,
                            heads_kv=hkv, seq_local=seq_local, head_dim=8, docs=docs,
                            window=window, lse_grad=(i + j) % 2 == 0, dtype=dtype)
            params.append(pytest.param(world, case, id=f"{world}-{case}"))
    return params


@pytest.mark.parametrize("world,case", balanced_grid())
def test_balanced_layout_matches_reference(worlds, world, case):
    worlds(world).run(run_masked, case)


# ---------------------------------------------------------------- bytes: only what is seen moves

def bytes_of(case: AttnCase) -> tuple[int, int]:
    errors = run_case(case)  # exact as well as cheap
    return errors["bytes_fwd"], errors["bytes_bwd"]


# B = 1, Hq = 4, Hkv = 2, D = 8, fp32: one K/V row (k and v) is 2 * 2 * 8 * 4 = 128 bytes;
# one query row for TokenRing N * D * b = 4 * 8 * 4 = 128, its forward partial 4 * (32 + 4) = 144,
# its backward pack 4 * (64 + 8) = 288, its dq partial 4 * 32 = 128.
TRAFFIC = [
    # ring, contiguous, causal W = 5: rank r < P-1 sends the last W-1 = 4 rows of K/V to r + 1
    # (backward: again, plus the fp32 dK/dV of the 4 rows it received from r - 1, home).
    # The same at P = 2 and S_loc = 32: independent of P and S.
    ("ring", 4, "contiguous", 16, None, 5, [512, 512, 512, 0], [512, 1024, 1024, 512]),
    ("ring", 2, "contiguous", 32, None, 5, [512, 0], [512, 512]),
    # zigzag (chunks of 8): rank r sends 2 rows of chunk r to r + 1 and 2 of chunk 2P-1-r
    # to r - 1 (rank 0's chunk 7 and rank 3's chunk 3 feed nobody else).
    ("ring", 4, "zigzag", 16, None, 3, [256, 512, 512, 256], [512, 1024, 1024, 512]),
    # documents [0, 6) [6, 20) [20, 32), causal, contiguous S_loc = 8: rank 0 sends rows 6, 7
    # to ranks 1 and 2; rank 1 all 8 rows to rank 2; rank 2 rows 4..7 to rank 3.
    ("ring", 4, "contiguous", 8, "0,6,20,32", None, [512, 1024, 512, 0],
     [512, 1024 + 256, 512 + 1280, 512]),
    # TokenRing, contiguous, causal W = 5: the first 4 query rows of r >= 1 go to r - 1, which
    # returns their 4-row partial.
    ("tokenring", 4, "contiguous", 16, None, 5, [576, 512 + 576, 512 + 576, 512],
     [512, 1152 + 512, 1152 + 512, 1152]),
    # allgather, contiguous, causal W = 5: each rank shares its halo, the last 4 rows (rank 3's
    # is empty, padded to H = 4): (P - 1) * 4 rows each way, whatever S_loc (and P = 2 below).
    ("allgather", 4, "contiguous", 16, None, 5, [1536] * 4, [1536] * 4),
    ("allgather", 2, "contiguous", 32, None, 5, [512, 512], [512, 512]),
    # zigzag W = 3 (chunks of 8): halos of 2 rows per chunk some other rank sees: rank 0 two
    # (of chunk 0), ranks 1 and 2 four, rank 3 two (of chunk 4): H = 4.
    ("allgather", 4, "zigzag", 16, None, 3, [1536] * 4, [1536] * 4),
]


@pytest.mark.parametrize("backend,world,layout,seq_local,docs,window,fwd,bwd", TRAFFIC)
def test_masked_traffic_equals_the_documented_formula(worlds, backend, world, layout, seq_local,
                                                      docs, window, fwd, bwd):
    case = AttnCase(backend=backend, layout=layout, heads_q=4, heads_kv=2, head_dim=8,
                    seq_local=seq_local, docs=docs, window=window)
    sent = worlds(world).run(bytes_of, case)
    assert [f for f, _ in sent] == fwd
    assert [b for _, b in sent] == bwd
    # ... and the cost model's traffic formulas (seqpar.cost.traffic) say the same
    problem = problem_of(case, world, window=window,
                         documents=None if docs is None else tuple(int(b) for b in docs.split(",")))
    model = [backend_volume(backend, problem, rank) for rank in range(world)]
    assert [f.bytes for f, _ in model] == fwd and [b.bytes for _, b in model] == bwd
    if window is not None:
        chunk = seq_local // (2 if layout == "zigzag" else 1)
        assert max(fwd) <= 2 * chunk * 2 * 2 * 8 * 4  # at most two chunks' K/V (ring)


@pytest.mark.parametrize("backend", ["ring", "tokenring"])
def test_masks_in_bf16(worlds, backend):
    """bf16: within 2x the error of the same-precision single-device computation (seqpar's own
    CPU kernel on the whole masked sequence in one process, sinks applied after) plus eps/4 of
    the magnitude (`attention_cases` module docstring): per-block partials are rounded to bf16
    before the fp32 merge, the single-device run rounds once per block of its own plan."""
    case = AttnCase(backend=backend, layout="zigzag", heads_q=8, heads_kv=2, head_dim=32,
                    seq_local=32, docs="random", window=9, sinks=True, dtype=torch.bfloat16)
    worlds(4).run(run_case, case)


def sinks_on_rows_that_see_nothing() -> None:
    """Rows with L' = -inf (nothing visible) under a sink: o = 0, L = sink, finite gradients;
    and the sink step's gradient is exact (fp64 gradcheck, lse gradient included)."""
    from seqpar.kernels.sinks import AttentionSinks
    g = torch.Generator().manual_seed(0)
    o_inner = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
    lse_inner = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    o_inner[:, 1], lse_inner[:, :, 1] = 0.0, float("-inf")
    sinks = torch.tensor([0.3, -1.2], dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (o_inner, lse_inner, sinks)]
    o, lse = AttentionSinks.apply(*leaves)
    assert torch.equal(o[:, 1], torch.zeros_like(o[:, 1])) and torch.equal(lse[0, :, 1], sinks)
    (o.sum() + lse.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    finite = [t.clone().requires_grad_() for t in (o_inner, torch.randn(1, 2, 3, generator=g,
                                                                        dtype=torch.float64), sinks)]
    assert torch.autograd.gradcheck(lambda a, b, c: AttentionSinks.apply(a, b, c), finite)


def wrong_masks_are_caught() -> list[str]:
    """The comparison fails when the reference's mask differs slightly from seqpar's: a window
    one wider, one document boundary moved by one, a soft cap 10% off."""
    case = AttnCase(layout="zigzag", heads_q=4, heads_kv=2, head_dim=8, seq_local=8,
                    docs="0,5,16", window=4, softcap=1.0)
    run_case(case)  # the right one passes
    caught = []
    for name, wrong in (("window", {"window": 5}), ("cu_seqlens", {"cu_seqlens": torch.tensor([0, 6, 16])}),
                        ("softcap", {"softcap": 1.1})):
        try:
            run_case(case, reference_masks=wrong)
        except AssertionError:
            caught.append(name)
    return caught


def test_comparison_rejects_a_wrong_mask(worlds):
    assert worlds(2).run(wrong_masks_are_caught) == [["window", "cu_seqlens", "softcap"]] * 2


def test_sinks_step_is_exact_and_nan_free():
    sinks_on_rows_that_see_nothing()


# ---------------------------------------------------------------- work: only visible pairs

@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("rule_args", [(True, 5, None), (False, 3, None),
                                       (True, None, (0, 1, 9, 30, 31, 48)), (False, 7, (0, 20, 48))])
def test_backends_plan_only_visible_pairs(layout, rule_args):
    """Summed over the ranks, the (query, key) pairs the ring, TokenRing and all-gather plans
    compute are exactly the visible pairs of the sequence: no invisible block pair is planned
    (a step with nothing visible has an empty plan and computes nothing)."""
    from seqpar.comm.allgather import AllGatherPlan
    from seqpar.comm.primitives import GroupInfo
    from seqpar.comm.ring import RingPlan
    from seqpar.comm.tokenring import TokenRingPlan
    from seqpar.kernels import KERNELS
    from seqpar.kernels.mask import MaskRule, causal_pairs
    from seqpar.layout import all_local_runs
    rule = MaskRule(*rule_args)
    world, seq = 4, 48
    visible = int(rule.visible(torch.arange(seq), torch.arange(seq)).sum())
    runs = all_local_runs(seq, world, layout)
    kernel = KERNELS["flash"]
    ring = tokenring = allgather = 0
    empty_steps = 0
    for rank in range(world):
        info = GroupInfo(None, rank, world)
        plan = RingPlan.build(info, runs[rank], runs, rule, 1.0, kernel, ())
        ring += sum(causal_pairs(blocks) for blocks in plan.step_blocks)
        empty_steps += sum(not blocks for blocks in plan.step_blocks)
        tokenring += sum(causal_pairs(blocks) for blocks in
                         TokenRingPlan.build(info, runs, rule, 1.0, kernel, ()).blocks)
        allgather += causal_pairs(AllGatherPlan.build(info, runs, rule, 1.0, kernel, ()).blocks)
    assert ring == tokenring == allgather == visible
    if rule.window is not None and layout != "striped":
        assert empty_steps > 0  # windows leave whole steps with nothing to compute
