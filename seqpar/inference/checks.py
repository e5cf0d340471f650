"""Argument checks of the inference calls: this rank's verdict, raised on every rank through
`comm.primitives.agree` by the caller (so bad input on one rank never hangs the others)."""

from __future__ import annotations

import math

import torch

from ..api import _DTYPE_CODES, _check_tensors, _check_window_softcap_sinks, _float_bits
from ..comm.primitives import GroupInfo, resolve_group
from ..layout import ALL_LAYOUTS
from .cache import ShardedKVCache

UNSET = object()  # "argument not given" (None is a group: WORLD)


def check_cache(cache, layer, group=UNSET, layout=None) -> Exception | None:
    """A ShardedKVCache, a layer index, and (when given) the group and layout it was made for."""
    if not isinstance(cache, ShardedKVCache):
        return TypeError(f"cache must be a seqpar.inference.ShardedKVCache, got "
                         f"{type(cache).__name__}; make one with ShardedKVCache(group, layout)")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        return ValueError(f"layer must be a layer index (int >= 0), got {layer!r}")
    if group is not UNSET:
        try:
            info = resolve_group(group)
        except (TypeError, ValueError) as error:
            return error
        if info.group is not cache.info.group:
            return ValueError(f"the cache belongs to another group (this rank is rank "
                              f"{cache.info.rank} of {cache.info.world} in the cache's group, "
                              f"rank {info.rank} of {info.world} in the given one); pass the "
                              f"group the cache was made with, or a cache made for this group")
    if layout is not None and layout != cache.layout:
        return ValueError(f"layout={layout!r} but the cache holds a {cache.layout!r} layout; "
                          f"shard with the cache's layout, or make a new cache for {layout!r}")
    return None


def agreement_group(cache, group) -> GroupInfo:
    """The group a call's checks are agreed over: the cache's; without a cache (bad argument)
    the given group, else WORLD, so the other ranks' agreement still gets an answer."""
    if isinstance(cache, ShardedKVCache):
        return cache.info
    try:
        return resolve_group(None if group is UNSET else group)
    except (TypeError, ValueError):
        return resolve_group(None)


def check_new_tokens(q, k, v) -> Exception | None:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq % Hkv == 0, one dtype and device."""
    problem = _check_tensors(q, k, v)
    if problem:
        return problem
    if k.shape != v.shape:
        return ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                          f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        return ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, tokens "
                          f"and head dim (q [B, T, Hq, D], k/v [B, T, Hkv, D])")
    if q.shape[2] % k.shape[2]:
        return ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                          f"({k.shape[2]}) for grouped-query attention")
    if q.shape[1] == 0:
        return ValueError("no new tokens (q.shape[1] == 0)")
    return None


def check_matches_cache(cache: ShardedKVCache, layer: int, k) -> Exception | None:
    """New K/V of a filled layer must look like what it holds."""
    cached = cache.keys(layer)
    if (cached.shape[0], *cached.shape[2:]) != (k.shape[0], *k.shape[2:]) or \
            cached.dtype != k.dtype or cached.device != k.device:
        return ValueError(f"layer {layer} caches K/V [B={cached.shape[0]}, n, Hkv="
                          f"{cached.shape[2]}, D={cached.shape[3]}] {cached.dtype} on "
                          f"{cached.device}, got new k {tuple(k.shape)} {k.dtype} on {k.device}")
    return None


def check_scale_window_sinks(scale, window, sinks, q) -> Exception | None:
    """scale here; the window and the sinks as `seqpar.attention` checks them."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        return ValueError(f"scale must be None (1/sqrt(head_dim)) or a positive finite number, "
                          f"got {scale!r}")
    return _check_window_softcap_sinks(q, window, None, sinks)


def checksum(values: torch.Tensor) -> int:
    """An integer that differs when the values (or their order) differ (for `agree`)."""
    flat = values.detach().reshape(-1).to(torch.float64).cpu()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return _float_bits(float((flat * weights).sum()) + 0.5 * flat.numel())


def call_values(q, k, scale, window, sinks, ok: bool) -> dict[str, int]:
    """What every rank of one call must share (placeholders where this rank's input is bad)."""
    return {
        "dtype": _DTYPE_CODES[q.dtype] if ok else -1,
        "batch size": q.shape[0] if ok else -1,
        "query heads": q.shape[2] if ok else -1,
        "key/value heads": k.shape[2] if ok else -1,
        "head dim": q.shape[3] if ok else -1,
        "scale": _float_bits(float(scale)) if ok and scale is not None else 0,
        "window": window if ok and window is not None else 0,
        "sinks (present)": int(sinks is not None),
        "sinks": checksum(sinks) if ok and sinks is not None else 0,
    }


def layout_code(layout: str) -> int:
    return ALL_LAYOUTS.index(layout) if layout in ALL_LAYOUTS else -1
