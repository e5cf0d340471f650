"""Inference over the sharded KV cache: prefill with every softmax backend, then decode steps
(one token, a few tokens as in speculative decoding), against `attention_reference` in fp64 on
the whole sequence (q_pos / k_pos, window and sinks as the reference defines them).

Tolerance 1e-10 relative (fp64): prefill is the backends' own exact algorithm, decode a merge
of P exact partials -- only double rounding separates them from the reference. The decode
bytes are asserted against a formula derived here (the partial (o, lse) of the new tokens to
each other rank, in fp64 8 bytes), at two context lengths. A rank's own partial alone must fail
the comparison (the merge is not vacuous). Bad input raises on every rank.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar import inference
from seqpar.kernels import attention_reference
from tests.checks import assert_close, max_error, raised
from tests.test_mesh import mesh

REL = 1e-10
HQ, HKV, D = 4, 2, 8
STEPS = (1, 1, 3, 1)  # new tokens per decode step (3: a speculative block)


def sequence(seq: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, HKV, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(HQ, generator=g, dtype=torch.float64)
    return q, k, v, sinks


def check_prefill_then_decode(backend: str, layout: str, window: int | None, with_sinks: bool,
                              seq_local: int = 4, batch: int = 1, ulysses: int | None = None
                              ) -> list[int]:
    world = dist.get_world_size()
    group = mesh(ulysses) if ulysses else None
    prompt = seq_local * world
    q, k, v, sinks = sequence(prompt + sum(STEPS), batch)
    sinks = sinks if with_sinks else None
    context = f"rank {dist.get_rank()} {backend}/{layout}/W{window}/sinks{with_sinks}"
    cache = inference.ShardedKVCache(group, layout)

    shards = [seqpar.shard(t[:, :prompt], group, layout=layout) for t in (q, k, v)]
    o, lse = inference.prefill(*shards, cache, 0, backend=backend, sinks=sinks, window=window,
                               return_lse=True)
    ref_o, ref_lse = attention_reference(q[:, :prompt], k[:, :prompt], v[:, :prompt],
                                         causal=True, sinks=sinks, window=window)
    assert_close("prefill o", o, seqpar.shard(ref_o, group, layout=layout), REL, context)
    assert_close("prefill lse", lse, seqpar.shard(ref_lse, group, dim=2, layout=layout), REL,
                 context)

    pos = prompt
    for step, tokens in enumerate(STEPS):
        new = slice(pos, pos + tokens)
        o, lse = inference.decode(q[:, new], k[:, new], v[:, new], cache, 0, window=window,
                                  sinks=sinks, return_lse=True)
        ref_o, ref_lse = attention_reference(
            q[:, new], k[:, :pos + tokens], v[:, :pos + tokens], causal=True,
            q_pos=torch.arange(pos, pos + tokens), k_pos=torch.arange(pos + tokens),
            window=window, sinks=sinks)
        assert_close(f"decode step {step} o", o, ref_o, REL, context)
        assert_close(f"decode step {step} lse", lse, ref_lse, REL, context)
        pos += tokens

    # The cache holds every token once over the group, balanced, at its global position.
    lengths = cache.layers[0].lengths
    assert sum(lengths) == pos and max(lengths) - min(lengths) <= 1, lengths
    assert cache.keys(0).shape[1] == lengths[dist.get_rank()]
    held = cache.positions(0)
    assert torch.equal(cache.keys(0), k[:, held]), context
    everyone = [torch.empty(0)] * world
    dist.all_gather_object(everyone, held.tolist())
    assert sorted(p for part in everyone for p in part) == list(range(pos))
    return lengths


PREFILL = [("ring", "zigzag", None), ("tokenring", "zigzag", None), ("ulysses", "zigzag", None),
           ("allgather", "contiguous", None), ("usp", "zigzag", 2), ("ring", "striped", None)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend, layout, ulysses", PREFILL,
                         ids=[f"{b}-{l}" + (f"-U{u}" if u else "") for b, l, u in PREFILL])
def test_prefill_with_each_backend_then_decode(worlds, world, backend, layout, ulysses):
    if ulysses and ulysses > world:
        pytest.skip("the mesh needs U <= P")
    worlds(world).run(check_prefill_then_decode, backend, layout, None, False, ulysses=ulysses)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("window, with_sinks", [(None, True), (5, False), (3, True)])
def test_decode_window_and_sinks(worlds, world, window, with_sinks):
    # W = 5 and 3 cut into the prompt (4P tokens) and the cached context; sinks and the window
    # in prefill and decode.
    lengths = worlds(world).run(check_prefill_then_decode, "ring", "zigzag", window, with_sinks,
                                batch=2)
    assert all(lengths[0] == other for other in lengths)


def check_one_shard_is_not_enough() -> float:
    """Without the merge (a rank's own partial) the result is wrong: the check can fail."""
    q, k, v, _ = sequence(9)
    cache = inference.ShardedKVCache(None, "zigzag")
    inference.prefill(*(seqpar.shard(t[:, :8]) for t in (q, k, v)), cache, 0)
    cache.append_replicated(0, k[:, 8:], v[:, 8:], torch.tensor([8]))
    o, _ = inference.shard_attention(q[:, 8:], cache.keys(0), cache.values(0), torch.tensor([8]),
                                     cache.positions(0), D ** -0.5)
    ref, _ = attention_reference(q[:, 8:], k, v, causal=True, q_pos=torch.tensor([8]))
    return max_error(o, ref)


def test_a_single_shard_fails_the_comparison(worlds):
    for error in worlds(2).run(check_one_shard_is_not_enough):
        assert error > 1e-3


# ---------------------------------------------------------------- bytes

def decode_traffic(prompt_local: int, tokens: int, batch: int) -> list[dict]:
    """Bytes per op of two decode steps after a prefill."""
    world = dist.get_world_size()
    q, k, v, _ = sequence(prompt_local * world + 2 * tokens, batch)
    prompt = prompt_local * world
    cache = inference.ShardedKVCache(None, "zigzag")
    inference.prefill(*(seqpar.shard(t[:, :prompt]) for t in (q, k, v)), cache, 0)
    steps = []
    for step in range(2):
        new = slice(prompt + step * tokens, prompt + (step + 1) * tokens)
        with seqpar.comm_stats() as stats:
            inference.decode(q[:, new], k[:, new], v[:, new], cache, 0)
        steps.append({op: t.sent_to for op, t in stats.ops.items()})
    return steps


@pytest.mark.parametrize("tokens, batch", [(1, 1), (2, 3)])
def test_decode_bytes_are_independent_of_the_context(worlds, tokens, batch):
    # To each other rank, once per step: the fp64 partial o [B, T, Hq, D] and its lse
    # [B, Hq, T] packed together, B * T * Hq * (D + 1) * 8 bytes, after a header of 13 int64
    # checked values -- whatever the context length. The argument check's own all-reduce
    # ("agree") runs on the first step only; the second step is the merge's one message.
    per_peer = batch * tokens * HQ * (D + 1) * 8 + 13 * 8
    assert per_peer == inference.decode_bytes_per_peer(batch, tokens, HQ, D, 8)
    for prompt_local in (4, 64):
        for rank, (first, second) in enumerate(worlds(4).run(decode_traffic, prompt_local,
                                                              tokens, batch)):
            merge = {p: per_peer for p in range(4) if p != rank}
            assert first["decode"] == merge and "agree" in first, first
            assert second == {"decode": merge}, second


# ---------------------------------------------------------------- bad input

def misuse(case: str) -> tuple[str, str]:
    q, k, v, _ = sequence(9)
    shards = [seqpar.shard(t[:, :8]) for t in (q, k, v)]
    new = (q[:, 8:], k[:, 8:], v[:, 8:])
    cache = inference.ShardedKVCache(None, "zigzag")
    if case == "decode before prefill":
        return raised(inference.decode, *new, cache, 0)
    if case == "another layout":
        return raised(inference.prefill, *shards, cache, 0, layout="contiguous")
    if case == "another group":
        other = inference.ShardedKVCache(dist.new_group(list(range(dist.get_world_size()))),
                                         "zigzag")
        inference.prefill(*shards, other, 0)
        return raised(inference.decode, *new, other, 0, group=None)
    inference.prefill(*shards, cache, 0)
    if case == "positions differ":
        shift = 1 if dist.get_rank() == 1 else 0
        return raised(inference.decode, *new, cache, 0, positions=torch.tensor([8 + shift]))
    if case == "prefill twice":
        return raised(inference.prefill, *shards, cache, 0)
    if case == "bad window in partial prefill":
        more = [seqpar.shard(t[:, :4]) for t in sequence(4)[:3]]  # 4 new tokens, zigzag
        return raised(inference.partial_prefill, *more, cache, 0, window=-2)
    if case == "bad window":
        return raised(inference.decode, *new, cache, 0, window=0)
    if case == "heads differ":
        return raised(inference.decode, q[:, 8:], k[:, 8:, :1], v[:, 8:, :1], cache, 0)
    raise AssertionError(case)


@pytest.mark.parametrize("case, pattern", [
    ("decode before prefill", r"layer 0 has no cached tokens: decode needs a prefill first"),
    ("another layout", r"layout='contiguous' but the cache holds a 'zigzag' layout"),
    ("another group", r"the cache belongs to another group"),
    ("positions differ",
     r"positions \[9\] do not continue the cache: the next tokens are at \[8\]"),
    ("prefill twice", r"layer 0 is already prefilled \(8 tokens\)"),
    ("bad window in partial prefill", r"window must be >= 1"),
    ("bad window", r"window must be >= 1 \(window=1: each token sees only itself\), got 0"),
    ("heads differ", r"layer 0 caches K/V \[B=1, n, Hkv=2, D=8\]"),
])
def test_bad_input_raises_on_every_rank(worlds, case, pattern):
    results = worlds(2).run(misuse, case, timeout=60)
    for rank, (kind, message) in enumerate(results):
        assert kind == "ValueError", (rank, kind, message)
        assert message.startswith("seqpar.inference."), message
        expected = (r"rank 1 of the group rejected its arguments"
                    if case == "positions differ" and rank != 1 else pattern)
        assert re.search(expected, message), (rank, message)


def misuse_after_a_step(case: str) -> tuple[str, str, bool]:
    """A good decode step (the arguments agreed once), then a bad one on rank 1 only -- checked
    inside the merge's message, with no all-reduce of its own -- then a good step again: the
    bad step must raise on every rank, leave the cache as it was, and the next step must be
    exact."""
    q, k, v, _ = sequence(11)
    cache = inference.ShardedKVCache(None, "zigzag")
    inference.prefill(*(seqpar.shard(t[:, :8]) for t in (q, k, v)), cache, 0)
    inference.decode(q[:, 8:9], k[:, 8:9], v[:, 8:9], cache, 0)
    lengths = list(cache.layers[0].lengths)
    odd = dist.get_rank() == 1
    new = (q[:, 9:10], k[:, 9:10], v[:, 9:10])
    if case == "positions differ":
        outcome = raised(inference.decode, *new, cache, 0,
                         positions=torch.tensor([9 + int(odd)]))
    elif case == "scale differs":
        outcome = raised(inference.decode, *new, cache, 0, scale=0.5 if odd else None)
    elif case == "tokens differ":
        wide = (q[:, 9:11], k[:, 9:11], v[:, 9:11]) if odd else new
        outcome = raised(inference.decode, *wide, cache, 0)
    else:
        raise AssertionError(case)
    intact = cache.layers[0].lengths == lengths and cache.keys(0).shape[1] == lengths[
        dist.get_rank()]
    o = inference.decode(*new, cache, 0)
    ref = attention_reference(q[:, 9:10], k[:, :10], v[:, :10], causal=True,
                              q_pos=torch.tensor([9]), k_pos=torch.arange(10))[0]
    return outcome + (intact and max_error(o, ref) < REL,)


@pytest.mark.parametrize("case, pattern", [
    ("positions differ", r"positions \[10\] do not continue the cache"),
    ("scale differs", r"scale differs across ranks"),
    ("tokens differ", r"new tokens differs across ranks"),
])
def test_bad_input_after_the_first_step_raises_on_every_rank(worlds, case, pattern):
    results = worlds(2).run(misuse_after_a_step, case, timeout=60)
    for rank, (kind, message, recovered) in enumerate(results):
        assert kind == "ValueError", (rank, kind, message)
        expected = (r"rank 1 of the group rejected its arguments"
                    if case == "positions differ" and rank != 1 else pattern)
        assert message.startswith("seqpar.inference.decode"), message
        assert re.search(expected, message), (rank, message)
        assert recovered, (rank, "cache changed by the failed step or next step inexact")


@pytest.mark.parametrize("key_chunk", [None, 5])
def test_shard_attention_in_chunks_with_masks_and_any_key_order(key_chunk):
    """One shard, keys in a scrambled order (as after appends), T = 3 queries, window 6: the
    chunked merge of the local kernel against the reference on the same keys."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 17, HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_pos = torch.randperm(17, generator=g)
    q_pos = torch.tensor([14, 15, 16])
    o, lse = inference.shard_attention(q, k, v, q_pos, k_pos, 0.3, window=6, key_chunk=key_chunk)
    ref_o, ref_lse = attention_reference(q, k, v, causal=True, scale=0.3, q_pos=q_pos,
                                         k_pos=k_pos, window=6)
    assert_close("o", o, ref_o, REL)
    assert_close("lse", lse, ref_lse, REL)
