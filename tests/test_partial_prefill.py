"""Partial prefill (a new turn of T tokens against S cached ones) by pass-KV and pass-Q, exact
against `attention_reference` in fp64 (1e-10 relative: both schedules merge exact partials),
on caches left unbalanced by decode steps (shards that differ by one token: pass-KV pads);
a decode step afterwards sees the new tokens. Bytes per peer against formulas derived here;
the cost model's pick follows T / (S + T) and the heads, and `explain` says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar import inference
from seqpar.cost import CPU_DEFAULT, SPEC_SHEETS, use_profile
from seqpar.cost import partial_prefill as model
from seqpar.kernels import attention_reference
from tests.checks import assert_close
from tests.test_inference import D, HKV, HQ, sequence

REL = 1e-10


def check_partial_prefill(mode: str, layout: str, decoded: int, with_sinks: bool,
                          batch: int = 1, window: int | None = None) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    prompt, new = 4 * world, 4 * world
    q, k, v, sinks = sequence(prompt + decoded + new + 1, batch)
    sinks = sinks if with_sinks else None
    context = f"rank {rank} {mode}/{layout}/decoded {decoded}"
    cache = inference.ShardedKVCache(None, layout)
    inference.prefill(*(seqpar.shard(t[:, :prompt], layout=layout) for t in (q, k, v)), cache, 0)
    for pos in range(prompt, prompt + decoded):
        inference.decode(q[:, pos:pos + 1], k[:, pos:pos + 1], v[:, pos:pos + 1], cache, 0)
    start, end = prompt + decoded, prompt + decoded + new
    longest = max(cache.layers[0].lengths)
    turn = [seqpar.shard(t[:, start:end], layout=layout) for t in (q, k, v)]
    with seqpar.comm_stats() as stats:
        o, lse = inference.partial_prefill(*turn, cache, 0, mode=mode, sinks=sinks,
                                           window=window, return_lse=True)
    ref_o, ref_lse = attention_reference(q[:, start:end], k[:, :end], v[:, :end], causal=True,
                                         q_pos=torch.arange(start, end), k_pos=torch.arange(end),
                                         sinks=sinks, window=window)
    assert_close("o", o, seqpar.shard(ref_o, layout=layout), REL, context)
    assert_close("lse", lse, seqpar.shard(ref_lse, dim=2, layout=layout), REL, context)
    # The cache grew by T / P on every rank and the next decode step sees the new turn.
    assert sum(cache.layers[0].lengths) == end
    o = inference.decode(q[:, end:], k[:, end:], v[:, end:], cache, 0, sinks=sinks,
                         window=window)
    ref_o, _ = attention_reference(q[:, end:], k, v, causal=True, q_pos=torch.tensor([end]),
                                   sinks=sinks, window=window)
    assert_close("decode after the turn", o, ref_o, REL, context)
    return {"longest": longest, "local_new": new // world,
            "sent": {op: t.sent_to for op, t in stats.ops.items() if op != "agree"}}


def expected_sent(mode: str, world: int, rank: int, batch: int, longest: int, n: int) -> dict:
    """Per peer, derived from the schedules (fp64: 8 bytes, lse in fp64 too)."""
    if world == 1:
        return {}
    if mode == "pass-kv":
        # K and V of the padded cached shard and the n new tokens, to r + 1, P - 1 hops
        block = 2 * batch * (longest + n) * HKV * D * 8
        return {"pass_kv.fwd": {(rank + 1) % world: (world - 1) * block}}
    # queries of n tokens to r + 1, P - 1 hops; one partial (o + lse rows) to every other rank
    query, partial = batch * n * HQ * D * 8, batch * n * HQ * (D + 1) * 8
    sent = {p: partial for p in range(world) if p != rank}
    sent[(rank + 1) % world] += (world - 1) * query
    return {"tokenring.fwd": sent}


CASES = [(world, mode, layout, decoded)
         for world in (2, 4) for mode in model.MODES
         for layout, decoded in (("zigzag", 1), ("contiguous", 0), ("striped", 3))]


@pytest.mark.parametrize("world, mode, layout, decoded", CASES,
                         ids=[f"P{w}-{m}-{l}-dec{d}" for w, m, l, d in CASES])
def test_partial_prefill_is_exact_and_sends_what_it_should(worlds, world, mode, layout, decoded):
    results = worlds(world).run(check_partial_prefill, mode, layout, decoded, False)
    for rank, got in enumerate(results):
        assert got["sent"] == expected_sent(mode, world, rank, 1, got["longest"],
                                            got["local_new"]), (rank, got)
    # The cost model's byte formula is what a rank sends.
    p = model.PartialPrefill(batch=1, context=4 * world + decoded, new=4 * world, heads_q=HQ,
                             heads_kv=HKV, head_dim=D, world=world, itemsize=8, acc_itemsize=8,
                             layout=layout)
    assert all(sum(sum(per.values()) for per in got["sent"].values())
               == model.volume(mode, p).bytes for got in results)


@pytest.mark.parametrize("world, mode", [(1, "pass-kv"), (3, "pass-q"), (3, "pass-kv")])
def test_other_group_sizes_with_sinks(worlds, world, mode):
    worlds(world).run(check_partial_prefill, mode, "zigzag", 2, True, batch=2)


# Windows (T = 4P new tokens after a 4P-token prompt and `decoded` decode steps): 1 (each
# token only itself), 3 (shorter than a rank's 4 new tokens), 6 and 4P + 2 (reaching into the
# cached context by a few tokens / most of it), and one longer than everything (the plain path).
WINDOW_CASES = [(world, mode, layout, decoded, window)
                for world in (2, 4) for mode in model.MODES
                for layout, decoded in (("zigzag", 1), ("striped", 3))
                for window in (1, 3, 6, 4 * world + 2, 1000)]


@pytest.mark.parametrize("world, mode, layout, decoded, window", WINDOW_CASES,
                         ids=[f"P{w}-{m}-{l}-dec{d}-W{win}" for w, m, l, d, win in WINDOW_CASES])
def test_partial_prefill_with_a_window(worlds, world, mode, layout, decoded, window):
    worlds(world).run(check_partial_prefill, mode, layout, decoded, False, window=window)


@pytest.mark.parametrize("mode", model.MODES)
def test_partial_prefill_with_a_window_and_sinks_on_three_ranks(worlds, mode):
    worlds(3).run(check_partial_prefill, mode, "zigzag", 2, True, batch=2, window=5)


def check_auto(profile_name: str) -> str:
    with use_profile(profile_name):
        return check_partial_prefill("auto", "zigzag", 0, False)["sent"].popitem()[0]


def test_auto_runs_the_models_pick(worlds):
    p = model.PartialPrefill(batch=1, context=16, new=16, heads_q=HQ, heads_kv=HKV, head_dim=D,
                             world=4, itemsize=8, acc_itemsize=8)
    pick, _ = model.choose(p, SPEC_SHEETS["h100-sxm"])
    ops = worlds(4).run(check_auto, "h100-sxm")
    assert set(ops) == {"pass_kv.fwd" if pick == "pass-kv" else "tokenring.fwd"}


def problem(context: int, new: int, heads_q: int = 32, heads_kv: int = 8, world: int = 8):
    return model.PartialPrefill(batch=1, context=context, new=new, heads_q=heads_q,
                                heads_kv=heads_kv, head_dim=128, world=world)


@pytest.mark.parametrize("profile", [SPEC_SHEETS["h100-sxm"], CPU_DEFAULT], ids=lambda p: p.name)
def test_the_pick_follows_the_share_of_new_tokens(profile):
    """Few new tokens next to a long context: pass-Q (its bytes scale with T, pass-KV's with
    S + T); as many new tokens as cached with GQA 32:8: pass-KV (Q and partials of 32 heads
    outweigh K/V of 8)."""
    assert model.choose(problem(128 * 1024, 1024), profile)[0] == "pass-q"
    assert model.choose(problem(64 * 1024, 64 * 1024), profile)[0] == "pass-kv"
    text = model.explain(problem(128 * 1024, 1024), profile)
    assert "pass-q is predicted faster" in text and "<- pick" in text


def test_volumes_match_the_formulas():
    p = problem(1000, 64, heads_q=8, heads_kv=2, world=4)
    # Lmax = 250, T/P = 16; b = 2, a = 4
    assert model.volume("pass-kv", p).bytes == 3 * 2 * (250 + 16) * 2 * 128 * 2
    assert model.volume("pass-q", p).bytes == 3 * 16 * 8 * (128 * 2 + 128 * 2 + 4)
