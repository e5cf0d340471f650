"""Sequence-tiled "hidden states -> lm_head -> (soft cap) -> cross entropy": the summed
next-token loss of N tokens without ever holding more than one tile's logits.

Math, per token n with hidden state h_n [H], lm_head weight W [V, H] (bias b [V] or none),
soft cap c (or none) and label y_n (IGNORE_INDEX = no target):

    z_n = W h_n + b                      logits, in the model's dtype (as lm_head computes them)
    z_n = c * tanh(z_n / c)              when c is set (Gemma 2 `final_logit_softcapping`), same
                                         order of operations and dtype as transformers' forward
    l_n = logsumexp(z_n) - z_n[y_n]      in the loss dtype: fp64 for an fp64 model, else fp32
    L   = sum_{n: y_n != IGNORE} l_n

Forward: tiles of T tokens under no_grad, one [T, V] block of logits at a time; only the
inputs are saved (h [N, H], the labels, the weights -- which the model holds anyway).
Backward: the same tiles again, each recomputed with autograd on and differentiated alone:
dh_tile goes into its rows of dh, dW and db are summed over tiles in the loss dtype (fp32 for a
bf16 model, so the sum of N / T partial products loses nothing against one big matmul) and
cast back at the end. The peak beyond the inputs is one tile's graph (logits in the model
dtype, their loss-dtype copy, the log-softmax and its gradient: about 4 * T * V elements),
against 2-3 * N * V for the untiled path.

Why not DeepSpeed's `TiledFusedLogitsLoss`: it runs the backward inside the forward, so the
lm_head's gradient is written during the forward (a forward without backward, e.g. an eval
step with grad on, pollutes .grad), and an incoming gradient other than 1 -- here 1 / (global
number of labelled tokens), which is what makes the value the global mean and the gradient this
rank's share -- reaches only the hidden states' gradient, not the weight's it already wrote.
It has no soft cap and computes in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: fp64 for fp64 logits, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TilePlan:
    tile: int                    # tokens per tile (the last one may be shorter)
    softcap: float | None        # final-logit soft cap c, or None


def tile_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Sum of the cross entropies of one tile (hidden [T, H], labels [T]), in loss_dtype."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        # transformers' order (Gemma 2): divide, tanh, multiply, in the logits' dtype
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.to(loss_dtype(logits.dtype)), labels,
                           ignore_index=IGNORE_INDEX, reduction="sum")


class TiledLMLoss(torch.autograd.Function):
    """sum_n l_n of the module docstring. hidden [N, H], weight [V, H], bias [V] or None,
    labels [N] int64; returns a 0-d tensor in loss_dtype(hidden.dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, plan: TilePlan):
        total = torch.zeros((), dtype=loss_dtype(hidden.dtype), device=hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], plan.tile):
                stop = start + plan.tile
                total += tile_loss(hidden[start:stop], weight, bias, labels[start:stop],
                                   plan.softcap)
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias, labels)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, labels = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = loss_dtype(hidden.dtype)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) \
            if need_b and bias is not None else None
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(need_b) if bias is not None else None
        for start in range(0, hidden.shape[0], plan.tile):
            stop = start + plan.tile
            h = hidden[start:stop].detach().requires_grad_(need_h)
            with torch.enable_grad():
                value = tile_loss(h, w, b, labels[start:stop], plan.softcap)
                wanted = [t for t, need in ((h, need_h), (w, need_w), (b, need_b))
                          if need and t is not None]
                grads = iter(torch.autograd.grad(value, wanted, grad_total.to(value.dtype)))
            if need_h:
                d_hidden[start:stop] = next(grads)
            if need_w:
                d_weight += next(grads)
            if need_b and b is not None:
                d_bias += next(grads)
        return (d_hidden,
                d_weight.to(weight.dtype) if d_weight is not None else None,
                d_bias.to(bias.dtype) if d_bias is not None else None,
                None, None)


def tiled_lm_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, tile: int, softcap: float | None = None
                      ) -> torch.Tensor:
    """hidden [..., H] and labels [...] (same leading shape) -> the summed loss (module
    docstring), differentiable in hidden, weight and bias."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be an int >= 1 (tokens per tile), got {tile!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must "
                         f"share their leading (batch, sequence) shape")
    return TiledLMLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                             labels.reshape(-1), TilePlan(tile, softcap))


__all__ = ["tiled_lm_loss_sum", "tile_loss", "loss_dtype", "TiledLMLoss", "IGNORE_INDEX"]
