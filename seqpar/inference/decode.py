"""Decode: a few new query tokens against the sharded KV cache, one collective per step.

The T new tokens (T = 1, or a few for speculative decoding) are known on every rank: q
[B, T, Hq, D], k/v [B, T, Hkv, D] at global positions S .. S + T - 1 (S: tokens cached so far).
One step of one layer:

1. append the new K/V to the cache: each new token to the shortest shard (`cache.py`), so
   the cache keeps K/V of every token exactly once over the group;
2. every rank computes the partial (o, lse) of the T queries against its own shard
   (`local.shard_attention`: causal and sliding window by global position, GQA native);
3. one all-gather of the packed partials and a merge in rank order (`merge.py`) gives every
   rank the exact, bit-identical output; sinks are folded in after the merge.

Bytes per rank and step: (P - 1) * B * T * Hq * (D + 1) * a (a: 4, or 8 for fp64) -- the
context length S never appears. The argument check is one more tiny all-reduce (`agree`).
"""

from __future__ import annotations

import math

import torch

from ..comm.primitives import Traffic, agree
from .cache import ShardedKVCache
from .checks import (UNSET, agreement_group, call_values, check_cache, check_matches_cache,
                     check_new_tokens, check_scale_window_sinks, checksum)
from .local import shard_attention
from .merge import apply_sinks, merge_across_ranks

DECODE_OP = "decode"


def _check_positions(positions, expected: torch.Tensor) -> Exception | None:
    if positions is None:
        return None
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 \
            or positions.is_floating_point():
        return ValueError(f"positions must be None or a 1-D integer tensor [T] of the new tokens' "
                          f"global positions, got {getattr(positions, 'shape', positions)!r}")
    if positions.shape != expected.shape or not torch.equal(positions.cpu(), expected.cpu()):
        return ValueError(f"positions {positions.tolist()} do not continue the cache: the next "
                          f"tokens are at {expected.tolist()} (tokens are appended in order)")
    return None


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache, layer: int,
           *, scale: float | None = None, window: int | None = None,
           sinks: torch.Tensor | None = None, positions: torch.Tensor | None = None,
           group=UNSET, return_lse: bool = False):
    """Attention of T new tokens (the same on every rank) over everything cached for `layer`
    plus themselves; appends their K/V to the cache. Collective over the cache's group.

    q [B, T, Hq, D], k/v [B, T, Hkv, D]; positions: their global positions (default and the
    only legal value: cache.seq_len(layer) + 0 .. T-1; given, it is checked on every rank).
    window: key j visible to query i iff i - j < W; sinks [Hq]: one logit per head in every
    denominator. Returns o [B, T, Hq, D] in q's dtype (and lse [B, Hq, T], accumulator dtype,
    with the sinks, when return_lse). group: optional, must be the cache's.
    """
    problem = check_cache(cache, layer, group)
    info = agreement_group(cache, group)
    problem = problem or check_new_tokens(q, k, v)
    ok = problem is None
    if ok and not cache.has(layer):
        problem = ValueError(f"layer {layer} has no cached tokens: decode needs a prefill "
                             f"first (seqpar.inference.prefill)")
    if problem is None:
        problem = (check_matches_cache(cache, layer, k)
                   or check_scale_window_sinks(scale, window, sinks, q))
    seq_len = cache.seq_len(layer) if ok else 0
    expected = torch.arange(seq_len, seq_len + (q.shape[1] if ok else 0), dtype=torch.int64)
    problem = problem or _check_positions(positions, expected)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    agree(info, "seqpar.inference.decode", {
        "layer": layer,
        "tokens cached for the layer": seq_len,
        "new tokens": q.shape[1] if ok else -1,
        "positions": checksum(positions) if ok and positions is not None else
        checksum(expected),
        **call_values(q, k, scale, window, sinks, ok),
    }, problem, device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    q_pos = expected.to(q.device)
    cache.append_replicated(layer, k, v, q_pos)
    o, lse = shard_attention(q, cache.keys(layer), cache.values(layer), q_pos,
                             cache.positions(layer), scale, window)
    o, lse = merge_across_ranks(o, lse, info, Traffic.now(DECODE_OP))
    o, lse = apply_sinks(o, lse, sinks)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def decode_bytes_per_peer(batch: int, tokens: int, heads_q: int, head_dim: int,
                          acc_itemsize: int) -> int:
    """Bytes a rank sends to each other rank in one decode step (module docstring)."""
    return batch * tokens * heads_q * (head_dim + 1) * acc_itemsize
