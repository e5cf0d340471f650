"""Triton flash kernels (dense and block-sparse) vs the float64 reference.

Without a GPU they run in a one-rank world under the Triton interpreter (`interpreted_worlds`,
tests/conftest.py), at small shapes; one test compiles the kernels ahead of time for a real GPU. Forward output, lse and all three gradients are compared, for every mask mode, several
position offsets (ring steps, zigzag halves, striped), GQA and odd head dims.

Tolerances: fp32 1e-5 relative (single-precision dot products of <= 64 terms); fp16/bf16 within
2 x the error of PyTorch's fused CPU kernel on the same low-precision inputs, plus eps/4 of the
magnitude (same reasoning as tests/attention_cases.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'seqpar[gpu]'): "
                                     "the Triton kernels are not tested")

from seqpar.kernels import attention_reference  # noqa: E402 - after the skip, like flash
from seqpar.kernels.flash import FULL, TOP_LEFT_CAUSAL, MaskMode, MaskSpec, SparseBlocks, flash_bwd, flash_fwd
from seqpar.kernels.s2 import BlockLists, S2Pattern, block_mask
from seqpar.kernels.torch_cpu import flash_bwd as torch_flash_bwd, flash_fwd as torch_flash_fwd
from tests.aot import SM80_SHARED_BYTES, compile_shared_bytes
from tests.checks import assert_close, magnitude, max_error, s2_rule_token_mask

SCALE = 0.3


def arange(start, n, step=1):
    return start + step * torch.arange(n)


# (name, n_q, n_k, mask spec, q positions, k positions) — positions None means no mask
MASKS = [
    ("full", 40, 24, FULL, None, None),
    ("diagonal", 40, 40, TOP_LEFT_CAUSAL, arange(0, 40), arange(0, 40)),
    ("ring step, keys earlier", 20, 50, MaskSpec(MaskMode.ARITHMETIC, 30, 1, 0, 1), arange(30, 20), arange(0, 50)),
    ("ring step, keys later", 20, 30, MaskSpec(MaskMode.ARITHMETIC, 0, 1, 15, 1), arange(0, 20), arange(15, 30)),
    ("striped, src > r", 17, 17, MaskSpec(MaskMode.ARITHMETIC, 1, 4, 2, 4), arange(1, 17, 4), arange(2, 17, 4)),
    ("striped, src < r", 17, 17, MaskSpec(MaskMode.ARITHMETIC, 3, 4, 0, 4), arange(3, 17, 4), arange(0, 17, 4)),
]
_perm = torch.randperm(80, generator=torch.Generator().manual_seed(0))
MASKS.append(("explicit", 20, 30, MaskSpec(MaskMode.EXPLICIT, q_pos=_perm[:20], k_pos=_perm[20:50]),
              _perm[:20], _perm[20:50]))


def problem(n_q, n_k, heads_q, heads_kv, dim, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, heads_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n_k, heads_kv, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, n_k, heads_kv, dim, generator=g, dtype=torch.float64)
    do = torch.randn(batch, n_q, heads_q, dim, generator=g, dtype=torch.float64)
    return q, k, v, do


def reference(q, k, v, do, q_pos, k_pos, mask=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_reference(q, k, v, causal=q_pos is not None, scale=SCALE, q_pos=q_pos,
                                 k_pos=k_pos, mask=mask)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    return [o.detach(), lse.detach(), *grads]


def triton_run(q, k, v, do, o_ref, spec, dtype, sparse=None):
    cast = [t.to(dtype) for t in (q, k, v, do)]
    o, lse = flash_fwd(*cast[:3], SCALE, spec, sparse)
    # delta from the kernel's own output, as a backend would compute it
    delta = (cast[3].float() * o.float()).sum(-1).transpose(1, 2)
    return [o, lse, *flash_bwd(cast[3], *cast[:3], lse, delta, SCALE, spec, sparse)]


def check_fp32(name, n_q, n_k, spec, q_pos, k_pos, heads, dim):
    q, k, v, do = problem(n_q, n_k, *heads, dim)
    expected = reference(q, k, v, do, q_pos, k_pos)
    actual = triton_run(q, k, v, do, expected[0], spec, torch.float32)
    for label, a, e in zip(("o", "lse", "dq", "dk", "dv"), actual, expected):
        assert_close(label, a, e, 1e-5, f"{name}:")


@pytest.mark.parametrize("name,n_q,n_k,spec,q_pos,k_pos", MASKS, ids=[m[0] for m in MASKS])
@pytest.mark.parametrize("heads,dim", [((4, 2), 16), ((3, 3), 40), ((4, 1), 24)], ids=["gqa", "d40", "mqa-d24"])
def test_triton_flash_fp32(interpreted_worlds, name, n_q, n_k, spec, q_pos, k_pos, heads, dim):
    interpreted_worlds(1).run(check_fp32, name, n_q, n_k, spec, q_pos, k_pos, heads, dim)


def check_low_precision(dtype):
    q, k, v, do = problem(48, 48, 4, 2, 32)
    expected = reference(q, k, v, do, arange(0, 48), arange(0, 48))
    actual = triton_run(q, k, v, do, expected[0], TOP_LEFT_CAUSAL, dtype)
    # the same-precision fused CPU kernel's errors
    cast = [t.to(dtype) for t in (q, k, v, do)]
    o_cpu, lse_cpu = torch_flash_fwd(*cast[:3], True, SCALE)
    cpu = [o_cpu, lse_cpu, *torch_flash_bwd(cast[3], *cast[:3], o_cpu, lse_cpu, True, SCALE)]
    for label, a, c, e in zip(("o", "lse", "dq", "dk", "dv"), actual, cpu, expected):
        bound = 2 * max_error(c, e) + magnitude(e) * torch.finfo(dtype).eps / 4
        assert max_error(a, e) <= bound, (label, max_error(a, e), bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_flash_low_precision(interpreted_worlds, dtype):
    interpreted_worlds(1).run(check_low_precision, dtype)


def check_rows_that_see_nothing():
    q, k, v, do = problem(20, 30, 2, 2, 16)
    spec = MaskSpec(MaskMode.ARITHMETIC, 0, 1, 15, 1)  # queries 0..14 precede every key
    out = triton_run(q, k, v, do, None, spec, torch.float32)
    assert torch.isinf(out[1][:, :, :15]).all() and (out[0][:, :15] == 0).all()
    assert all(not torch.isnan(t).any() for t in out)


def test_rows_that_see_nothing_are_empty_not_nan(interpreted_worlds):
    interpreted_worlds(1).run(check_rows_that_see_nothing)


@pytest.mark.parametrize("pattern,heads", [
    (S2Pattern(block_size=16, local_blocks=2, vert_stride=3), (4, 2)),
    (S2Pattern(block_size=16, local_blocks=1, vert_stride=2, heterogeneous=False), (2, 2)),
    (S2Pattern(block_size=16, local_blocks=3, vert_stride=4, head_offset=1), (4, 4)),
], ids=["hetero-gqa", "homogeneous", "phi3-offset"])
def test_triton_block_sparse_matches_masked_reference(interpreted_worlds, pattern, heads):
    interpreted_worlds(1).run(check_block_sparse, pattern, heads)


def check_block_sparse(pattern, heads):
    seq, dim = 96, 24
    q, k, v, do = problem(seq, seq, *heads, dim, batch=1)
    nb = seq // pattern.block_size
    blocks = block_mask(pattern, nb, list(range(heads[1])), heads[0])  # what the kernel is given
    token_mask = s2_rule_token_mask(pattern, seq, *heads)  # the truth: DESIGN §4's rule
    expected = reference(q, k, v, do, arange(0, seq), arange(0, seq), mask=token_mask)
    lists = BlockLists.from_mask(blocks, "cpu")
    sparse = SparseBlocks(pattern.block_size, lists.row_ptr, lists.col_idx, lists.col_ptr, lists.row_idx)
    actual = triton_run(q, k, v, do, expected[0], TOP_LEFT_CAUSAL, torch.float32, sparse)
    for label, a, e in zip(("o", "lse", "dq", "dk", "dv"), actual, expected):
        assert_close(label, a, e, 1e-5, f"{pattern}:")


FLASH_KINDS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16",
               "LSE": "*fp32", "DELTA": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32",
               "QPOS": "*i64", "KPOS": "*i64", "ROW_PTR": "*i32", "COL_IDX": "*i32",
               "COL_PTR": "*i32", "ROW_IDX": "*i32", "scale": "fp32", "scale_log2": "fp32",
               "q_start": "i64", "q_step": "i64", "k_start": "i64", "k_step": "i64"}


@pytest.mark.parametrize("kernel,sparse,dtype,tiles", [
    ("_fwd_kernel", 0, "bf16", (128, 64, 3)), ("_bwd_dq_kernel", 0, "bf16", (128, 64, 3)),
    ("_bwd_dkdv_kernel", 0, "bf16", (128, 64, 3)), ("_fwd_kernel", 64, "bf16", (64, 64, 3)),
    ("_bwd_dkdv_kernel", 0, "fp32", (64, 32, 2)), ("_bwd_dq_kernel", 0, "fp32", (64, 32, 2))])
def test_flash_kernels_compile_for_a_gpu_within_shared_memory(kernel, sparse, dtype, tiles):
    """The real compiler (not the interpreter) accepts every kernel for sm_80 at head dim 128,
    and a config the autotuner holds fits an A100's shared memory: bf16 with the large dense
    tiles (128 x 64, 3 stages) and the 64-token sparse block; fp32 (full-precision products,
    twice the bytes) with the small fallback config (64 x 32, 2 stages)."""
    from seqpar.kernels import flash
    block_m, block_n, stages = tiles
    constants = dict(MASK_MODE=1, UPCAST=False, BLOCK_D=128, SPARSE_BLOCK=sparse,
                     PRECISION="ieee" if dtype == "fp32" else "tf32",
                     BLOCK_M=block_m, BLOCK_N=block_n)
    # the configs the autotuner holds for a CUDA run of these arguments (dense: the GPU list;
    # block-sparse: exactly one, tiles of the sparse block)
    on_gpu = {"Q": SimpleNamespace(device=SimpleNamespace(type="cuda"))}
    held = flash._prune(flash._configs(), on_gpu, SPARSE_BLOCK=sparse, BLOCK_D=128)
    assert any(c.kwargs == {"BLOCK_M": block_m, "BLOCK_N": block_n} and c.num_stages == stages
               for c in held), [(c.kwargs, c.num_stages) for c in held]
    kinds = {name: kind.replace("bf16", dtype) for name, kind in FLASH_KINDS.items()}
    used = compile_shared_bytes(getattr(flash, kernel), kinds, constants, 80,
                                num_warps=4, num_stages=stages)
    assert 0 < used <= SM80_SHARED_BYTES, used
