"""Attention of a few queries against one rank's cached shard: the partial (o, lse) a decode
step merges across ranks.

q [B, T, Hq, D] at global positions q_pos [T]; k/v [B, n, Hkv, D] at global positions
k_pos [n] (any order: a cache shard after appends). Key j is visible to query i iff
``k_pos[j] <= q_pos[i]`` (causal) and ``q_pos[i] - k_pos[j] < window`` (a sliding window).
Returns, in the accumulator dtype (fp32; fp64 for fp64 inputs):

    lse_i = log sum_{visible j} exp(s_ij)        -inf when row i sees nothing here
    o_i   = sum_{visible j} exp(s_ij - lse_i) v_j   0 for such a row

with s_ij = scale * q_i . k_j (GQA: query head h reads K/V head h // (Hq / Hkv)).

How: the query heads sharing a K/V head and the T tokens form the columns of one matrix
[D, G * T] per K/V head, so the scores are one matrix product with the cached keys read in
place ([n, D] rows of the [B, n, Hkv, D] cache, no copy), then a masked log-sum-exp over the
keys and a second product with the values: two passes over K/V, the memory-bound minimum (the
fused CPU flash op, tiled for long query blocks, was ~2x slower for T = 1). Keys are taken in
chunks of at most `SCORE_ELEMENTS` scores, each merged into the running result
(`kernels.merge.merge_into`), so memory stays bounded for any shard length.
"""

from __future__ import annotations

import torch

from ..kernels.merge import merge_into
from ..kernels.plan import accumulator_dtype

SCORE_ELEMENTS = 2 ** 22  # scores materialised at once (16 MiB in fp32)


def _chunk(q, k, v, q_pos, k_pos, scale: float, window: int | None):
    """(o [B, T, Hq, D], lse [B, Hq, T]) of q against one key chunk, accumulator dtype."""
    acc = accumulator_dtype(q.dtype)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    # columns: (query head within its group, token); query head h = kv head * G + g
    columns = q.to(acc).reshape(b, t, hkv, g, d).permute(0, 2, 4, 3, 1).reshape(b, hkv, d, g * t)
    scores = torch.matmul(k.to(acc).transpose(1, 2), columns) * scale  # [B, Hkv, n, G * T]
    distance = q_pos[None, :] - k_pos[:, None]  # [n, T]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    if not bool(visible.all()):
        scores.masked_fill_(~visible.repeat(1, g), float("-inf"))
    lse = torch.logsumexp(scores, dim=2)  # [B, Hkv, G * T]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[:, :, None])
    o = torch.matmul(probs.transpose(2, 3), v.to(acc).transpose(1, 2))  # [B, Hkv, G * T, D]
    o = o.reshape(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d)
    return o, lse.reshape(b, hq, t)


def shard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    k_pos: torch.Tensor, scale: float, window: int | None = None,
                    key_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, Hq, D], lse [B, Hq, T]) of q against this shard (module docstring).
    key_chunk: keys per chunk (default: as many as `SCORE_ELEMENTS` scores allow)."""
    acc = accumulator_dtype(q.dtype)
    b, t, hq, d = q.shape
    q_pos, k_pos = q_pos.to(q.device), k_pos.to(q.device)
    n = k.shape[1]
    step = key_chunk or max(1024, SCORE_ELEMENTS // (b * hq * t))
    if 0 < n <= step:
        return _chunk(q, k, v, q_pos, k_pos, scale, window)
    o = torch.zeros(b, t, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq, t), float("-inf"), dtype=acc, device=q.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        part_o, part_lse = _chunk(q, k[:, start:stop], v[:, start:stop], q_pos,
                                  k_pos[start:stop], scale, window)
        merge_into(o, lse, part_o, part_lse)
    return o, lse
