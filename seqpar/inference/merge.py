"""The one collective of a decode step: every rank's partial (o, lse) to every rank, merged.

Each rank packs its partial [B, T, Hq, D] and lse [B, Hq, T] (accumulator dtype a) into one
buffer [B, T, Hq, D + 1] and ONE all-gather gives every rank all P partials; each rank then
merges them in rank order (DESIGN §4 merge: lse = logaddexp, o weighted by exp(lse_p - lse)).

Why an all-gather and not Tree Attention's two all-reduces (max of lse, then the sums of the
rescaled o and of the weights):
* one collective instead of two -- a decode message is a few KiB (B * T * Hq * (D + 1) * a),
  so its time is latency, not bandwidth, at any group size seqpar runs;
* every rank merges the same P partials in the same order, so every rank gets bit-identical
  outputs (generate's tokens must agree on every rank, argmax ties and sampling included);
  a sum all-reduce's result is not guaranteed bitwise the same on every rank by every
  backend;
* the merge stays exact: no sums of values rescaled by a maximum computed elsewhere.
Bytes per rank per step: (P - 1) * B * T * Hq * (D + 1) * a sent (and as many received) --
independent of the context length S. For large P (bandwidth-bound merges) the all-reduce form
would send 2 (P - 1) / P of one buffer instead; not needed here.

Sinks (one extra logit per head in every denominator, DESIGN §4 "Masks") are applied once,
after the merge: ``L = logaddexp(L', sink_h)``, ``o = o' * exp(L' - L)``.
"""

from __future__ import annotations

import torch

from ..comm.primitives import GroupInfo, Traffic, start_all_gather
from ..kernels.merge import merge


def merge_across_ranks(o: torch.Tensor, lse: torch.Tensor, info: GroupInfo, traffic: Traffic
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (o [B, T, Hq, D], lse [B, Hq, T]) over every rank's shard, on every rank."""
    if info.world == 1:
        return o, lse
    packed = torch.cat([o, lse.transpose(1, 2).unsqueeze(-1).to(o.dtype)], dim=-1)
    parts = start_all_gather(packed, info, traffic).wait()  # [P, B, T, Hq, D + 1]
    o, lse = parts[0, ..., :-1], parts[0, ..., -1].transpose(1, 2)
    for part in parts[1:]:
        o, lse = merge(o, lse, part[..., :-1], part[..., -1].transpose(1, 2))
    return o, lse


def apply_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one sink logit per head [Hq] into merged (o [B, T, Hq, D], lse [B, Hq, T])."""
    if sinks is None:
        return o, lse
    sink = sinks.to(lse.dtype).to(lse.device)[None, :, None].expand_as(lse)
    total = torch.logaddexp(lse, sink)
    # exp(-inf - total) = 0 for a row that saw no key: o stays 0, its lse becomes the sink.
    return o * torch.exp(lse - total).transpose(1, 2).unsqueeze(-1).to(o.dtype), total
