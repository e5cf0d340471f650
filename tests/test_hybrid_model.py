"""The million-token step's model at S = 16K: sequence-parallel on 4 ranks with every memory
saver on equals one process without any, in the loss and every parameter gradient.

`benchmarks.hybrid_model.HybridLM` (3 LASP-2 linear-attention layers, 1 sliding-window softmax
layer with window 1024, SwiGLU MLPs, RMSNorm, RoPE at global positions) is the model of
`python -m benchmarks.long_context --million`, at the issue's twin length S = 16,384 but with a
tiny width and vocabulary (hidden 32, vocab 256) so the fp64 run takes seconds on 2 cores: the
token mixing -- what sequence parallelism changes -- is the same at any width; the width only
scales the per-token work. fp64 throughout: LASP-2, the windowed ring attention, the token tiles
and the tiled loss all keep it.

* one process: `group=None` in a process without torch.distributed (a one-rank group), no
  checkpointing, no token tiles, one loss tile;
* 4 ranks (contiguous layout, 4,096 tokens each, so the 1024-token window crosses rank edges
  and the LASP-2 state chain crosses three; and 2 ranks, zigzag): checkpointed layers, token
  tiles (norms, projections, MLP) of 1,000 tokens and loss tiles of 1,000 (neither divides the
  shard: ragged last tiles), `hf.sync_grads`.

Tolerance 1e-10 relative to max(1, |expected|): fp64 sums over 16K tokens in another order
(per-rank partial sums, the LASP-2 state scan across ranks, tiles) differ at ~1e-13; a wrong
mask, position or state would be off at >= 1e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from benchmarks.hybrid_model import HybridConfig, HybridLM, Savers, batch, shard_batch
from seqpar.integrations import hf
from tests.checks import assert_close

SEQ = 16384
CONFIG = HybridConfig(vocab=256, hidden=32, intermediate=64, heads=2, kv_heads=1, window=1024)
SAVERS = Savers(checkpoint=True, token_tile=1000, loss_tile=1000)
REL = 1e-10


def _step(group, layout: str, savers: Savers) -> tuple[float, dict[str, torch.Tensor]]:
    model = HybridLM(CONFIG, dtype=torch.float64).train()
    ids, labels = batch(SEQ, CONFIG.vocab)
    if group is not None or dist.is_initialized():
        ids, labels = shard_batch(ids, labels, group, layout)
    loss = model.loss(ids, labels, group, layout, savers)
    loss.backward()
    if dist.is_initialized():
        hf.sync_grads(model, group)
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def sharded_step(layout: str) -> tuple[float, dict[str, torch.Tensor]]:
    return _step(None, layout, SAVERS)


@pytest.fixture(scope="module")
def one_process():
    assert not dist.is_initialized()  # the test process: group=None is a one-rank group
    return _step(None, "contiguous", Savers())


@pytest.mark.parametrize("world, layout", [(4, "contiguous"), (2, "zigzag")])
def test_16k_twin_matches_one_process(worlds, one_process, world, layout):
    loss, grads = one_process
    assert torch.isfinite(torch.tensor(loss))
    assert all(g.abs().max() > 0 for g in grads.values())  # every parameter is reached
    per_rank = worlds(world).run(sharded_step, layout, timeout=240)
    for rank, (rank_loss, rank_grads) in enumerate(per_rank):
        where = f"rank {rank} of {world} ({layout}):"
        assert_close("loss", torch.tensor(rank_loss), torch.tensor(loss), REL, where)
        assert rank_grads.keys() == grads.keys()
        for name, expected in grads.items():
            assert_close(f"grad {name}", rank_grads[name], expected, REL, where)
    # the comparison can fail: one gradient entry off by 1e-8 of the largest is caught
    name = "layers.3.mix.k_proj.weight"  # the sliding-window layer's keys
    wrong = per_rank[0][1][name].clone()
    wrong.view(-1)[0] += 1e-8 * max(1.0, grads[name].abs().max().item())
    with pytest.raises(AssertionError, match="max error"):
        assert_close(f"grad {name}", wrong, grads[name], REL)


def test_savers_are_exact_on_one_process():
    """The savers alone (checkpointing, token tiles of 100 over 1,000 tokens -- ragged --, loss
    tiles of 70) against the plain model, one process, fp64: same loss and gradients (1e-12:
    the same sums cut into tiles)."""
    config = HybridConfig(vocab=64, hidden=16, intermediate=32, heads=2, kv_heads=1, window=48)
    results = []
    for savers in (Savers(), Savers(checkpoint=True, token_tile=100, loss_tile=70)):
        model = HybridLM(config, dtype=torch.float64).train()
        ids, labels = batch(1000, config.vocab, seed=3)
        loss = model.loss(ids, labels, None, "contiguous", savers)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain), (saved_loss, saved) = results
    assert_close("loss", saved_loss, plain_loss, 1e-12)
    for name, expected in plain.items():
        assert expected.abs().max() > 0, name
        assert_close(f"grad {name}", saved[name], expected, 1e-12)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"hidden": 30, "heads": 4}, "hidden=30 must be a multiple of heads=4"),
    ({"heads": 4, "kv_heads": 3}, "kv_heads=3"),
    ({"kinds": ("linear", "mamba")}, "kinds must be"),
    ({"window": 0}, "window must be an int >= 1"),
])
def test_bad_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HybridConfig(**kwargs)
