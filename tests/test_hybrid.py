"""LASP-2H wiring: a hybrid stack trained sequence-parallel matches the same stack on one process.

Linear-attention layers run `seqpar.linear_attention` (LASP-2, decay per head), softmax layers
run `seqpar.attention(backend=...)` — "allgather" (LASP-2H's choice) when that backend is
present, and "ring" — all on the same zigzag shards, so the stack never reshards between layers.
Each rank trains on its tokens: the loss is the global mean, parameter gradients are summed
over the sequence-parallel ranks (all-reduce), and the per-step losses and final parameters
must equal a single process training the same stack on the whole sequence with the fp64
references (`kernels/reference.py`). fp64 throughout, so the match is to ~1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.kernels import attention_reference, linear_attention_reference
from tests.checks import assert_close

LAYERS = ("linear", "softmax", "linear", "softmax")
WIDTH, HEADS, HEAD_DIM, SEQ, STEPS, LR = 16, 2, 8, 32, 4, 0.2
DECAY = torch.tensor([0.1, 0.5], dtype=torch.float64)
SOFTMAX_BACKENDS = [b for b in ("allgather", "ring") if b in seqpar.BACKENDS]


def init_params() -> list[torch.Tensor]:
    """Small weights: linear attention has no normaliser, so large ones compound over layers."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in LAYERS:
        params += [torch.randn(WIDTH, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64) * 0.1
                   for _ in range(3)]  # q, k, v projections
        params.append(torch.randn(HEADS * HEAD_DIM, WIDTH, generator=gen, dtype=torch.float64) * 0.1)
    params.append(torch.randn(WIDTH, 1, generator=gen, dtype=torch.float64) * 0.1)  # head
    return [p.requires_grad_() for p in params]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, SEQ, WIDTH, generator=gen, dtype=torch.float64)
    return x, torch.randn(1, SEQ, 1, generator=gen, dtype=torch.float64)


def hybrid(params, x, linear_attn, softmax_attn) -> torch.Tensor:
    """Residual stack: each layer projects q, k, v, attends, projects back."""
    batch, seq, _ = x.shape
    for i, kind in enumerate(LAYERS):
        wq, wk, wv, wo = params[4 * i:4 * i + 4]
        q, k, v = ((x @ w).view(batch, seq, HEADS, HEAD_DIM) for w in (wq, wk, wv))
        mixed = linear_attn(q, k, v) if kind == "linear" else softmax_attn(q, k, v)
        x = x + mixed.reshape(batch, seq, HEADS * HEAD_DIM) @ wo
    return x @ params[-1]


def train_single_process() -> tuple[list[float], list[torch.Tensor]]:
    params, (x, y) = init_params(), data()
    losses = []
    for _ in range(STEPS):
        out = hybrid(params, x, lambda q, k, v: linear_attention_reference(q, k, v, decay=DECAY),
                     lambda q, k, v: attention_reference(q, k, v, causal=True)[0])
        loss = ((out - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= LR * g
        losses.append(loss.item())
    return losses, [p.detach() for p in params]


def train_sequence_parallel(backend: str) -> tuple[list[float], list[torch.Tensor]]:
    params, (x, y) = init_params(), data()
    x_local, y_local = (seqpar.shard(t, layout="zigzag") for t in (x, y))
    losses = []
    for _ in range(STEPS):
        out = hybrid(params, x_local,
                     lambda q, k, v: seqpar.linear_attention(q, k, v, decay=DECAY, layout="zigzag"),
                     lambda q, k, v: seqpar.attention(q, k, v, backend=backend, layout="zigzag"))
        loss = ((out - y_local) ** 2).sum() / y.numel()  # this rank's share of the global mean
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                dist.all_reduce(g)  # parameters are replicated across the sequence-parallel group
                p -= LR * g
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses, [p.detach() for p in params]


def check_hybrid_training(backend: str) -> list[float]:
    expected_losses, expected_params = train_single_process()
    losses, params = train_sequence_parallel(backend)
    assert_close("losses", torch.tensor(losses, dtype=torch.float64),
                 torch.tensor(expected_losses, dtype=torch.float64), 1e-10,
                 f"rank {dist.get_rank()} backend={backend}:")
    for i, (p, e) in enumerate(zip(params, expected_params)):
        assert_close(f"parameter {i}", p, e, 1e-10, f"rank {dist.get_rank()} backend={backend}:")
    assert expected_losses[-1] < expected_losses[0]  # it trains
    return losses


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
def test_hybrid_stack_trains_like_a_single_process(worlds, backend):
    per_rank = worlds(2).run(check_hybrid_training, backend)
    assert per_rank[0] == per_rank[1]  # every rank saw the same global losses
