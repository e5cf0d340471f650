"""Every softmax backend with the Triton flash kernel as its local compute (what runs on CUDA),
vs the float64 reference on every rank. Without a GPU the kernels run under the Triton
interpreter (tests/conftest.py), so the shapes are small: the point is that each backend's
sub-block plans (ring steps, zigzag halves, striped offsets, all-gather key ranges, TokenRing's
backward from delta) reach the kernel with the right masks."""

from __future__ import annotations

import pytest
import torch

from tests.attention_cases import AttnCase, run_case
from tests.markers import needs_triton

pytestmark = needs_triton

CASES = [
    AttnCase(backend="ring", layout="zigzag", heads_q=4, heads_kv=2, kernel="triton"),
    AttnCase(backend="ring", layout="striped", heads_q=2, heads_kv=2, head_dim=24, kernel="triton"),
    AttnCase(backend="ring", layout="contiguous", causal=False, heads_q=2, heads_kv=1, kernel="triton"),
    AttnCase(backend="tokenring", layout="zigzag", heads_q=4, heads_kv=2, kernel="triton"),
    AttnCase(backend="allgather", layout="striped", heads_q=4, heads_kv=2, kernel="triton"),
    AttnCase(backend="ulysses", layout="zigzag", heads_q=4, heads_kv=2, kernel="triton"),
    AttnCase(backend="ring", layout="zigzag", heads_q=4, heads_kv=2, kernel="triton",
             dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_with_triton_kernel(interpreted_worlds, case):
    interpreted_worlds(2).run(run_case, case, timeout=180)
