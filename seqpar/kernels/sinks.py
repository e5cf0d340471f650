"""Attention sinks: one extra logit per head in every softmax denominator, carrying no value.

Applied once, after every partial result of a row has been merged (DESIGN §4 "Masks"), to the
merged (o', L') any backend returns:

    L   = logaddexp(L', sink_h)
    w   = exp(L' - L) = sigmoid(L' - sink_h)          the share of the real keys
    o   = w * o'

Backward, from the final (o, L) and the incoming (dO, dL) (dL = 0 when lse is not used):

    delta_i = sum_d dO_id * o_id
    dO'     = w * dO
    dL'     = (1 - w) * delta + w * dL
    dsink_h = -sum_i (1 - w_i) * (delta_i - dL_i),     1 - w_i = exp(sink_h - L_i)

summed over this rank's rows (and the batch): each rank returns its tokens' share, like every
parameter gradient. A row that sees no key (L' = -inf) has w = 0, o = 0, L = sink_h and
dO' = dL' = 0 -- no NaN either way.

Shapes: o' [B, S, H, D] (any float dtype), L' [B, H, S] (fp32 / fp64), sinks [H].
"""

from __future__ import annotations

import torch

from .plan import accumulator_dtype


def _weights(lse_inner: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, w) in lse_inner's dtype; w = 0 where L' = -inf (and where both are -inf)."""
    sink = sinks.to(lse_inner.dtype)[None, :, None]
    lse = torch.logaddexp(lse_inner, sink)
    w = torch.where(torch.isinf(lse_inner), torch.zeros_like(lse), torch.exp(lse_inner - lse))
    return lse, w


def sinks_fwd(o_inner: torch.Tensor, lse_inner: torch.Tensor, sinks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o in o_inner's dtype, L in lse_inner's dtype)."""
    lse, w = _weights(lse_inner, sinks)
    acc = accumulator_dtype(o_inner.dtype)
    o = (o_inner.to(acc) * w.to(acc).transpose(1, 2).unsqueeze(-1)).to(o_inner.dtype)
    return o, lse


def sinks_bwd(do: torch.Tensor | None, dlse: torch.Tensor | None, o: torch.Tensor,
              lse_inner: torch.Tensor, sinks: torch.Tensor):
    """(dO', dL', dsinks [H] in the accumulator dtype) from the final o and the inner L'."""
    lse, w = _weights(lse_inner, sinks)
    acc = lse.dtype
    delta = torch.zeros_like(lse) if do is None else (do.to(acc) * o.to(acc)).sum(-1).transpose(1, 2)
    dl = torch.zeros_like(lse) if dlse is None else dlse.to(acc)
    rest = 1 - w
    do_inner = None if do is None else (do.to(acc) * w.transpose(1, 2).unsqueeze(-1)).to(do.dtype)
    dlse_inner = rest * delta + w * dl
    dsinks = -(rest * (delta - dl)).sum(dim=(0, 2))
    return do_inner, dlse_inner, dsinks


class AttentionSinks(torch.autograd.Function):
    """Autograd wrapper: (o', L', sinks) -> (o, L); backward `sinks_bwd`."""

    @staticmethod
    def forward(ctx, o_inner, lse_inner, sinks):
        o, lse = sinks_fwd(o_inner, lse_inner, sinks)
        ctx.save_for_backward(o, lse_inner, sinks)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        o, lse_inner, sinks = ctx.saved_tensors
        do_inner, dlse_inner, dsinks = sinks_bwd(do, dlse, o, lse_inner, sinks)
        return do_inner, dlse_inner, dsinks.to(sinks.dtype)
