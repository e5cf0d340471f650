"""Causal masks between two blocks of tokens, decided by their *global* positions.

A sequence-parallel rank holds some of the tokens of the global sequence; which ones is
described by `Run`s: arithmetic runs of global positions ``start, start + stride, ...``
laid out one after another in the local tensor. Every sharding layout is a short tuple of
runs (contiguous: one run; zigzag: two runs; striped: one run of stride P).

Key j (global position kp[j]) is visible to query i (global position qp[i]) iff
``kp[j] <= qp[i]`` when causal, always otherwise. `plan_blocks` turns that rule for a
(query runs, key runs) pair into a few dense sub-blocks a fused kernel can run directly:

* FULL      every key of the sub-block is visible to every query;
* CAUSAL    top-left aligned causal: local key j visible to local query i iff j <= i
            (the alignment of `_scaled_dot_product_flash_attention_for_cpu(is_causal=True)`);
* POSITIONS the general rule with explicit position vectors, for runs whose strides differ
            (only a chunked kernel can run it).

Query rows covered by no sub-block see no key (lse = -inf, o = 0). Sub-blocks of one plan
may overlap in query rows (their partial results are merged) but never in (row, key) pairs.

Derivation for two runs with the same stride s, query run (a, n), key run (b, m):
``b + s*j <= a + s*i  <=>  j <= i + c`` with ``c = floor((a - b) / s)``; then
c >= m - 1 is FULL, c <= -n is empty, c == 0 is CAUSAL, c > 0 splits into FULL keys
[0, c) plus CAUSAL keys [c, m), and c < 0 drops query rows [0, -c) and is CAUSAL on the rest;
causal key ranges stop at the last query's reach, key n - 1 + c.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Run:
    """Global positions start, start + stride, ..., start + (length - 1) * stride."""

    start: int
    length: int
    stride: int = 1

    @property
    def last(self) -> int:
        return self.start + (self.length - 1) * self.stride


Runs = tuple[Run, ...]


class MaskKind(enum.Enum):
    FULL = "full"
    CAUSAL = "causal"
    POSITIONS = "positions"


@dataclass(frozen=True)
class SubBlock:
    """Local query rows [q0, q1) against local keys [k0, k1) under `kind`.

    For POSITIONS, q_pos / k_pos hold the global positions of exactly those rows and keys.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: MaskKind
    q_pos: tuple[int, ...] | None = None
    k_pos: tuple[int, ...] | None = None

    @property
    def pairs(self) -> int:
        """Number of (query, key) products this sub-block really needs (its causal work)."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        if self.kind is MaskKind.FULL:
            return n * m
        if self.kind is MaskKind.CAUSAL:
            # row i sees min(i + 1, m) keys
            full_rows = max(0, n - m)
            tri = min(n, m)
            return tri * (tri + 1) // 2 + full_rows * m
        return sum(1 for qp in self.q_pos for kp in self.k_pos if kp <= qp)


def runs_length(runs: Runs) -> int:
    return sum(r.length for r in runs)


def runs_to_positions(runs: Runs, device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions of the local tokens, in local order, as an int64 tensor."""
    if not runs:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(r.start, r.last + 1, r.stride, dtype=torch.int64, device=device)
                      for r in runs])


def _is_increasing(runs: Runs) -> bool:
    previous = None
    for r in runs:
        if r.length > 1 and r.stride <= 0:
            return False
        if previous is not None and r.start <= previous:
            return False
        previous = r.last
    return True


def _pair_blocks(q: Run, q_off: int, k: Run, k_off: int) -> list[SubBlock]:
    """Sub-blocks of one causal (query run, key run) pair, in local coordinates."""
    n, m = q.length, k.length
    # A run of length 1 has no meaningful stride: borrow the other's.
    qs = q.stride if n > 1 else (k.stride if m > 1 else 1)
    ks = k.stride if m > 1 else qs
    if k.start > q.last:  # every key after every query
        return []
    if qs != ks or qs <= 0:
        rows = range(q.start, q.last + 1, q.stride) if n > 1 else (q.start,)
        cols = range(k.start, k.last + 1, k.stride) if m > 1 else (k.start,)
        return [SubBlock(q_off, q_off + n, k_off, k_off + m, MaskKind.POSITIONS,
                         tuple(rows), tuple(cols))]
    c = (q.start - k.start) // qs
    if c >= m - 1:
        return [SubBlock(q_off, q_off + n, k_off, k_off + m, MaskKind.FULL)]
    if c <= -n:
        return []
    # Keys past the last query's reach (local index n - 1 + c) are never visible: trim them,
    # so a causal query block only ever touches the key range it can see.
    reach = min(m, n + c)
    if c > 0:
        return [SubBlock(q_off, q_off + n, k_off, k_off + c, MaskKind.FULL),
                SubBlock(q_off, q_off + n, k_off + c, k_off + reach, MaskKind.CAUSAL)]
    if c == 0:
        return [SubBlock(q_off, q_off + n, k_off, k_off + reach, MaskKind.CAUSAL)]
    return [SubBlock(q_off - c, q_off + n, k_off, k_off + reach, MaskKind.CAUSAL)]


