"""backend="s2": Ulysses all-to-all + block-sparse S2 heads, vs the float64 reference masked with
the same pattern (built from GLOBAL head ids), on every rank: output, lse, dq, dk, dv; bytes."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.layout import LAYOUTS
from tests.attention_cases import AttnCase, run_case_and_count
from tests.markers import needs_triton
from tests.test_ulysses import ulysses_bytes

PATTERNS = {
    "hetero": seqpar.S2Pattern(block_size=4, local_blocks=2, vert_stride=3),
    "homogeneous": seqpar.S2Pattern(block_size=4, local_blocks=1, vert_stride=2, heterogeneous=False),
    "phi3-offset": seqpar.S2Pattern(block_size=8, local_blocks=1, vert_stride=4, head_offset=1),
}


def check_s2(case: AttnCase) -> dict:
    """Same all-to-alls as Ulysses, so the same bytes (recorded under "s2.*")."""
    return run_case_and_count(case, ulysses_bytes)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_s2_fp32(worlds, world, layout, pattern):
    """GQA 8:4 with 4 heterogeneous kv heads: a rank holding global kv heads 2, 3 must use
    their stripes, not those of heads 0, 1 -- the masked reference tells them apart."""
    case = AttnCase(backend="s2", layout=layout, heads_q=8, heads_kv=4, head_dim=16,
                    seq_local=32 // world, s2=PATTERNS[pattern], lse_grad=world != 2)
    worlds(world).run(check_s2, case)


@pytest.mark.parametrize("world", [2, 4])
def test_s2_fp64_is_exact(worlds, world):
    case = AttnCase(backend="s2", layout="zigzag", dtype=torch.float64, heads_q=4, heads_kv=2,
                    head_dim=8, seq_local=64 // world, batch=2, s2=PATTERNS["hetero"])
    worlds(world).run(check_s2, case)


@needs_triton
def test_s2_triton_kernel(interpreted_worlds):
    """The block-sparse Triton kernel in the middle (interpreter on CPU; block >= 16)."""
    case = AttnCase(backend="s2", layout="zigzag", heads_q=4, heads_kv=2, head_dim=16,
                    seq_local=32, kernel="triton", lse_grad=False,
                    s2=seqpar.S2Pattern(block_size=16, local_blocks=1, vert_stride=2))
    interpreted_worlds(2).run(check_s2, case)


def s2_errors(name: str) -> tuple[str, str]:
    q = torch.randn(1, 8, 4, 16)
    calls = {
        "no pattern": lambda: seqpar.attention(q, q, q, backend="s2"),
        "not a pattern": lambda: seqpar.attention(q, q, q, backend="s2", s2={"block_size": 4}),
        "non-causal": lambda: seqpar.attention(q, q, q, backend="s2", causal=False,
                                               s2=seqpar.S2Pattern(block_size=4)),
        "partial block": lambda: seqpar.attention(q, q, q, backend="s2",
                                                  s2=seqpar.S2Pattern(block_size=32)),
        "pattern differs": lambda: seqpar.attention(
            q, q, q, backend="s2",
            s2=seqpar.S2Pattern(block_size=4, vert_stride=2 + dist.get_rank())),
        "heads not divisible": lambda: seqpar.attention(torch.randn(1, 8, 3, 16), q[:, :, :1],
                                                        q[:, :, :1], backend="s2",
                                                        s2=seqpar.S2Pattern(block_size=4)),
    }
    try:
        calls[name]()
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return type(error).__name__, str(error)
    return "nothing raised", ""


@pytest.mark.parametrize("name,kind,pattern", [
    ("no pattern", "ValueError", r"backend='s2' needs its sparsity pattern: pass s2=seqpar.S2Pattern"),
    ("not a pattern", "TypeError", r"s2 must be a seqpar.S2Pattern, got dict"),
    ("non-causal", "ValueError", r"backend='s2' is causal only"),
    ("partial block", "ValueError", r"global sequence length 16 is not a multiple of s2.block_size=32; pad it to 32"),
    ("pattern differs", "ValueError", r"s2.vert_stride differs across ranks"),
    ("heads not divisible", "ValueError", r"backend='s2' shards the 3 query heads over the 2 ranks"),
])
def test_s2_malformed_calls_raise_on_every_rank(worlds, name, kind, pattern):
    for rank, (got, message) in enumerate(worlds(2).run(s2_errors, name, timeout=60)):
        assert got == kind, f"rank {rank}: {got}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"


def warns_when_heads_miss_blocks() -> list[str]:
    q = torch.randn(1, 16, 2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqpar.attention(q, q, q, backend="s2", layout="contiguous",
                         s2=seqpar.S2Pattern(block_size=4, local_blocks=1, vert_stride=4))
    return [str(w.message) for w in caught]


def test_s2_backend_warns_about_uncovered_context(worlds):
    for messages in worlds(2).run(warns_when_heads_miss_blocks):
        assert any("covers only" in m for m in messages), messages
