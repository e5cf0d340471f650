"""Local linear-attention kernels (single process): the state algebra, the chunked PyTorch
kernel vs the float64 reference (state in / out and their gradients), kernel selection.
The Triton kernel runs the same checks under the interpreter in tests/test_lightning.py."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import (ChunkedLinearKernel, linear_attention_reference, select_linear_kernel,
                            use_linear_kernel)
from seqpar.kernels.linear_state import scan_states
from tests.checks import assert_close
from tests.markers import needs_triton
from tests.linear_cases import check_kernel_chain, check_kernel_intra

DECAY_NAMES = ["none", "mild", "strong", "extreme"]


# Per batch entry: which of the 6 pieces a state crosses (documents: a piece holding a
# document start cuts the chain there).
PASSES = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, False]])


@pytest.mark.parametrize("documents", [False, True], ids=["dense", "documents"])
@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
@pytest.mark.parametrize("with_initial", [False, True], ids=["no-initial", "initial"])
def test_scan_states_matches_the_recurrence(reverse, with_initial, documents):
    g = torch.Generator().manual_seed(0)
    pieces = torch.randn(2, 3, 6, 4, 5, generator=g, dtype=torch.float64)
    initial = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) if with_initial else None
    log_decay = torch.tensor([0.0, 0.07, 0.9], dtype=torch.float64)
    step = 5
    carry = torch.exp(-log_decay * step)[None, :, None, None]
    order = range(5, -1, -1) if reverse else range(6)
    passes = PASSES if documents else torch.ones(2, 6, dtype=torch.bool)
    state = torch.zeros(2, 3, 4, 5, dtype=torch.float64) if initial is None else initial
    expected = torch.empty_like(pieces)
    for c in order:  # the state entering piece c, then piece c joins it (if the state crosses c)
        expected[:, :, c] = state
        state = carry * passes[:, c, None, None, None] * state + pieces[:, :, c]
    actual = scan_states(pieces, log_decay, step, reverse, initial,
                         passes=PASSES if documents else None)
    assert_close("scan", actual, expected, 1e-12)


# Global document boundaries of a 37-token sequence: documents of 1 token (first, last and
# in the middle), one spanning every kernel call and block, starts at call and block edges.
DOCUMENTS = {
    "ones-and-long": (0, 1, 2, 35, 36, 37),
    "edges": (0, 4, 13, 16, 29, 37),
    "inside": (0, 3, 5, 6, 18, 22, 31, 37),
}


@pytest.mark.parametrize("documents", list(DOCUMENTS))
@pytest.mark.parametrize("decay", ["none", "mild", "extreme"])
def test_chunked_documents_match_reference(decay, documents):
    """Parts of 13, 16, 8 tokens (state in / out) in blocks of 4, 2 blocks a span: document
    starts fall at call, span and block edges and inside blocks."""
    check_kernel_chain("chunked", torch.float64, decay, parts=(13, 16, 8), block=4,
                       cu_seqlens=DOCUMENTS[documents])
    for causal in (True, False):
        check_kernel_intra("chunked", torch.float64, decay, causal, block=4,
                           cu_seqlens=DOCUMENTS[documents])


def test_chunked_documents_fp32():
    check_kernel_chain("chunked", torch.float32, "mild", cu_seqlens=DOCUMENTS["inside"])


@pytest.mark.parametrize("decay", DECAY_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_chunked_state_chain_matches_reference(dtype, decay):
    check_kernel_chain("chunked", dtype, decay)


@pytest.mark.parametrize("parts,block", [((37,), 64), ((5, 1, 40), 4), ((64, 64), 16)],
                         ids=["one-ragged-block", "many-spans", "exact-blocks"])
def test_chunked_block_and_span_boundaries(parts, block):
    """Block 4 with 2 blocks per span: 40 tokens cross 5 spans and end in a ragged block."""
    check_kernel_chain("chunked", torch.float64, "mild", parts=parts, block=block)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("decay", DECAY_NAMES)
def test_chunked_intra_matches_reference(decay, causal):
    check_kernel_intra("chunked", torch.float64, decay, causal)


def test_strong_decay_underflows_to_exact_zero_without_nan():
    """s = 1000: every off-diagonal weight is exp(-1000 * d) = 0 exactly, never inf * 0."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 200, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    decay = torch.tensor([1000.0, 40.0], dtype=torch.float64)
    kernel = ChunkedLinearKernel(block=16, span_blocks=2)
    for causal in (True, False):
        o = kernel.intra_fwd(q, k, v, decay, 0.5, causal)
        assert torch.isfinite(o).all()
        assert_close("o", o, linear_attention_reference(q, k, v, decay=decay, causal=causal, scale=0.5),
                     1e-12)
        diagonal = 0.5 * (q[:, :, 0] * k[:, :, 0]).sum(-1, keepdim=True) * v[:, :, 0]
        assert_close("head with s=1000 sees only its own token", o[:, :, 0], diagonal, 1e-12)


