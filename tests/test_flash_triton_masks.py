"""Triton flash kernels with documents, sliding windows, the causal flag and soft caps, vs the
float64 reference (`attention_reference` with q_pos / k_pos, cu_seqlens, window, softcap).

Like tests/test_flash_triton.py, the kernels run in a one-rank world under the Triton
interpreter at small shapes (its tiles are 16 x 16, so a 40-token block already spans three
tiles and the tile-skipping paths are exercised), and the new kernel variants are compiled ahead
of time for sm_80. Every case compares o, lse, dq, dk and dv.

Tolerances: fp32 1e-5 relative, as in test_flash_triton.py (single-precision dot products of
<= 64 terms; the soft cap adds a tanh computed as 1 - 2 / (e^2x + 1), whose absolute error is a
few fp32 ulps of 1, i.e. well below 1e-5 of the scores). bf16: within 2 x the error of the same
masked attention computed by PyTorch in bf16 (the reference in bf16: what a user without the
kernel would run), plus eps/4 of the magnitude (the kernel rounds its output to bf16 once).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import attention_reference
from seqpar.kernels.flash import FULL, MaskMode, MaskSpec, flash_bwd, flash_fwd
from tests.aot import SM80_SHARED_BYTES, compile_shared_bytes
from tests.checks import assert_close, magnitude, max_error

SCALE = 0.3
# Documents of length 1 (0, 1, 9, 23), one crossing two 16-token tiles (10..22), one ending a
# tile early (24..39).
CU_40 = torch.tensor([0, 1, 2, 9, 10, 23, 24, 40])
CU_70 = torch.tensor([0, 5, 6, 30, 31, 70])
_PERM = torch.randperm(70, generator=torch.Generator().manual_seed(0))


def arange(start, n, step=1):
    return start + step * torch.arange(n)


def arith(q_start, n_q, k_start, n_k, step=1, **mask):
    """A MaskSpec with arithmetic positions and the position vectors the reference needs."""
    spec = MaskSpec(MaskMode.ARITHMETIC, q_start, step, k_start, step, **mask)
    return spec, arange(q_start, n_q, step), arange(k_start, n_k, step)


# (name, n_q, n_k, (spec, q positions, k positions), softcap, (Hq, Hkv), head dim)
CASES = [
    ("docs causal", 40, 40, arith(0, 40, 0, 40, cu_seqlens=CU_40), None, (4, 2), 16),
    ("docs non-causal mqa", 40, 40, arith(0, 40, 0, 40, causal=False, cu_seqlens=CU_40), None,
     (4, 1), 24),
    ("window 1", 40, 40, arith(0, 40, 0, 40, window=1), None, (4, 2), 16),
    # a ring step: every key precedes the queries; the window hides the first keys
    ("window 5 ring step", 20, 50, arith(30, 20, 0, 50, window=5), None, (4, 2), 16),
    # keys after the queries, not causal: rows 0..8 see nothing (lse -inf, o 0)
    ("window 7 non-causal keys later", 20, 30, arith(0, 20, 15, 30, causal=False, window=7),
     None, (2, 2), 16),
    # one document covering everything: the binary search has no step to take
    ("window larger than S, one document", 40, 40,
     arith(0, 40, 0, 40, window=1000, cu_seqlens=torch.tensor([0, 40])), None, (3, 3), 40),
    ("softcap, no mask", 24, 40, (FULL, None, None), 1.0, (4, 2), 16),
    # striped layout (positions step 4), every ingredient at once
    ("striped docs window softcap", 17, 17, arith(1, 17, 2, 17, step=4, window=9, cu_seqlens=CU_70),
     1.5, (4, 2), 16),
    # a zigzag second half (global positions 50..69) against the first 40 tokens
    ("zigzag half docs window", 20, 40, arith(50, 20, 0, 40, window=30, cu_seqlens=CU_70), None,
     (4, 2), 16),
    # int64 positions and boundaries (past 2^32): nothing is truncated to 32 bits
    ("positions past 2^32", 20, 30, arith(2**33, 20, 2**33 - 10, 30, window=5,
                                          cu_seqlens=torch.tensor([0, 2**33 + 3, 2**34])),
     None, (2, 1), 16),
    ("explicit non-causal docs window softcap", 20, 30,
     (MaskSpec(MaskMode.EXPLICIT, q_pos=_PERM[:20], k_pos=_PERM[20:50], causal=False, window=12,
               cu_seqlens=CU_70), _PERM[:20], _PERM[20:50]), 2.0, (4, 2), 16),
]


def problem(n_q, n_k, heads_q, heads_kv, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n_q, heads_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, n_k, heads_kv, dim, generator=g, dtype=torch.float64)
    v = torch.randn(1, n_k, heads_kv, dim, generator=g, dtype=torch.float64)
    do = torch.randn(1, n_q, heads_q, dim, generator=g, dtype=torch.float64)
    return q, k, v, do


def reference(q, k, v, do, spec, q_pos, k_pos, softcap, **override):
    """o, lse, dq, dk, dv of the reference for what `spec` means (keywords override it)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    masks = dict(causal=spec.mode is not MaskMode.FULL and spec.causal, window=spec.window,
                 cu_seqlens=spec.cu_seqlens, softcap=softcap)
    masks.update(override)
    o, lse = attention_reference(q, k, v, scale=SCALE, q_pos=q_pos, k_pos=k_pos, **masks)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    return [o.detach(), lse.detach(), *grads]


