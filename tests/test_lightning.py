"""The Triton Lightning kernel on CPU under TRITON_INTERPRET=1, and LASP-2 running on it.

triton reads TRITON_INTERPRET when `triton.jit` decorates a kernel, i.e. when
seqpar.kernels.lightning is imported. So these checks run in their own 2-rank world whose
processes start with TRITON_INTERPRET=1 (`World(env=...)`); this test process and every other
world never see it. Small shapes: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import World
from tests.linear_cases import LinearCase, check_kernel_chain, check_kernel_intra, lasp2_bytes

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted():
    world = World(2, env={"TRITON_INTERPRET": "1"})
    yield world
    world.close()


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
