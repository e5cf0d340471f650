"""Merge partial softmax-attention results.

Two partial results over disjoint key sets, (o1, lse1) and (o2, lse2), combine into the result
over the union:

    lse = logaddexp(lse1, lse2)
    o   = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2
        = o1 - sigmoid(lse2 - lse1) * (o1 - o2)          # the stable form used here

Shapes follow the public convention: o [B, S, H, D], lse [B, H, S] (fp32, natural log).

A fully masked partial has lse = -inf and o = 0. The sigmoid form is -inf safe once the
difference of two -inf values (NaN) is replaced by -inf: then the weight of the second
partial is 0 and the first (also empty) is kept, so no NaN is ever produced.
"""

from __future__ import annotations

import torch


def _second_weight(lse1: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """sigmoid(lse2 - lse1), with (-inf) - (-inf) treated as -inf (weight 0)."""
    diff = lse2 - lse1
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("-inf")), diff)
    return torch.sigmoid(diff)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the merged (o, lse); inputs are not modified. o in the promoted dtype of o1/o2."""
    weight = _second_weight(lse1, lse2).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    o = o1 - weight * (o1 - o2)
    return o, torch.logaddexp(lse1, lse2)


def merge_into(acc_o: torch.Tensor, acc_lse: torch.Tensor, block_o: torch.Tensor,
               block_lse: torch.Tensor) -> None:
    """Merge (block_o, block_lse) into the accumulators in place.

    acc_o [B, S, H, D] and acc_lse [B, H, S] are the running result (usually fp32, may be
    views into larger accumulators); block_o may be in a lower precision, it is upcast.
    """
    weight = _second_weight(acc_lse, block_lse.to(acc_lse.dtype)).transpose(1, 2).unsqueeze(-1)
    acc_o.sub_(weight.to(acc_o.dtype) * (acc_o - block_o.to(acc_o.dtype)))
    torch.logaddexp(acc_lse, block_lse.to(acc_lse.dtype), out=acc_lse)
