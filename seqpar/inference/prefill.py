"""Prefill: attention over a prompt sharded across the group, filling the sharded KV cache.

Every rank passes its shard of the prompt's q, k, v in the cache's layout (as `seqpar.shard`
makes them); the attention itself is `seqpar.attention` with any softmax backend (ring,
tokenring, ulysses, usp, allgather, auto), and this rank's k/v are then kept in the cache at
their global positions (`seqpar.positions`). Nothing is gathered: the cache of rank r holds
exactly the prompt tokens the layout gave r.

Sinks: `seqpar.attention` returns (o, lse) over the prompt's keys; one sink logit per head is
folded in after (`merge.apply_sinks`), as DESIGN §4 prescribes. A sliding window goes to
`seqpar.attention(..., window=)` (key j visible to query i iff i - j < W), whose ring and
TokenRing then move only what the window can see.
"""

from __future__ import annotations

import torch

from ..api import attention
from ..comm.primitives import agree
from ..layout import positions as layout_positions
from .cache import ShardedKVCache
from .checks import (UNSET, agreement_group, call_values, check_cache, check_new_tokens,
                     check_scale_window_sinks, layout_code)
from .merge import apply_sinks

def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
            layer: int, *, backend: str = "ring", scale: float | None = None,
            sinks: torch.Tensor | None = None, window: int | None = None, group=UNSET,
            layout: str | None = None, return_lse: bool = False, **backend_options):
    """Causal attention of this rank's prompt shard (q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv,
    D], the cache's layout) over the whole prompt; stores k/v in `cache` for `layer`.
    Returns o [B, S_loc, Hq, D] (and lse [B, Hq, S_loc] with return_lse). Collective.
    group / layout: optional, checked against the cache's."""
    problem = check_cache(cache, layer, group, layout)
    info = agreement_group(cache, group)
    problem = problem or check_new_tokens(q, k, v)
    ok = problem is None
    if ok and cache.has(layer):
        problem = ValueError(f"layer {layer} is already prefilled ({cache.seq_len(layer)} "
                             f"tokens); add tokens with partial_prefill or decode, or use a "
                             f"new cache")
    problem = problem or check_scale_window_sinks(scale, window, sinks, q)
    agree(info, "seqpar.inference.prefill", {
        "layer": layer,
        "cache layout": layout_code(cache.layout) if isinstance(cache, ShardedKVCache) else -1,
        "local prompt tokens": q.shape[1] if ok else -1,
        **call_values(q, k, scale, window, sinks, ok),
    }, problem, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    want_lse = return_lse or sinks is not None
    result = attention(q, k, v, cache.group, backend=backend, causal=True, scale=scale,
                       layout=cache.layout, return_lse=want_lse, window=window,
                       **backend_options)
    o, lse = result if want_lse else (result, None)
    if sinks is not None:
        o, lse = apply_sinks(o, lse, sinks)
        o = o.to(q.dtype)
    seq_len = q.shape[1] * info.world
    cache.append_sharded(layer, k.detach(), v.detach(),
                         layout_positions(seq_len, cache.group, cache.layout, device=q.device))
    return (o, lse) if return_lse else o
