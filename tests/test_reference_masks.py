"""The reference's masks (documents, window, soft cap, sinks) against a per-element loop.

Everything else is compared with `attention_reference`, so its mask rule is checked here
against DESIGN §4 written out entry by entry, at shapes small enough for a Python loop."""

import math

import pytest
import torch

from seqpar.kernels.reference import attention_reference, linear_attention_reference


def _loop_attention(q, k, v, causal, scale, cu, window, softcap, sinks):
    _, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bounds = cu.tolist() if cu is not None else [0, max(sq, sk)]
    doc = lambda p: max(d for d in range(len(bounds) - 1) if bounds[d] <= p)  # noqa: E731
    o = torch.zeros_like(q)
    lse = torch.full((q.shape[0], hq, sq), -math.inf, dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(sq):
                logits, values = [], []
                for j in range(sk):
                    if causal and j > i:
                        continue
                    if window is not None and abs(i - j) >= window:
                        continue
                    if doc(i) != doc(j):
                        continue
                    s = scale * float(q[b, i, h] @ k[b, j, g])
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s)
                    values.append(v[b, j, g])
                if sinks is not None:
                    logits.append(float(sinks[h]))
                if not logits:
                    continue
                m = max(logits)
                total = sum(math.exp(x - m) for x in logits)
                lse[b, h, i] = m + math.log(total)
                for s, val in zip(logits, values):
                    o[b, i, h] += math.exp(s - lse[b, h, i].item()) * val
    return o, lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu,window,softcap,with_sinks", [
    (None, None, None, False),
    ([0, 1, 4, 9], None, None, False),
    (None, 3, None, False),
    (None, 1, None, True),
    (None, None, 0.5, False),
    ([0, 5, 6, 9], 2, 0.7, True),
])
def test_reference_masks_match_the_rule(causal, cu, window, softcap, with_sinks):
    torch.manual_seed(0)
    q = torch.randn(1, 9, 4, 5, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 5, dtype=torch.float64)
    v = torch.randn(1, 9, 2, 5, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu)
    sinks = torch.randn(4, dtype=torch.float64) if with_sinks else None
    o, lse = attention_reference(q, k, v, causal=causal, scale=0.6, cu_seqlens=cu_t,
                                 window=window, softcap=softcap, sinks=sinks)
    o_loop, lse_loop = _loop_attention(q, k, v, causal, 0.6, cu_t, window, softcap, sinks)
    torch.testing.assert_close(o, o_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_loop, rtol=1e-12, atol=1e-12)


def test_reference_sink_gradient_matches_the_formula():
    """dsink_h = -sum_i exp(sink_h - L_i) * delta_i, delta_i = sum(dO_i * o_i) (DESIGN §4)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    o, lse = attention_reference(q, k, v, causal=True, window=2, sinks=sinks)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    delta = (do * o).sum(-1).transpose(1, 2)  # [B, H, S]
    expected = -(torch.exp(sinks.detach()[None, :, None] - lse) * delta).sum(dim=(0, 2))
    torch.testing.assert_close(sinks.grad, expected.detach(), rtol=1e-12, atol=1e-12)


def test_linear_reference_cuts_documents():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 7, 2, 3, dtype=torch.float64) for _ in range(3))
    decay = torch.tensor([0.0, 0.3], dtype=torch.float64)
    cu = torch.tensor([0, 3, 7])
    packed = linear_attention_reference(q, k, v, decay=decay, cu_seqlens=cu)
    alone = torch.cat([linear_attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], decay=decay)
                       for a, b in ((0, 3), (3, 7))], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
