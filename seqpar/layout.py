"""Sharding plans: which global tokens each rank of a sequence-parallel group holds.

For a global sequence of S tokens over P ranks (rank r):

* contiguous — chunk r of P equal chunks: tokens [r*S/P, (r+1)*S/P).          S % P == 0
* zigzag     — chunks r and 2P-1-r of 2P equal chunks (C = S/2P tokens each),
               so causal work is the same on every rank.                       S % 2P == 0
* striped    — token t lives on rank t mod P (stride-P run starting at r).     S % P == 0
* balanced   — 4 of 4P equal chunks, dealt by their causal work under the documents
               (`cu_seqlens`, required): even work for packed documents (`balanced.py`).
                                                                               S % 4P == 0

A local tensor holds its tokens in increasing global order. `shard` cuts the full tensor the
same way on every rank, `gather` reassembles it (an all-gather plus the inverse permutation;
its gradient is this rank's slice of the incoming one, as when every rank computes the same
loss of the gathered tensor), `positions` gives the global token ids (e.g. for RoPE).
Every one of them, and `seqpar.attention`, takes the same `cu_seqlens` with layout="balanced".
"""

from __future__ import annotations

import torch

from .balanced import CHUNKS_PER_RANK, balanced_runs
from .comm.primitives import GroupInfo, agree, all_gather_along, resolve_group
from .documents import check_cu_seqlens, cu_seqlens_agreement
from .kernels.mask import Run, Runs, runs_to_positions

# The layouts fixed by S and P alone (the public `seqpar.LAYOUTS`), and the one placed by the
# documents' work, which needs cu_seqlens wherever a layout is named.
LAYOUTS = ("contiguous", "zigzag", "striped")
BALANCED = "balanced"
ALL_LAYOUTS = LAYOUTS + (BALANCED,)
_MAX_DIMS = 8


def check_layout(layout: str, where: str) -> None:
    if layout not in ALL_LAYOUTS:
        raise ValueError(f"{where}: unknown layout={layout!r}; choose one of {ALL_LAYOUTS}")


def chunks_per_rank(layout: str) -> int:
    """How many equal pieces of the sequence a rank's tokens fall into (the divisibility unit)."""
    return {"zigzag": 2, BALANCED: CHUNKS_PER_RANK}.get(layout, 1)


def balanced_needs_documents() -> str:
    return ("layout='balanced' deals chunks to ranks by the documents' work, so it needs "
            "cu_seqlens= (the global document boundaries), the same in seqpar.shard, "
            "seqpar.gather, seqpar.positions and seqpar.attention")


def layout_documents(layout: str, cu_seqlens, seq_len: int, where: str
                     ) -> tuple[tuple[int, ...] | None, Exception | None]:
    """(the document boundaries the layout places tokens by, or None; the error, or None):
    layout='balanced' needs well-formed cu_seqlens, the other layouts ignore them (checked
    when given)."""
    prefix = f"{where}: " if where else ""  # none where `agree` adds it
    if cu_seqlens is None:
        return None, (ValueError(f"{prefix}{balanced_needs_documents()}") if layout == BALANCED
                      else None)
    problem = check_cu_seqlens(cu_seqlens, seq_len, batch=1)
    if problem:
        return None, type(problem)(f"{prefix}{problem}")
    return (tuple(cu_seqlens.tolist()) if layout == BALANCED else None), None


def seq_len_error(seq_len: int, world: int, layout: str) -> str | None:
    """Why `seq_len` cannot be sharded over `world` ranks with `layout`, or None."""
    unit = chunks_per_rank(layout) * world
    if seq_len % unit == 0:
        return None
    padded = (seq_len + unit - 1) // unit * unit
    return (f"sequence length {seq_len} is not divisible by {unit} "
            f"({'2 x ' if unit != world else ''}{world} ranks) as layout={layout!r} requires; "
            f"pad the sequence to {padded}" + (" or use layout='contiguous'" if layout == "zigzag" else ""))


