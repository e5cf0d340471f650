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

Bytes per rank and step: (P - 1) * (B * T * Hq * (D + 1) * a + 8 * 13) (a: 4, or 8 for fp64;
13 int64 values of the argument check ride in the same message) -- the context length S never
appears. The argument check adds one tiny all-reduce (`agree`) only on a cache's first step
and when the call's shape changes (`_Step`).
"""

from __future__ import annotations

import math

import torch

from ..comm.primitives import Traffic, agree
from ..kernels.plan import accumulator_dtype
from .cache import ShardedKVCache
from .checks import (UNSET, agreement_group, call_values, check_cache, check_matches_cache,
                     check_new_tokens, check_scale_window_sinks)
from .local import shard_attention
from .merge import apply_sinks, gather, headers, merged, pack

DECODE_OP = "decode"
WHERE = "seqpar.inference.decode"


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
    values = {
        "layer": layer if isinstance(layer, int) else -1,
        "tokens cached for the layer": seq_len,
        "new tokens": q.shape[1] if ok else -1,
        # positions that pass the local check equal `expected`: seq_len and T stand for them
        **call_values(q, k, scale, window, sinks, ok),
    }
    step = _Step(q, k, v, cache, layer, scale, window, info, values, ok)
    agreed = getattr(cache, "decode_agreed", None)
    if info.world == 1 or agreed is None:
        agree(info, WHERE, values, problem, device)
        o, lse = step.run()
    else:
        o, lse = step.fast(problem, agreed, device)
    if info.world > 1:
        cache.decode_agreed = step.signature
    o, lse = apply_sinks(o, lse, sinks)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


class _Step:
    """One decode step of one layer after (or while) its arguments are checked.

    The argument agreement across ranks: the first step of a cache (and any step whose call
    shape differs from the last agreed one) runs `agree`, one small all-reduce, before any
    work. Later steps of the agreed shape (B, T, Hq, D, accumulator dtype, all ranks alike:
    the shape fixes the merge buffer's size) skip it: their checked values travel as the
    header of the merge's all-gather (`merge.py`) and are compared after it, on every rank
    alike. A rank whose own check failed, or whose call shape changed, sends a header saying
    so (and zeros, in the agreed size); then every rank undoes the step's append and runs the
    full `agree`, which raises on every rank (or, when every rank changed shape together,
    agrees on the new shape and the step runs again). So a step costs one collective, and bad
    input still raises on every rank without a hang. (A rank passing something that is not a
    ShardedKVCache after the first step cannot know the agreed size; that is not detected.)
    """

    def __init__(self, q, k, v, cache, layer, scale, window, info, values, ok: bool):
        self.q, self.k, self.v, self.cache, self.layer = q, k, v, cache, layer
        self.window, self.info, self.values = window, info, values
        self.shape = tuple(q.shape) if ok else None
        self.scale = None if not ok else (
            1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale))
        self.acc = accumulator_dtype(q.dtype) if ok else None

    @property
    def signature(self):
        """What sizes the merge buffer: ((B, T, Hq, D), accumulator dtype)."""
        return None if self.shape is None else (self.shape, self.acc)

    def _partial(self):
        """Append the new K/V (each token to its owner) and attend this rank's shard."""
        cache, layer, q = self.cache, self.layer, self.q
        seq_len = cache.seq_len(layer)
        q_pos = torch.arange(seq_len, seq_len + q.shape[1], dtype=torch.int64, device=q.device)
        cache.append_replicated(layer, self.k, self.v, q_pos)
        return shard_attention(q, cache.keys(layer), cache.values(layer), q_pos,
                               cache.positions(layer), self.scale, self.window)

    def _header(self, flag: int) -> list[int]:
        return [flag] + [int(value) for value in self.values.values()]

    def run(self):
        """The step after a full `agree`: partial, one all-gather, merge."""
        o, lse = self._partial()
        if self.info.world == 1:
            return o, lse
        parts = gather(pack(self._header(0), o, lse, self.shape, self.acc, o.device), self.info,
                       Traffic.now(DECODE_OP))
        return merged(parts, len(self.values) + 1, self.shape)

    def fast(self, problem, agreed, device):
        """The step with its agreement inside the merge's all-gather (class docstring)."""
        shard = self.cache.layer(self.layer)
        saved = (shard.length, list(shard.lengths))
        width = len(self.values) + 1
        if problem is None and self.signature == agreed:
            o, lse = self._partial()
            buffer = pack(self._header(0), o, lse, self.shape, self.acc, o.device)
        else:  # this rank cannot take part: say so in the agreed buffer size
            buffer = pack(self._header(1), None, None, agreed[0], agreed[1], device)
        parts = gather(buffer, self.info, Traffic.now(DECODE_OP))
        every = headers(parts, width)
        if any(header[0] for header in every):
            shard.length, shard.lengths = saved  # undo this step's append, if it ran
            agree(self.info, WHERE, self.values, problem, device)  # raises on every rank, or
            return self.run()  # every rank changed shape alike: agreed, run the step again
        for i, name in enumerate(self.values, start=1):
            column = [header[i] for header in every]
            if min(column) != max(column):
                shard.length, shard.lengths = saved
                raise ValueError(f"{WHERE}: {name} differs across ranks (this rank: "
                                 f"{self.values[name]}, min: {min(column)}, max: "
                                 f"{max(column)}); every rank of the group must pass the same "
                                 f"{name}")
        return merged(parts, width, self.shape)


HEADER_VALUES = 13  # the flag and the 12 checked values of a step (`decode`'s `values`)


def decode_bytes_per_peer(batch: int, tokens: int, heads_q: int, head_dim: int,
                          acc_itemsize: int) -> int:
    """Bytes a rank sends to each other rank in one decode step (module docstring): the
    partials and the header of checked values."""
    return batch * tokens * heads_q * (head_dim + 1) * acc_itemsize + 8 * HEADER_VALUES
