"""Partial prefill: T new tokens (a new turn) against S tokens already in the sharded cache.

Each rank passes its shard of the T new tokens' q, k, v, sharded with the cache's layout over
the T tokens (as `seqpar.shard` cuts them); their global positions are S + the layout's
positions over T. Query i of the new tokens sees every cached key (all come earlier) and the
new keys up to itself. Two schedules, the same result, both on the existing ring machinery:

* pass-KV (ring, `comm.ring.ring_fwd` with a hand-built `RingPlan`): every rank's block
  [cached shard padded to the longest (Lmax), then its T/P new tokens] travels the ring; at the
  step where rank r holds rank p's block it runs one FULL sub-block against p's L_p cached keys
  (the padding is never read) plus the causal sub-blocks of its new queries against p's new
  keys (`kernels.mask.plan_blocks` of the layout's runs, shifted past Lmax).
* pass-Q (TokenRing, `comm.tokenring.tokenring_fwd` with a hand-built `TokenRingPlan`): the
  new queries travel, K/V stay; rank r runs the visiting queries against its own cached shard
  (FULL) and its new keys (causal sub-blocks shifted past L_r); every partial goes straight
  home and is merged there. Traffic is recorded under "tokenring.fwd".

Which one: `mode="auto"` asks the cost model (`seqpar.cost.partial_prefill.choose`, from T, S,
heads, links; `explain` prints why) -- pass-Q when the new tokens are few next to the context,
pass-KV when they are many. Every rank agrees on the pick (profiles must match).

Afterwards the new K/V are appended to every rank's shard (each rank grows by T/P, so the
cache stays balanced) and later decode steps see them. Sinks are folded in after the merge.

Sliding windows (query i sees key j iff 0 <= i - j < W, positions global: the cached context
0 .. S-1, then the new tokens S .. S+T-1): the earliest new query is at S, so only cached keys
at positions > S - W can be seen by any new query -- each rank takes just those of its shard
(`_window_tail`, at most W - 1 over the group) and the FULL cached sub-block becomes a
POSITIONS sub-block over them (exact per pair: causal and the window, by global position);
the new tokens' blocks are planned with the window rule (`plan_blocks`, distances between new
tokens are the same shifted by S). pass-Q attends the visiting queries to [tail, new K/V];
pass-KV sends [tail padded to the longest tail, new K/V] around the ring, after one small
all-gather of the tails' positions (int64, at most W - 1 per rank, under "pass_kv"), since a
rank needs the positions of the keys it is sent. A window of at least S + T hides nothing and
takes the plain path.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..comm.primitives import Traffic, active_recorders, agree, start_all_gather
from ..comm.ring import RingPlan, ring_fwd
from ..comm.tokenring import TokenRingPlan, tokenring_fwd
from ..cost import partial_prefill as model
from ..cost.hardware import profile_for
from ..kernels.dispatch import select_kernel
from ..kernels.mask import MaskKind, MaskRule, SubBlock, plan_blocks, runs_to_positions
from ..layout import all_local_runs, seq_len_error
from .cache import ShardedKVCache
from .checks import (UNSET, agreement_group, call_values, check_cache, check_matches_cache,
                     check_new_tokens, check_scale_window_sinks, layout_code)
from .merge import apply_sinks

MODES = ("auto",) + model.MODES
PASS_KV_OP = "pass_kv"



def _window_is_moot(window, seq_len: int) -> bool:
    """A window of at least the whole sequence hides nothing (every i - j < seq_len <= W)."""
    return isinstance(window, int) and not isinstance(window, bool) and window >= seq_len

def _shifted(blocks, k_offset: int) -> tuple[SubBlock, ...]:
    return tuple(dataclasses.replace(b, k0=b.k0 + k_offset, k1=b.k1 + k_offset) for b in blocks)


def _with_cached(new_rows: int, cached: int, new_blocks) -> tuple[SubBlock, ...]:
    """All new rows against `cached` cached keys (FULL), then the new-key blocks."""
    full = (SubBlock(0, new_rows, 0, cached, MaskKind.FULL),) if cached else ()
    return full + _shifted(new_blocks, cached)


def _window_tail(cache: ShardedKVCache, layer: int, cached: int, start: int, window: int):
    """(keys, values, positions) of this rank's first `cached` cached tokens that a new query
    (positions >= start) can see under `window`: position > start - window (a copy, <= W - 1
    rows)."""
    pos = cache.positions(layer)[:cached]
    keep = torch.nonzero(pos > start - window).flatten()
    return (cache.keys(layer)[:, :cached].index_select(1, keep),
            cache.values(layer)[:, :cached].index_select(1, keep), pos.index_select(0, keep))


def _seen_cached(rows: int, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
                 ) -> tuple[SubBlock, ...]:
    """New query rows against cached keys k_pos: FULL without a window (every cached token
    precedes every new one), else a POSITIONS sub-block of the window rule."""
    if k_pos.numel() == 0:
        return ()
    if window is None:
        return (SubBlock(0, rows, 0, k_pos.numel(), MaskKind.FULL),)
    return (SubBlock(0, rows, 0, k_pos.numel(), MaskKind.POSITIONS, tuple(q_pos.tolist()),
                     tuple(k_pos.tolist()), causal=True, window=window),)


def pass_kv(q, k, v, cache: ShardedKVCache, layer: int, new_runs, scale: float,
            window: int | None = None):
    """(o, lse) of the new local queries over cache + new tokens, K/V travelling."""
    info, rank, world = cache.info, cache.info.rank, cache.info.world
    n = q.shape[1]
    start = cache.seq_len(layer)
    rule = MaskRule(causal=True, window=window)
    if window is None:
        lengths = cache.layers[layer].lengths
        cached_k, cached_v = cache.keys(layer), cache.values(layer)
        cached_pos = [None] * world
    else:
        cached_k, cached_v, tail = _window_tail(cache, layer, cache.layers[layer].length,
                                                start, window)
        cap = min(window - 1, max(cache.layers[layer].lengths))
        mine = torch.full((cap + 1,), -1, dtype=torch.int64, device=tail.device)
        mine[0], mine[1:1 + tail.numel()] = tail.numel(), tail
        every = start_all_gather(mine, info, Traffic.now(PASS_KV_OP)).wait().cpu()
        lengths = [int(row[0]) for row in every]
        cached_pos = [row[1:1 + length] for row, length in zip(every, lengths)]
    longest = max(lengths)
    pad = longest - cached_k.shape[1]
    if pad:
        cached_k = torch.cat([cached_k, cached_k.new_zeros((k.shape[0], pad) + k.shape[2:])], 1)
        cached_v = torch.cat([cached_v, cached_v.new_zeros((v.shape[0], pad) + v.shape[2:])], 1)
    block_k, block_v = torch.cat([cached_k, k], 1), torch.cat([cached_v, v], 1)
    q_pos = runs_to_positions(new_runs[rank]) + start
    steps = []
    for step in range(world):
        source = (rank - step) % world
        new_blocks = plan_blocks(new_runs[rank], new_runs[source], rule)
        cached = (_seen_cached(n, q_pos, cached_pos[source], window) if window is not None
                  else _with_cached(n, lengths[source], ()))
        # the source's padding (if any) sits between its cached keys and its new ones
        steps.append(cached + _shifted(new_blocks, longest))
    plan = RingPlan(info, new_runs[rank], tuple(new_runs), True, scale,
                    select_kernel(q.device, q.dtype), active_recorders(), tuple(steps),
                    op=PASS_KV_OP)
    return ring_fwd(q, block_k, block_v, plan)


def pass_q(q, k, v, cache: ShardedKVCache, layer: int, new_runs, scale: float,
           window: int | None = None):
    """(o, lse) of the new local queries over cache + new tokens, queries travelling. The new
    K/V must already be appended to the cache (the local keys are the cache's shard)."""
    info, rank, world = cache.info, cache.info.rank, cache.info.world
    n = q.shape[1]
    cached = cache.layers[layer].length - n  # this rank's cached keys before the new ones
    start = cache.seq_len(layer) - n * world
    rule = MaskRule(causal=True, window=window)
    keys, values = cache.keys(layer), cache.values(layer)
    if window is not None:
        tail_k, tail_v, tail_pos = _window_tail(cache, layer, cached, start, window)
        keys, values = torch.cat([tail_k, k], 1), torch.cat([tail_v, v], 1)
        cached = tail_pos.numel()
    blocks = []
    for step in range(world):
        source = (rank - step) % world
        new_blocks = plan_blocks(new_runs[source], new_runs[rank], rule)
        if window is None:
            blocks.append(_with_cached(n, cached, new_blocks))
        else:
            q_pos = runs_to_positions(new_runs[source]) + start
            blocks.append(_seen_cached(n, q_pos, tail_pos, window) + _shifted(new_blocks, cached))
    plan = TokenRingPlan(info, True, scale, select_kernel(q.device, q.dtype),
                         active_recorders(), rows=tuple((0, n) for _ in range(world)),
                         blocks=tuple(blocks),
                         forward=tuple(step + 1 < world for step in range(world)),
                         arrives=tuple(step + 1 < world for step in range(world)),
                         returns=tuple(None if step == 0 else (0, n) for step in range(world)))
    return tokenring_fwd(q, keys, values, plan)


def problem_of(q, k, cache: ShardedKVCache, layer: int, window: int | None = None
               ) -> model.PartialPrefill:
    """The cost model's view of a partial prefill call."""
    return model.PartialPrefill(batch=q.shape[0], context=cache.seq_len(layer), window=window,
                                new=q.shape[1] * cache.info.world, heads_q=q.shape[2],
                                heads_kv=k.shape[2], head_dim=q.shape[3], world=cache.info.world,
                                itemsize=q.element_size(),
                                acc_itemsize=8 if q.element_size() == 8 else 4,
                                layout=cache.layout)


def partial_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
                    layer: int, *, mode: str = "auto", scale: float | None = None,
                    sinks: torch.Tensor | None = None, window: int | None = None, group=UNSET,
                    layout: str | None = None, return_lse: bool = False):
    """Attention of this rank's shard of T new tokens (q [B, n, Hq, D], k/v [B, n, Hkv, D],
    n = T / P, the cache's layout over the T tokens) over the cached context and the new
    tokens; appends their K/V to the cache. mode: "auto" | "pass-kv" | "pass-q".
    Returns o [B, n, Hq, D] (and lse [B, Hq, n] with return_lse). Collective."""
    problem = check_cache(cache, layer, group, layout)
    info = agreement_group(cache, group)
    problem = problem or check_new_tokens(q, k, v)
    ok = problem is None
    if ok and not cache.has(layer):
        problem = ValueError(f"layer {layer} has no cached context: partial_prefill adds tokens "
                             f"to a prefilled cache (seqpar.inference.prefill first)")
    if problem is None:
        problem = (check_matches_cache(cache, layer, k)
                   or check_scale_window_sinks(scale, window, sinks, q))
    if problem is None and mode not in MODES:
        problem = ValueError(f"mode={mode!r} is unknown; choose one of {MODES}")
    if problem is None and seq_len_error(q.shape[1] * info.world, info.world, cache.layout):
        problem = ValueError(f"the new tokens: "
                             f"{seq_len_error(q.shape[1] * info.world, info.world, cache.layout)}")
    ok = problem is None
    chosen = mode
    if ok and mode == "auto":
        chosen, _ = model.choose(problem_of(q, k, cache, layer, window), profile_for(q.device))
    agree(info, "seqpar.inference.partial_prefill", {
        "layer": layer,
        "tokens cached for the layer": cache.seq_len(layer) if ok else -1,
        "cache layout": layout_code(cache.layout) if isinstance(cache, ShardedKVCache) else -1,
        "local new tokens": q.shape[1] if ok else -1,
        "mode (auto: the cost model's pick; use the same profile on every rank)":
            MODES.index(chosen) if chosen in MODES else -1,
        **call_values(q, k, scale, window, sinks, ok),
    }, problem, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    start = cache.seq_len(layer)
    if _window_is_moot(window, start + q.shape[1] * info.world):
        window = None  # it hides nothing: the plain (FULL cached block) path
    new_runs = all_local_runs(q.shape[1] * info.world, info.world, cache.layout)
    positions = runs_to_positions(new_runs[info.rank], device=q.device) + start
    if chosen == "pass-kv":
        o, lse = pass_kv(q, k, v, cache, layer, new_runs, scale, window)
        cache.append_sharded(layer, k.detach(), v.detach(), positions)
    else:
        cache.append_sharded(layer, k.detach(), v.detach(), positions)
        o, lse = pass_q(q, k, v, cache, layer, new_runs, scale, window)
    o, lse = apply_sinks(o, lse, sinks)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def explain(q, k, cache: ShardedKVCache, layer: int, profile=None, window: int | None = None
            ) -> str:
    """Why mode="auto" picks what it picks for this call (no communication)."""
    return model.explain(problem_of(q, k, cache, layer, window), profile or profile_for(q.device))