def local_runs(seq_len: int, world: int, rank: int, layout: str,
               documents: tuple[int, ...] | None = None) -> Runs:
    """The global positions held by `rank`, as arithmetic runs in local order (`documents`:
    the global document boundaries, used by layout='balanced' only, which needs them)."""
    check_layout(layout, "local_runs")
    problem = seq_len_error(seq_len, world, layout)
    if problem:
        raise ValueError(f"local_runs: {problem}")
    if layout == BALANCED:
        if documents is None:
            raise ValueError(f"local_runs: {balanced_needs_documents()}")
        return balanced_runs(seq_len, world, tuple(documents))[rank]
    if layout == "contiguous":
        size = seq_len // world
        return (Run(rank * size, size),)
    if layout == "zigzag":
        chunk = seq_len // (2 * world)
        return (Run(rank * chunk, chunk), Run((2 * world - 1 - rank) * chunk, chunk))
    return (Run(rank, seq_len // world, world),)


def all_local_runs(seq_len: int, world: int, layout: str,
                   documents: tuple[int, ...] | None = None) -> tuple[Runs, ...]:
    """`local_runs` of every rank, indexed by rank in the group."""
    return tuple(local_runs(seq_len, world, r, layout, documents) for r in range(world))


def _positions(seq_len: int, info: GroupInfo, layout: str, device=None,
               documents: tuple[int, ...] | None = None) -> torch.Tensor:
    return runs_to_positions(local_runs(seq_len, info.world, info.rank, layout, documents),
                             device=device)


def positions(seq_len: int, group=None, layout: str = "zigzag", device=None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Global token ids (int64, increasing) of the tokens this rank holds; with `cu_seqlens`
    (global document boundaries, as `seqpar.attention` takes them) each id counts from the
    start of its document instead: the RoPE positions of packed documents (layout='balanced'
    needs them: they also say which tokens this rank holds)."""
    check_layout(layout, "seqpar.positions")
    info = resolve_group(group)
    problem = seq_len_error(seq_len, info.world, layout)
    if problem:
        raise ValueError(f"seqpar.positions: {problem}")
    documents, problem = layout_documents(layout, cu_seqlens, seq_len, "seqpar.positions")
    if problem:
        raise problem
    pos = _positions(seq_len, info, layout, device, documents)
    if cu_seqlens is None:
        return pos
    bounds = cu_seqlens.to(pos.device, torch.int64)
    doc = torch.searchsorted(bounds, pos, right=True) - 1
    return pos - bounds[doc]


def _check_dim(x: torch.Tensor, dim: int, where: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where}: dim={dim} is out of range for a tensor of shape "
                         f"{tuple(x.shape)}; pass the index of the sequence dimension")
    return dim % x.dim()


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag",
          cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's tokens of the full tensor `x` (every rank passes the same full `x`).
    cu_seqlens: the global document boundaries; layout='balanced' needs them (the others
    ignore them).

    Returns a new contiguous tensor; autograd flows back into `x`.
    """
    check_layout(layout, "seqpar.shard")
    dim = _check_dim(x, dim, "seqpar.shard")
    info = resolve_group(group)
    problem = seq_len_error(x.shape[dim], info.world, layout)
    if problem:
        raise ValueError(f"seqpar.shard: x.shape[{dim}]: {problem}")
    documents, problem = layout_documents(layout, cu_seqlens, x.shape[dim], "seqpar.shard")
    if problem:
        raise problem
    if layout == "contiguous":
        size = x.shape[dim] // info.world
        return x.narrow(dim, info.rank * size, size).contiguous()
    return x.index_select(dim, _positions(x.shape[dim], info, layout, x.device, documents))


class _Gather(torch.autograd.Function):
    """All-gather along `dim` + un-permute; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x_local, info: GroupInfo, dim: int, layout: str, documents):
        gathered = all_gather_along(x_local, info, dim, op="gather")
        seq_len = gathered.shape[dim]
        order = torch.cat([_positions(seq_len, GroupInfo(info.group, r, info.world), layout,
                                      documents=documents) for r in range(info.world)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(seq_len)
        ctx.local_positions = _positions(seq_len, info, layout, x_local.device, documents)
        ctx.dim = dim
        return gathered.index_select(dim, inverse.to(x_local.device))

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full.index_select(ctx.dim, ctx.local_positions), None, None, None, None


def gather(x_local: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag",
           cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Reassemble the full tensor from every rank's shard (collective; same local shape
    everywhere, checked). The gradient of the result is this rank's slice of the incoming one.
    cu_seqlens: as in `shard` (layout='balanced' needs the same ones)."""
    check_layout(layout, "seqpar.gather")
    dim = _check_dim(x_local, dim, "seqpar.gather")
    info = resolve_group(group)
    local_error = None
    if layout == "zigzag" and x_local.shape[dim] % 2:
        local_error = ValueError(f"x_local.shape[{dim}]={x_local.shape[dim]} is odd, but a zigzag "
                                 f"shard holds two equal chunks; pass the tensor "
                                 f"seqpar.shard(..., layout='zigzag') made")
    if x_local.dim() > _MAX_DIMS:
        local_error = ValueError(f"x_local has {x_local.dim()} dimensions; at most {_MAX_DIMS} "
                                 f"are supported")
    documents, problem = layout_documents(layout, cu_seqlens, x_local.shape[dim] * info.world,
                                          where="")
    local_error = local_error or problem
    # Fixed keys on every rank (the agreement is one all-reduce of equal-length vectors).
    shape = {f"x_local.shape[{i}]": x_local.shape[i] if i < x_local.dim() else -1
             for i in range(_MAX_DIMS)}
    agree(info, "seqpar.gather", {"x_local.dim()": x_local.dim(), "dim": dim,
                                  "layout": ALL_LAYOUTS.index(layout), **shape,
                                  **cu_seqlens_agreement(cu_seqlens, local_error is None)},
          local_error, x_local.device)
    return _Gather.apply(x_local, info, dim, layout, documents)


__all__ = ["LAYOUTS", "ALL_LAYOUTS", "BALANCED", "layout_documents", "local_runs", "all_local_runs", "positions", "shard", "gather",
           "seq_len_error", "chunks_per_rank", "check_layout"]
