"""Plain PyTorch attention and linear attention: the truth every test compares against.

Nothing here is fast or memory-efficient on purpose: each function materialises the full
score matrix in the dtype it is given (pass float64 for a reference), so its only failure
mode is floating-point rounding.

Softmax attention (GQA: query head h uses key/value head h // (Hq / Hkv)):

    s_ij = scale * q_i . k_j                      masked to -inf where kp[j] > qp[i] (causal)
    lse_i = log sum_j exp(s_ij)                   -inf for a row that sees no key
    o_i   = sum_j exp(s_ij - lse_i) v_j           0 for such a row

Linear attention with per-head decay lambda_h = exp(-s_h), s_h >= 0 (DESIGN §2):

    causal:     o_i = sum_{j <= i} lambda^(i - j) * scale * (q_i . k_j) v_j
    non-causal: o_i = sum_j        lambda^|i - j| * scale * (q_i . k_j) v_j
"""

from __future__ import annotations

import math

import torch


def _default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        causal: bool, scale: float | None = None,
                        q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; returns o [B, Sq, Hq, D]
    (q's dtype) and lse [B, Hq, Sq] (q's dtype, natural log).

    q_pos / k_pos: global positions of the query / key tokens (default: 0..S-1), used by the
    causal mask ``kp[j] <= qp[i]``. `mask`: an extra boolean visibility mask broadcastable to
    [B, Hq, Sq, Sk] (e.g. a sparse pattern), and-ed with the causal one. Differentiable.
    """
    batch, sq, hq, dim = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    groups = hq // hkv
    scale = _default_scale(dim, scale)
    k_rep = k.repeat_interleave(groups, dim=2)
    v_rep = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) * scale
    if causal:
        qp = torch.arange(sq, device=q.device) if q_pos is None else q_pos.to(q.device)
        kp = torch.arange(sk, device=q.device) if k_pos is None else k_pos.to(q.device)
        visible = kp[None, :] <= qp[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see nothing: lse = -inf; subtract 0 there so exp(-inf) = 0 instead of NaN.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = torch.einsum("bhqk,bkhd->bqhd", probs, v_rep)
    return o, lse


def _decay_matrix(log_decay: torch.Tensor | None, sq: int, causal: bool, heads: int,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[H, S, S] weights lambda_h^(i - j) (i >= j; causal) or lambda_h^|i - j| (non-causal).

    Computed as exp(-s * distance), never as a ratio of powers, so strong decays underflow
    to exactly 0 instead of producing inf * 0.
    """
    idx = torch.arange(sq, device=device)
    distance = (idx[:, None] - idx[None, :]).to(dtype)
    if causal:
        keep = distance >= 0
        distance = distance.clamp(min=0)
    else:
        keep = torch.ones(sq, sq, dtype=torch.bool, device=device)
        distance = distance.abs()
    if log_decay is None:
        weights = torch.ones(heads, sq, sq, dtype=dtype, device=device)
    else:
        weights = torch.exp(-log_decay.to(dtype)[:, None, None] * distance[None])
    return weights * keep[None]


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               decay: torch.Tensor | None = None, causal: bool = True,
                               scale: float | None = None) -> torch.Tensor:
    """Linear attention (no softmax, no normaliser). q/k [B, S, H, Dk], v [B, S, H, Dv];
    decay None or [H] log-decays s_h >= 0. Returns o [B, S, H, Dv] in q's dtype."""
    batch, seq, heads, dk = q.shape
    scale = _default_scale(dk, scale)
    weights = _decay_matrix(decay, seq, causal, heads, q.dtype, q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale * weights[None]
    return torch.einsum("bhqk,bkhe->bqhe", scores, v)