def _coalesce_full(blocks: list[SubBlock]) -> list[SubBlock]:
    """Fuse FULL sub-blocks that tile a larger rectangle, so the kernel runs fewer, bigger calls.

    First keys: same rows, adjacent key ranges. Then rows: same keys, adjacent row ranges.
    """
    def fuse(items: list[SubBlock], same, adjacent, join) -> list[SubBlock]:
        out: list[SubBlock] = []
        for b in items:
            for i, a in enumerate(out):
                if a.kind is MaskKind.FULL and b.kind is MaskKind.FULL and same(a, b) and adjacent(a, b):
                    out[i] = join(a, b)
                    break
            else:
                out.append(b)
        return out

    blocks = fuse(blocks, lambda a, b: (a.q0, a.q1) == (b.q0, b.q1), lambda a, b: a.k1 == b.k0,
                  lambda a, b: SubBlock(a.q0, a.q1, a.k0, b.k1, MaskKind.FULL))
    return fuse(blocks, lambda a, b: (a.k0, a.k1) == (b.k0, b.k1), lambda a, b: a.q1 == b.q0,
                lambda a, b: SubBlock(a.q0, b.q1, a.k0, a.k1, MaskKind.FULL))


def plan_blocks(q_runs: Runs, k_runs: Runs, causal: bool) -> tuple[SubBlock, ...]:
    """Dense sub-blocks computing attention of the local queries against a key block."""
    nq, nk = runs_length(q_runs), runs_length(k_runs)
    if nq == 0 or nk == 0:
        return ()
    if not causal:
        return (SubBlock(0, nq, 0, nk, MaskKind.FULL),)
    if q_runs == k_runs and _is_increasing(q_runs):
        # Same tokens in increasing order: position order is local order, one causal call.
        return (SubBlock(0, nq, 0, nk, MaskKind.CAUSAL),)
    blocks: list[SubBlock] = []
    q_off = 0
    for q in q_runs:
        k_off = 0
        for k in k_runs:
            blocks.extend(_pair_blocks(q, q_off, k, k_off))
            k_off += k.length
        q_off += q.length
    return tuple(_coalesce_full(blocks))


def causal_pairs(blocks: tuple[SubBlock, ...]) -> int:
    """Total (query, key) products of a plan: the work a balanced layout equalises."""
    return sum(b.pairs for b in blocks)


# ---------------------------------------------------------------- several ranks' tokens in one tensor

def _append(a: Run, b: Run) -> Run | None:
    """`a` followed by `b` as one run, or None when the positions do not continue a's stride."""
    step = b.start - a.last
    if step <= 0:
        return None
    if a.length == 1 and b.length == 1:
        return Run(a.start, 2, step)
    if a.length == 1 and step == b.stride:
        return Run(a.start, 1 + b.length, step)
    if b.length == 1 and step == a.stride:
        return Run(a.start, a.length + 1, a.stride)
    if a.length > 1 and b.length > 1 and a.stride == b.stride == step:
        return Run(a.start, a.length + b.length, step)
    return None


def gathered_runs(member_runs: tuple[Runs, ...], interleave: bool) -> Runs:
    """How the tokens of several ranks are laid out in one local tensor once gathered.

    The members' runs are sorted by start and adjacent ones merged, so a contiguous group
    becomes one run and a zigzag group two (or one, for the whole sequence): a causal kernel
    then runs a few large blocks. Striped runs interleave and cannot merge that way; with
    `interleave`, k equal runs of stride k starting at consecutive positions (a whole striped
    sequence) become one stride-1 run, i.e. global order. Without it they stay one run per
    rank, the order in which their stride matches the local queries' (no explicit mask).
    """
    merged: list[Run] = []
    for run in sorted((r for runs in member_runs for r in runs if r.length), key=lambda r: r.start):
        joined = _append(merged[-1], run) if merged else None
        if joined is None:
            merged.append(run)
        else:
            merged[-1] = joined
    k = len(merged)
    if (interleave and k > 1 and all(r.length == merged[0].length and r.stride == k for r in merged)
            and all(r.start == merged[0].start + i for i, r in enumerate(merged))):
        return (Run(merged[0].start, k * merged[0].length),)
    return tuple(merged)


def token_slots(member_runs: tuple[Runs, ...], gathered: Runs) -> torch.Tensor | None:
    """[members, tokens per member] int64: where member p's t-th token sits in the `gathered`
    order. None when that is rank-major (member p's tokens at [p * n, (p + 1) * n)), which needs
    no permutation at all."""
    order = runs_to_positions(gathered)
    slot_of = torch.empty(int(order.max()) + 1, dtype=torch.int64)
    slot_of[order] = torch.arange(order.numel())
    slots = torch.stack([slot_of[runs_to_positions(runs)] for runs in member_runs])
    if torch.equal(slots.flatten(), torch.arange(slots.numel())):
        return None
    return slots