def test_linear_kernel_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_linear_kernel(cpu, torch.float32).name == "chunked"
    assert select_linear_kernel(cuda, torch.float64).name == "chunked"  # Triton is fp16/bf16/fp32
    assert select_linear_kernel(cuda, torch.float32, 256).name == "chunked"  # state too big on chip
    with use_linear_kernel("chunked"):
        assert select_linear_kernel(cuda, torch.float32).name == "chunked"
    with pytest.raises(ValueError, match=r"use_linear_kernel: unknown kernel 'flash'; choose one of"):
        with use_linear_kernel("flash"):
            pass


@needs_triton
def test_linear_kernel_selection_picks_lightning_where_it_fits():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_linear_kernel(cuda, torch.bfloat16, 128).name == "lightning"
    with use_linear_kernel("lightning"):
        assert select_linear_kernel(cpu, torch.float32).name == "lightning"
    assert select_linear_kernel(cpu, torch.float32).name == "chunked"  # the context ended


@needs_triton
def test_lightning_refuses_what_it_cannot_hold():
    """Checked before any launch, so no GPU (or interpreter) is needed to see the errors."""
    from seqpar.kernels.lightning import LightningKernel
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match=r"lightning kernel: dtype torch.float64 is not supported"):
        LightningKernel().fwd(x.double(), x.double(), x.double(), torch.zeros(1), 1.0)
    wide = torch.randn(1, 4, 1, 200)
    with pytest.raises(ValueError, match=r"head dims Dk=8, Dv=200; at most 128 fit"):
        LightningKernel().fwd(x, x, wide, torch.zeros(1), 1.0)


class _Arrived:
    """A finished exchange: `wait()` gives a fixed tensor."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


@pytest.mark.parametrize("documents", [False, True], ids=["dense", "documents"])
@pytest.mark.parametrize("length", [32, 30], ids=["aligned", "ragged"])
def test_chunked_exchange_folds_the_state_like_the_generic_one(length, documents):
    """`fwd_exchanged` / `bwd_exchanged` of the chunked kernel (the arriving state and state
    gradient folded into its block scans) equal the generic `LinearKernel` ones (separate
    products over the chunk), fp64: what each posts, o, dq, dk, dv. Blocks of 4, 2 a span; a
    ragged chunk takes the direct final-state path."""
    from seqpar.kernels.linear_state import LinearKernel
    from tests.linear_cases import kernel_by_name, part_documents

    kernel = kernel_by_name("chunked", 4)
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, length, 3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    arriving, gradient = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    decay = torch.tensor([0.0, 0.07, 0.9], dtype=torch.float64)
    docs = (part_documents(torch.tensor([0, 3, 5, 6, 18, 22, 31, 40]), 5, length, 2)
            if documents else None)
    results = []
    for fwd, bwd in ((kernel.fwd_exchanged, kernel.bwd_exchanged),
                     (lambda *a, **kw: LinearKernel.fwd_exchanged(kernel, *a, **kw),
                      lambda *a, **kw: LinearKernel.bwd_exchanged(kernel, *a, **kw))):
        posted = []
        o, initial = fwd(q, k, v, decay, 0.3, lambda x: posted.append(x) or _Arrived(arriving),
                         docs=docs)
        grads = bwd(do, q, k, v, decay, 0.3, initial,
                    lambda x: posted.append(x) or _Arrived(gradient), docs=docs)
        results.append((*posted, o, *grads))
    for name, fast, generic in zip(("M", "D", "o", "dq", "dk", "dv"), *results):
        assert_close(name, fast, generic, 1e-12)
