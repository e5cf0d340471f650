"""Attention of a few queries against one rank's cached shard: the partial (o, lse) a decode
step merges across ranks.

q [B, T, Hq, D] at global positions q_pos [T]; k/v [B, n, Hkv, D] at global positions
k_pos [n] (any order: a cache shard after appends). Key j is visible to query i iff
``k_pos[j] <= q_pos[i]`` (causal) and ``q_pos[i] - k_pos[j] < window`` (a sliding window).
Returns, in the accumulator dtype (fp32; fp64 for fp64 inputs):

    lse_i = log sum_{visible j} exp(s_ij)        -inf when row i sees nothing here
    o_i   = sum_{visible j} exp(s_ij - lse_i) v_j   0 for such a row

with s_ij = scale * q_i . k_j (GQA: query head h reads K/V head h // (Hq / Hkv)).

Two paths, the same result: when every key is visible to every query (the usual decode step:
causal, no window) the fused CPU flash op (`kernels.torch_cpu.flash_fwd`, one pass over K/V,
no score matrix); otherwise plain tensor ops over key chunks of `KEY_CHUNK`, each merged into
the running result (`kernels.merge.merge_into`), so memory stays O(T * KEY_CHUNK) per head.
"""

from __future__ import annotations

import torch

from ..kernels.merge import merge_into
from ..kernels.plan import accumulator_dtype
from ..kernels.torch_cpu import FLASH_DTYPES, flash_fwd

KEY_CHUNK = 8192


def _all_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> bool:
    if k_pos.numel() == 0:
        return False
    newest, oldest = int(k_pos.max()), int(k_pos.min())
    if newest > int(q_pos.min()):
        return False
    return window is None or int(q_pos.max()) - oldest < window


def _chunk(q, k, v, q_pos, k_pos, scale: float, window: int | None):
    """(o, lse) of q against one key chunk, masks by position, accumulator dtype."""
    acc = accumulator_dtype(q.dtype)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.to(acc).reshape(b, t, hkv, hq // hkv, d)
    scores = torch.einsum("bthgd,bnhd->bhgtn", qg, k.to(acc)) * scale
    distance = q_pos[:, None] - k_pos[None, :]  # [T, n]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, T]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    o = torch.einsum("bhgtn,bnhd->bthgd", probs, v.to(acc)).reshape(b, t, hq, d)
    return o, lse.reshape(b, hq, t)


def shard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    k_pos: torch.Tensor, scale: float, window: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, Hq, D], lse [B, Hq, T]) of q against this shard (module docstring)."""
    acc = accumulator_dtype(q.dtype)
    b, t, hq, d = q.shape
    q_pos, k_pos = q_pos.to(q.device), k_pos.to(q.device)
    if (q.device.type == "cpu" and q.dtype in FLASH_DTYPES
            and _all_visible(q_pos, k_pos, window)):
        o, lse = flash_fwd(q, k, v, False, scale)
        return o.to(acc), lse.to(acc)
    o = torch.zeros(b, t, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq, t), float("-inf"), dtype=acc, device=q.device)
    for start in range(0, k.shape[1], KEY_CHUNK):
        stop = min(k.shape[1], start + KEY_CHUNK)
        part_o, part_lse = _chunk(q, k[:, start:stop], v[:, start:stop], q_pos,
                                  k_pos[start:stop], scale, window)
        merge_into(o, lse, part_o, part_lse)
    return o, lse