def triton_run(q, k, v, do, spec, softcap, dtype=torch.float32):
    cast = [t.to(dtype) for t in (q, k, v, do)]
    o, lse = flash_fwd(*cast[:3], SCALE, spec, softcap=softcap)
    # delta from the kernel's own output, as a backend would compute it
    delta = (cast[3].float() * o.float()).sum(-1).transpose(1, 2)
    return [o, lse, *flash_bwd(cast[3], *cast[:3], lse, delta, SCALE, spec, softcap=softcap)]


LABELS = ("o", "lse", "dq", "dk", "dv")


def check_fp32(name, n_q, n_k, masking, softcap, heads, dim):
    spec, q_pos, k_pos = masking
    q, k, v, do = problem(n_q, n_k, *heads, dim)
    expected = reference(q, k, v, do, spec, q_pos, k_pos, softcap)
    actual = triton_run(q, k, v, do, spec, softcap)
    for label, a, e in zip(LABELS, actual, expected):
        assert_close(label, a, e, 1e-5, f"{name}:")


@pytest.mark.parametrize("name,n_q,n_k,masking,softcap,heads,dim", CASES, ids=[c[0] for c in CASES])
def test_masked_flash_matches_reference(interpreted_worlds, name, n_q, n_k, masking, softcap,
                                        heads, dim):
    interpreted_worlds(1).run(check_fp32, name, n_q, n_k, masking, softcap, heads, dim)


def check_every_ingredient_bites():
    """The comparison is not vacuous: in the all-ingredients case the kernel disagrees with the
    reference as soon as any one of window, documents, causality or soft cap is dropped (or the
    window reaches one more key: positions step by 4), and the soft cap works at s / c of 1 to 3."""
    name, n_q, n_k, (spec, q_pos, k_pos), softcap, heads, dim = next(
        case for case in CASES if case[0] == "striped docs window softcap")
    q, k, v, do = problem(n_q, n_k, *heads, dim)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * SCALE
    assert (scores.abs() / softcap).quantile(0.9) > 1.0 and (scores.abs() / softcap).max() < 5
    actual = triton_run(q, k, v, do, spec, softcap)
    for wrong in (dict(window=None), dict(window=spec.window + 4), dict(cu_seqlens=None),
                  dict(causal=False), dict(softcap=None)):
        expected = reference(q, k, v, do, spec, q_pos, k_pos, **{"softcap": softcap, **wrong})
        worst = max(max_error(a, e) / magnitude(e) for a, e in zip(actual, expected))
        assert worst > 1e-2, (wrong, worst)


def test_every_ingredient_changes_the_result(interpreted_worlds):
    interpreted_worlds(1).run(check_every_ingredient_bites)


def check_skipped_tiles(mask, poisoned_keys, poisoned_rows, checked):
    """Tiles with no visible entry are never computed. With the interpreter's 16 x 16 tiles,
    NaN is written into whole key tiles (K, V) and query tiles (Q, dO) that no checked row / key
    -- nor any row / key in the same tiles as them (their NaN delta would spread) -- can see:
    had the kernel visited a poisoned tile, 0 * NaN would reach the checked outputs."""
    spec, q_pos, k_pos = arith(0, 64, 0, 64, **mask)
    q, k, v, do = problem(64, 64, 2, 1, 16)
    expected = reference(q, k, v, do, spec, q_pos, k_pos, None)
    k[:, poisoned_keys], v[:, poisoned_keys] = float("nan"), float("nan")
    q[:, poisoned_rows], do[:, poisoned_rows] = float("nan"), float("nan")
    o, lse, dq, dk, dv = triton_run(q, k, v, do, spec, None)
    for label, a, e in (("o", o[:, checked], expected[0][:, checked]),
                        ("lse", lse[..., checked], expected[1][..., checked]),
                        ("dq", dq[:, checked], expected[2][:, checked]),
                        ("dk", dk[:, checked], expected[3][:, checked]),
                        ("dv", dv[:, checked], expected[4][:, checked])):
        assert_close(label, a, e, 1e-5, f"{mask}:")


@pytest.mark.parametrize("mask,poisoned_keys,poisoned_rows,checked", [
    # causal, W = 8: rows 32.. see keys 25.. (key tiles 1-3), keys 32.. are seen by rows ..54
    (dict(window=8), slice(0, 16), slice(0, 16), slice(32, 64)),
    # not causal, W = 8: rows 0..15 see keys ..22 (tiles 0-1), keys 0..15 rows ..22; the rows
    # and keys sharing those tiles (..31) reach ..38, clear of the poisoned tile 3
    (dict(causal=False, window=8), slice(48, 64), slice(48, 64), slice(0, 16)),
    # documents [0, 16) [16, 40) [40, 64): rows / keys 40.. only meet tiles 2-3
    (dict(cu_seqlens=torch.tensor([0, 16, 40, 64])), slice(0, 16), slice(0, 16), slice(40, 64)),
], ids=["causal-window", "non-causal-window", "documents"])
def test_tiles_without_visible_pairs_are_skipped(interpreted_worlds, mask, poisoned_keys,
                                                 poisoned_rows, checked):
    interpreted_worlds(1).run(check_skipped_tiles, mask, poisoned_keys, poisoned_rows, checked)


