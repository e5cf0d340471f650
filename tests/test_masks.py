"""Masks (documents, sliding windows, soft caps, sinks) on every softmax backend and layout,
against the float64 reference on every rank: output, lse, dq, dk, dv and dsinks (the per-rank
shares summed). A combinatorial cover, not the full product, to keep the suite fast."""

from __future__ import annotations

import pytest
import torch

import seqpar
from tests.attention_cases import AttnCase, run_case

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


def run_masked(case: AttnCase) -> dict:
    if case.backend == "usp":
        return run_case(case, group=seqpar.SPMesh(ulysses=2))
    return run_case(case)


@pytest.mark.parametrize("world,case", mask_grid())
def test_masks_match_reference(worlds, world, case):
    worlds(world).run(run_masked, case)
