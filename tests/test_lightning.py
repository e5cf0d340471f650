"""The Triton Lightning kernel on CPU under TRITON_INTERPRET=1, and LASP-2 running on it.

triton reads TRITON_INTERPRET when `triton.jit` decorates a kernel, i.e. when
seqpar.kernels.lightning is imported. So these checks run in their own 2-rank world whose
processes start with TRITON_INTERPRET=1 (`interpreted_worlds`, tests/conftest.py); this test process and every other
world never see it. Small shapes: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.aot import SM80_SHARED_BYTES, compile_shared_bytes
from tests.linear_cases import LinearCase, check_kernel_chain, check_kernel_intra, lasp2_bytes

pytest.importorskip("triton", reason="triton is not installed (pip install 'seqpar[gpu]'): the Triton kernels are not tested")


@pytest.fixture
def interpreted(interpreted_worlds):
    return interpreted_worlds(2)


def interpreter_is_on() -> bool:
    from triton import knobs
    return bool(knobs.runtime.interpret)


def test_only_the_interpreter_world_interprets(interpreted):
    import os
    assert interpreted.run(interpreter_is_on) == [True, True]
    assert os.environ.get("TRITON_INTERPRET") is None


@pytest.mark.parametrize("decay", ["none", "mild", "strong", "extreme"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_lightning_state_chain_matches_reference(interpreted, dtype, decay):
    """State in, state out and both gradients; ragged blocks (parts of 13, 16, 8 tokens in
    blocks of 16); Dk = 5, Dv = 7 padded to 16 inside the kernel."""
    interpreted.run(check_kernel_chain, "lightning", dtype, decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lightning_auto_block_at_head_dim_128(interpreted, dtype):
    """The block the kernel picks for itself at the largest head dims it takes (Dk=128, Dv=96)."""
    interpreted.run(check_kernel_chain, "lightning", dtype, "mild", (13, 40), None, (128, 96))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("decay", ["none", "strong"])
def test_lightning_intra_matches_reference(interpreted, decay, causal):
    interpreted.run(check_kernel_intra, "lightning", torch.float32, decay, causal)


def check_lasp2_on_lightning(case: LinearCase) -> None:
    import torch.distributed as dist

    from tests.linear_cases import run_linear_case
    errors = run_linear_case(case)
    expected = lasp2_bytes(case, dist.get_world_size())
    assert errors["bytes_fwd"] == errors["bytes_bwd"] == expected


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lasp2_on_the_lightning_kernel(interpreted, causal):
    """The CUDA path's kernel under the LASP-2 backend: 2 ranks, zigzag, decay, fp32."""
    case = LinearCase(layout="zigzag", causal=causal, decay="mild", seq_local=20,
                      dtype=torch.float32, kernel="lightning")
    interpreted.run(check_lasp2_on_lightning, case)


def compile_for_sm80(dtype: torch.dtype, head_dim: int) -> list[int]:
    """Compile the three kernels ahead of time for sm_80 (no GPU needed: triton ships ptxas)
    with the block `auto_block` picks; return each one's shared memory in bytes."""
    from seqpar.kernels import lightning
    block = lightning.auto_block(head_dim, head_dim, dtype)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    element = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    used = []
    for kernel, flags in ((lightning._lightning_fwd, ("HAS_STATE_IN", "HAS_STATE_OUT")),
                          (lightning._lightning_bwd_dq, ("HAS_STATE_IN",)),
                          (lightning._lightning_bwd_dkv, ("HAS_DSTATE_OUT", "HAS_DSTATE_IN"))):
        constants = dict(HEADS=4, DK=head_dim, DV=head_dim, DK_PAD=head_dim, DV_PAD=head_dim,
                         BLOCK=block, PRECISION=precision, **{flag: True for flag in flags})
        names = inspect.signature(kernel.fn).parameters
        # Upper-case parameters are tensors (inputs in `dtype`, results and states fp32).
        kinds = {n: f"*{element if n in ('Q', 'K', 'V', 'DO') else 'fp32'}" if n.isupper() else
                 "fp32" if n == "scale" else "i32" for n in names if n not in constants}
        used.append(compile_shared_bytes(kernel, kinds, constants))
    return used


def test_kernels_compile_for_a_gpu_within_shared_memory():
    """The real (not interpreted) compiler accepts the three kernels, and with the block
    auto_block picks they fit the smallest shared memory we target. fp32 at head dim 64 is the
    tightest case (160 of 163 KiB); the others are listed in `auto_block` (compiling costs
    ~20 s per case on a 2-core CPU, so only this one runs)."""
    used = compile_for_sm80(torch.float32, 64)
    assert max(used) <= SM80_SHARED_BYTES, used