def check_bf16():
    dtype = torch.bfloat16
    spec, q_pos, k_pos = arith(0, 48, 0, 48, window=20, cu_seqlens=torch.tensor([0, 1, 30, 48]))
    q, k, v, do = problem(48, 48, 4, 2, 32)
    softcap = 1.0
    expected = reference(q, k, v, do, spec, q_pos, k_pos, softcap)
    actual = triton_run(q, k, v, do, spec, softcap, dtype)
    assert actual[0].dtype == dtype
    same_precision = reference(*(t.to(dtype) for t in (q, k, v, do)), spec, q_pos, k_pos, softcap)
    for label, a, c, e in zip(LABELS, actual, same_precision, expected):
        bound = 2 * max_error(c, e) + magnitude(e) * torch.finfo(dtype).eps / 4
        assert max_error(a, e) <= bound, (label, max_error(a, e), bound)


def test_masked_flash_bf16(interpreted_worlds):
    interpreted_worlds(1).run(check_bf16)


@pytest.mark.parametrize("make,match", [
    (lambda: MaskSpec(MaskMode.FULL, window=4), "window or documents need positions"),
    (lambda: MaskSpec(MaskMode.FULL, cu_seqlens=CU_40), "window or documents need positions"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, window=0), r"window=0; pass an int >= 1"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, window=2.5), r"window=2.5; pass an int >= 1"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, window=True), r"window=True; pass an int >= 1"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, cu_seqlens=CU_40.float()), "1-D integer tensor"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, cu_seqlens=torch.tensor([0])), "at least 2 entries"),
    (lambda: MaskSpec(MaskMode.ARITHMETIC, 0, 0, 0, 1), r"q_step=0, k_step=1; arithmetic"),
    (lambda: MaskSpec(MaskMode.EXPLICIT, q_pos=arange(0, 4)), "EXPLICIT needs both"),
    (lambda: flash_fwd(*problem(4, 4, 1, 1, 16)[:3], SCALE, FULL, softcap=0.0),
     r"softcap=0.0; pass a finite number > 0"),
    (lambda: flash_bwd(*problem(4, 4, 1, 1, 16), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4),
                       SCALE, FULL, softcap=-1.0), r"softcap=-1.0; pass a finite number > 0"),
], ids=["full+window", "full+docs", "window 0", "window float", "window bool", "cu float",
        "cu short", "step 0", "explicit missing", "softcap 0", "bwd softcap < 0"])
def test_bad_masks_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


MASKED_KINDS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16",
                "LSE": "*fp32", "DELTA": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32",
                "QPOS": "*i64", "KPOS": "*i64", "CU": "*i64", "ROW_PTR": "*i32",
                "COL_IDX": "*i32", "COL_PTR": "*i32", "ROW_IDX": "*i32", "scale": "fp32",
                "scale_log2": "fp32", "cap_log2": "fp32", "q_start": "i64", "q_step": "i64",
                "k_start": "i64", "k_step": "i64", "window": "i64"}


@pytest.mark.parametrize("kernel,mode,causal,dtype,tiles", [
    ("_fwd_kernel", 1, True, "bf16", (128, 64, 3)), ("_bwd_dq_kernel", 1, True, "bf16", (128, 64, 3)),
    ("_bwd_dkdv_kernel", 1, True, "bf16", (128, 64, 3)),
    ("_bwd_dkdv_kernel", 2, False, "fp32", (64, 32, 2))])
def test_masked_kernels_compile_for_a_gpu_within_shared_memory(kernel, mode, causal, dtype, tiles):
    """The real compiler accepts the window + documents + soft-cap variants for sm_80 at head
    dim 128 (arithmetic causal in bf16 with the large tiles; explicit non-causal in fp32 with
    the fallback tiles), within an A100's shared memory."""
    from seqpar.kernels import flash
    block_m, block_n, stages = tiles
    constants = dict(MASK_MODE=mode, CAUSAL=causal, WINDOW=True, DOCS=True, SOFTCAP=True,
                     UPCAST=False, BLOCK_D=128, SPARSE_BLOCK=0,
                     PRECISION="ieee" if dtype == "fp32" else "tf32",
                     BLOCK_M=block_m, BLOCK_N=block_n)
    assert any(c.kwargs == {"BLOCK_M": block_m, "BLOCK_N": block_n} and c.num_stages == stages
               for c in flash._configs())
    kinds = {name: kind.replace("bf16", dtype) for name, kind in MASKED_KINDS.items()}
    used = compile_shared_bytes(getattr(flash, kernel), kinds, constants, 80,
                                num_warps=4, num_stages=stages)
    assert 0 < used <= SM80_SHARED_BYTES, used
