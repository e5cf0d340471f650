"""The one collective of a decode step: every rank's partial (o, lse) to every rank, merged.

Each rank packs a small integer header (the step's checked values, `decode.py`), its partial
o [B, T, Hq, D] and its lse [B, Hq, T] (accumulator dtype a) into ONE flat buffer
[header | o and lse as [B, T, Hq, D + 1]]; ONE all-gather (posted as one batch of direct
sends to every other rank, `gather`) gives every rank all P buffers; each
rank then merges the partials in rank order (DESIGN §4 merge: lse = logaddexp, o weighted by
exp(lse_p - lse)). The header's int64 values travel bit for bit (viewed as the buffer's
dtype: two fp32 or one fp64 per value), so the argument agreement of a step rides in the
merge's own message instead of a second collective.

Why an all-gather and not Tree Attention's two all-reduces (max of lse, then the sums of the
rescaled o and of the weights):
* one collective instead of two -- a decode message is a few KiB (B * T * Hq * (D + 1) * a),
  so its time is latency, not bandwidth, at any group size seqpar runs;
* every rank merges the same P partials in the same order, so every rank gets bit-identical
  outputs (generate's tokens must agree on every rank, argmax ties and sampling included);
  a sum all-reduce's result is not guaranteed bitwise the same on every rank by every
  backend;
* the merge stays exact: no sums of values rescaled by a maximum computed elsewhere.
Bytes per rank per step: (P - 1) * (B * T * Hq * (D + 1) * a + 8 * header values) sent (and
as many received) -- independent of the context length S. For large P (bandwidth-bound
merges) the all-reduce form would send 2 (P - 1) / P of one buffer instead; not needed here.

Sinks (one extra logit per head in every denominator, DESIGN §4 "Masks") are applied once,
after the merge: ``L = logaddexp(L', sink_h)``, ``o = o' * exp(L' - L)``.
"""

from __future__ import annotations

import torch

import torch.distributed as dist

from ..comm.primitives import GroupInfo, Traffic
from ..kernels.merge import merge


def header_width(values: int, dtype: torch.dtype) -> int:
    """Buffer elements of `dtype` that carry `values` int64 header values."""
    return values * 8 // torch.empty((), dtype=dtype).element_size()


def pack(header: list[int], o: torch.Tensor | None, lse: torch.Tensor | None,
         shape: tuple[int, int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """The flat buffer [header | o and lse]; o = None packs zeros of `shape` [B, T, Hq, D]
    (a rank that only says, in its header, that the step must be checked again)."""
    head = torch.tensor(header, dtype=torch.int64, device=device).view(dtype)
    if o is None:
        b, t, hq, d = shape
        return torch.cat([head, torch.zeros(b * t * hq * (d + 1), dtype=dtype, device=device)])
    body = torch.cat([o, lse.transpose(1, 2).unsqueeze(-1).to(o.dtype)], dim=-1)
    return torch.cat([head, body.reshape(-1)])


def gather(packed: torch.Tensor, info: GroupInfo, traffic: Traffic) -> torch.Tensor:
    """[P, len] of every rank's buffer, in rank order: an all-gather posted as one batch of
    point-to-point sends and receives with every other rank (gloo's own all-gather passes the
    buffers around a ring, P - 1 hops one after another: measured 4.0-4.4 ms for a decode
    buffer on 4 ranks sharing 2 cores, against 1.1 ms for the direct batch). The same bytes
    either way: the buffer to each other rank."""
    packed = packed.contiguous()
    parts = torch.empty((info.world,) + tuple(packed.shape), dtype=packed.dtype,
                        device=packed.device)
    parts[info.rank] = packed
    if info.world == 1:
        return parts
    ops = []
    for p in range(info.world):
        if p != info.rank:
            peer = info.global_rank(p)
            ops.append(dist.P2POp(dist.isend, packed, peer, group=info.group))
            ops.append(dist.P2POp(dist.irecv, parts[p], peer, group=info.group))
    works = dist.batch_isend_irecv(ops)
    size = packed.numel() * packed.element_size()
    traffic.add_collective(info, [size] * info.world, [size] * info.world)
    traffic.wait(lambda: [work.wait() for work in works])
    return parts


def headers(parts: torch.Tensor, values: int) -> list[list[int]]:
    """Every rank's header values from the gathered buffers [P, len]."""
    width = header_width(values, parts.dtype)
    return parts[:, :width].contiguous().view(torch.int64).tolist()


def merged(parts: torch.Tensor, values: int, shape: tuple[int, int, int, int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (o [B, T, Hq, D], lse [B, Hq, T]): the gathered partials merged in rank order
    (the same order on every rank, so the same bits on every rank)."""
    b, t, hq, d = shape
    body = parts[:, header_width(values, parts.dtype):].reshape(parts.shape[0], b, t, hq, d + 1)
    o, lse = body[0, ..., :-1], body[0, ..., -1].transpose(1, 2)
    for part in body[1:]:
        o, lse = merge(o, lse, part[..., :-1], part[..., -1].transpose(1, 2))
    return o, lse


def merge_across_ranks(o: torch.Tensor, lse: torch.Tensor, info: GroupInfo, traffic: Traffic
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (o [B, T, Hq, D], lse [B, Hq, T]) over every rank's shard, on every rank
    (no header: one all-gather of the packed partials)."""
    if info.world == 1:
        return o, lse
    shape = tuple(o.shape)
    return merged(gather(pack([], o, lse, shape, o.dtype, o.device), info, traffic), 0, shape)


def apply_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one sink logit per head [Hq] into merged (o [B, T, Hq, D], lse [B, Hq, T])."""
    if sinks is None:
        return o, lse
    sink = sinks.to(lse.dtype).to(lse.device)[None, :, None].expand_as(lse)
    total = torch.logaddexp(lse, sink)
    # exp(-inf - total) = 0 for a row that saw no key: o stays 0, its lse becomes the sink.
    return o * torch.exp(lse - total).transpose(1, 2).unsqueeze(-1).to(o.dtype), total
