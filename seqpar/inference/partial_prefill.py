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
Windows shorter than the whole sequence are refused here (the hand-built pass-KV / pass-Q
plans carry no window yet); prefill and decode take them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..comm.primitives import active_recorders, agree
from ..comm.ring import RingPlan, ring_fwd
from ..comm.tokenring import TokenRingPlan, tokenring_fwd
from ..cost import partial_prefill as model
from ..cost.hardware import profile_for
from ..kernels.dispatch import select_kernel
from ..kernels.mask import MaskKind, SubBlock, plan_blocks, runs_to_positions
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


def pass_kv(q, k, v, cache: ShardedKVCache, layer: int, new_runs, scale: float):
    """(o, lse) of the new local queries over cache + new tokens, K/V travelling."""
    info, rank = cache.info, cache.info.rank
    lengths = cache.layers[layer].lengths
    longest = max(lengths)
    pad = longest - lengths[rank]
    cached_k, cached_v = cache.keys(layer), cache.values(layer)
    if pad:
        cached_k = torch.cat([cached_k, cached_k.new_zeros((k.shape[0], pad) + k.shape[2:])], 1)
        cached_v = torch.cat([cached_v, cached_v.new_zeros((v.shape[0], pad) + v.shape[2:])], 1)
    block_k, block_v = torch.cat([cached_k, k], 1), torch.cat([cached_v, v], 1)
    n = q.shape[1]
    steps = []
    for step in range(info.world):
        source = (rank - step) % info.world
        new_blocks = plan_blocks(new_runs[rank], new_runs[source], True)
        # the source's padding (if any) sits between its cached keys and its new ones
        steps.append(_with_cached(n, lengths[source], ()) + _shifted(new_blocks, longest))
    plan = RingPlan(info, new_runs[rank], tuple(new_runs), True, scale,
                    select_kernel(q.device, q.dtype), active_recorders(), tuple(steps),
                    op=PASS_KV_OP)
    return ring_fwd(q, block_k, block_v, plan)


def pass_q(q, k, v, cache: ShardedKVCache, layer: int, new_runs, scale: float):
    """(o, lse) of the new local queries over cache + new tokens, queries travelling. The new
    K/V must already be appended to the cache (the local keys are the cache's shard)."""
    info, rank, world = cache.info, cache.info.rank, cache.info.world
    n = q.shape[1]
    cached = cache.layers[layer].length - n  # this rank's cached keys before the new ones
    blocks = tuple(_with_cached(n, cached,
                                plan_blocks(new_runs[(rank - step) % world], new_runs[rank], True))
                   for step in range(world))
    plan = TokenRingPlan(info, True, scale, select_kernel(q.device, q.dtype),
                         active_recorders(), rows=tuple((0, n) for _ in range(world)),
                         blocks=blocks,
                         forward=tuple(step + 1 < world for step in range(world)),
                         arrives=tuple(step + 1 < world for step in range(world)),
                         returns=tuple(None if step == 0 else (0, n) for step in range(world)))
    return tokenring_fwd(q, cache.keys(layer), cache.values(layer), plan)


def problem_of(q, k, cache: ShardedKVCache, layer: int) -> model.PartialPrefill:
    """The cost model's view of a partial prefill call."""
    return model.PartialPrefill(batch=q.shape[0], context=cache.seq_len(layer),
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
    if problem is None and not _window_is_moot(window if window is not None else 2**62,
                                               cache.seq_len(layer) + q.shape[1] * info.world):
        problem = ValueError("partial_prefill does not take a sliding window shorter than the "
                             "whole sequence yet; prefill and decode take one (or pass a window "
                             "of at least the context plus the new tokens)")
    if problem is None and mode not in MODES:
        problem = ValueError(f"mode={mode!r} is unknown; choose one of {MODES}")
    if problem is None and seq_len_error(q.shape[1] * info.world, info.world, cache.layout):
        problem = ValueError(f"the new tokens: "
                             f"{seq_len_error(q.shape[1] * info.world, info.world, cache.layout)}")
    ok = problem is None
    chosen = mode
    if ok and mode == "auto":
        chosen, _ = model.choose(problem_of(q, k, cache, layer), profile_for(q.device))
    agree(info, "seqpar.inference.partial_prefill", {
        "layer": layer,
        "tokens cached for the layer": cache.seq_len(layer) if ok else -1,
        "cache layout": layout_code(cache.layout) if isinstance(cache, ShardedKVCache) else -1,
        "local new tokens": q.shape[1] if ok else -1,
        "mode (auto: the cost model's pick; use the same profile on every rank)":
            MODES.index(chosen) if chosen in MODES else -1,
        **call_values(q, k, scale, None, sinks, ok),
    }, problem, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    start = cache.seq_len(layer)
    new_runs = all_local_runs(q.shape[1] * info.world, info.world, cache.layout)
    positions = runs_to_positions(new_runs[info.rank], device=q.device) + start
    if chosen == "pass-kv":
        o, lse = pass_kv(q, k, v, cache, layer, new_runs, scale)
        cache.append_sharded(layer, k.detach(), v.detach(), positions)
    else:
        cache.append_sharded(layer, k.detach(), v.detach(), positions)
        o, lse = pass_q(q, k, v, cache, layer, new_runs, scale)
    o, lse = apply_sinks(o, lse, sinks)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def explain(q, k, cache: ShardedKVCache, layer: int, profile=None) -> str:
    """Why mode="auto" picks what it picks for this call (no communication)."""
    return model.explain(problem_of(q, k, cache, layer), profile or profile_for(q.device))
