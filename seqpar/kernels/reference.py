"""Plain PyTorch attention and linear attention: the truth every test compares against.

Nothing here is fast or memory-efficient on purpose: each function materialises the full
score matrix in the dtype it is given (pass float64 for a reference), so its only failure
mode is floating-point rounding.

Softmax attention (GQA: query head h uses key/value head h // (Hq / Hkv)):

    s_ij = scale * q_i . k_j                      (c * tanh(s_ij / c) with a soft cap c)
    visible(i, j) = same_doc(i, j) and (not causal or kp[j] <= qp[i])
                    and (W is None or |qp[i] - kp[j]| < W)          (DESIGN §4 "Masks")
    lse_i = log(exp(sink_h) + sum_{visible j} exp(s_ij))   -inf for a row that sees nothing
                                                            (and no sink)
    o_i   = sum_{visible j} exp(s_ij - lse_i) v_j            0 for such a row

Linear attention with per-head decay lambda_h = exp(-s_h), s_h >= 0 (DESIGN §2):

    causal:     o_i = sum_{j <= i} lambda^(i - j) * scale * (q_i . k_j) v_j
    non-causal: o_i = sum_j        lambda^|i - j| * scale * (q_i . k_j) v_j
"""

from __future__ import annotations

import math

import torch


def _default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def document_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of the document each global position falls in: d with c[d] <= pos < c[d + 1]."""
    return torch.searchsorted(cu_seqlens.to(positions.device, torch.int64), positions,
                              right=True) - 1


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        causal: bool, scale: float | None = None,
                        q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                        window: int | None = None, softcap: float | None = None,
                        sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; returns o [B, Sq, Hq, D]
    (q's dtype) and lse [B, Hq, Sq] (q's dtype, natural log).

    q_pos / k_pos: global positions of the query / key tokens (default: 0..S-1), used by the
    causal mask ``kp[j] <= qp[i]``, the window and the documents. `mask`: an extra boolean
    visibility mask broadcastable to [B, Hq, Sq, Sk] (e.g. a sparse pattern), and-ed with the
    others. cu_seqlens: global document boundaries [n_docs + 1]; window: W >= 1, key j visible
    only if |qp - kp| < W; softcap: c > 0; sinks: [Hq] logits in every denominator (lse
    includes them). Differentiable in q, k, v and sinks.
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
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    qp = torch.arange(sq, device=q.device) if q_pos is None else q_pos.to(q.device)
    kp = torch.arange(sk, device=q.device) if k_pos is None else k_pos.to(q.device)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= kp[None, :] <= qp[:, None]
    if window is not None:
        visible &= (qp[:, None] - kp[None, :]).abs() < window
    if cu_seqlens is not None:
        visible &= document_ids(qp, cu_seqlens)[:, None] == document_ids(kp, cu_seqlens)[None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    if sinks is not None:
        # The sink is one more logit in each row's denominator, with no value attached.
        sink_column = sinks.to(scores.dtype)[None, :, None, None].expand(batch, hq, sq, 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    else:
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
                               scale: float | None = None,
                               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Linear attention (no softmax, no normaliser). q/k [B, S, H, Dk], v [B, S, H, Dv];
    decay None or [H] log-decays s_h >= 0; cu_seqlens: document boundaries [n_docs + 1] (a
    token sees only its own document). Returns o [B, S, H, Dv] in q's dtype."""
    batch, seq, heads, dk = q.shape
    scale = _default_scale(dk, scale)
    weights = _decay_matrix(decay, seq, causal, heads, q.dtype, q.device)
    if cu_seqlens is not None:
        doc = document_ids(torch.arange(seq, device=q.device), cu_seqlens)
        weights = weights * (doc[:, None] == doc[None, :])[None]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale * weights[None]
    return torch.einsum("bhqk,bkhe->bqhe", scores, v)
