"""Running a masked plan on the CPU fused op in few, batched calls, with triangles cut down.

Why (measured on one thread, fp32, H = 8, D = 64; units = time per pair of a FULL 512 x 4096
block): the fused CPU op (`_scaled_dot_product_flash_attention_for_cpu`) runs FULL blocks at
~1 unit per pair at every size from 64 x 64 up, alone or stacked in the batch dimension, but a
causal n x n block costs ~3.0 / 1.7 units per *visible* pair (forward / backward) at n = 512 and
1.7 / 1.4 at n = 1024: each of its query tiles computes whole key splits of up to 512 keys, so a
triangle of up to 512 rows costs its whole square. And every call, plus the merge of its partial
result, costs ~0.1-0.2 ms of fixed overhead: a windowed or packed-document plan is hundreds of
sub-blocks of a few hundred rows, so those overheads were a large share of its time.

So, for the sub-blocks the fused op runs:

1. **Triangles are cut** (`_cut_triangle`). A lower triangle n x n (causal: keys j <= i) of
   BASE < n <= SPLIT_MAX rows is

        lower h x h (rows [0, h), keys [0, h))
      + FULL (n - h) x h (rows [h, n), keys [0, h))
      + lower (n - h) x (n - h) (rows [h, n), keys [h, n)),

   recursively until the triangles have at most BASE rows (h: half of n, rounded up to a
   multiple of BASE, so power-of-two tiles cut into power-of-two squares that batch together).
   Of a 512-row triangle only the 4 diagonal 128-row triangles (1/8 of its pairs) still cost
   their square. An upper triangle (a reversed-causal block, a window's lower edge: keys
   j >= i) is cut the same way with the FULL block h x (n - h) above the diagonal; its small
   triangles run with an additive mask (the op has no upper-causal mode; measured as fast as
   its causal mode at these sizes). A causal block with more rows than keys is its square
   triangle plus a FULL block.
2. **Same-shaped pieces run as one call**, stacked in the batch dimension [N, rows, H, D] (at
   most `BATCH_ELEMENTS` elements per call). With batch size 1 each call takes pieces that start
   at evenly spaced rows and keys (a window's tiles; the tiles of one document) as a strided
   view of q, k, v -- gathering them instead (`index_select`) cost ~8% of a packed-document
   plan's time, more than the extra calls; with B > 1 they are gathered.
3. **Forward partials are merged in one pass** (`_merge_partials`): query row r with the running
   (o_0, l_0) and partials (o_i, l_i) gets

        m = max_i l_i,   w_i = exp(l_i - m),   lse = m + log sum_i w_i,
        o = sum_i w_i o_i / sum_i w_i

   (rows with only -inf partials stay o = 0, lse = -inf), with `scatter_reduce`/`index_add`
   over the gathered row indices -- a row may receive several partials of one plan.
   **Backward**: each batch's (dq, dk, dv) are `index_add`ed into the accumulators.

Sub-blocks the fused op cannot run (soft caps, POSITIONS, general BANDs with an additive
mask, dtypes it lacks) keep the per-sub-block path of `torch_cpu.TorchBlockKernel`.
Big triangles (> SPLIT_MAX rows, the dense diagonal blocks) stay one causal call: the op
wastes at most one key split per row there (causal 4096: ~1.0 unit per visible pair).

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], o like q, lse [B, Hq, Sq].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mask import MaskKind, SubBlock

BASE = 128  # rows of the smallest triangle: below it, cutting costs more calls than it saves
SPLIT_MAX = 2048  # triangles above this many rows stay one call (the op's waste is small)
# Per batched call at most this many q + k + v elements, and at most this many forward partial
# elements held before they are merged (16 MiB each in fp32): at 64 MiB the masked benchmark's
# peak rose by ~170 MiB per rank (window, S = 64K) for no measurable speed.
BATCH_ELEMENTS = 1 << 22
PENDING_ELEMENTS = 1 << 22
MERGE_AT_ONCE = 1 << 20  # a lone piece's output this large is merged at once (overhead small)

FULL, LOWER, UPPER = "full", "lower", "upper"  # piece kinds: all keys, keys j <= i, keys j >= i


@dataclass(frozen=True)
class Piece:
    """Local rows [q_start, q_start + rows) against keys [k_start, k_start + keys): FULL,
    LOWER (top-left causal, keys j <= i) or UPPER (keys j >= i; square)."""

    q_start: int
    rows: int
    k_start: int
    keys: int
    kind: str

    @property
    def shape(self) -> tuple[int, int, str]:
        return self.rows, self.keys, self.kind


def _split_point(n: int, base: int) -> int:
    """Rows of the first triangle when cutting an n-row triangle: n / 2 rounded up to a
    multiple of `base` (so 2^k-row triangles cut into 2^(k-1) squares), below n."""
    half = -(-n // 2)
    h = -(-half // base) * base
    return h if h < n else half


def _cut_triangle(q_start: int, k_start: int, n: int, kind: str, base: int,
                  out: list[Piece]) -> None:
    """Append the pieces of an n x n LOWER or UPPER triangle."""
    if n <= base:
        out.append(Piece(q_start, n, k_start, n, kind))
        return
    h = _split_point(n, base)
    _cut_triangle(q_start, k_start, h, kind, base, out)
    if kind == LOWER:
        out.append(Piece(q_start + h, n - h, k_start, h, FULL))
    else:
        out.append(Piece(q_start, h, k_start + h, n - h, FULL))
    _cut_triangle(q_start + h, k_start + h, n - h, kind, base, out)


def pieces_of(block: SubBlock) -> list[Piece] | None:
    """The pieces a FULL, CAUSAL or reversed-causal sub-block runs as; None for other kinds and
    for triangles over SPLIT_MAX rows (they keep one call of their own)."""
    n, m = block.q1 - block.q0, block.k1 - block.k0
    side = min(n, m)
    if block.kind is MaskKind.FULL:
        return [Piece(block.q0, n, block.k0, m, FULL)]
    if side > SPLIT_MAX:
        return None
    if block.kind is MaskKind.CAUSAL:
        # keys j <= i: rows [m, n) see every key; keys [n, m) no row sees.
        out = [] if n <= side else [Piece(block.q0 + side, n - side, block.k0, m, FULL)]
        _cut_triangle(block.q0, block.k0, side, LOWER, BASE, out)
        return out
    if block.is_reversed_causal:
        # keys j >= i + m - n: with n > m rows [0, n - m) see every key; with m > n keys
        # [0, m - n) no row sees. The rest is an upper triangle ending at the last row and key.
        out = [] if n <= side else [Piece(block.q0, n - side, block.k0, m, FULL)]
        _cut_triangle(block.q1 - side, block.k1 - side, side, UPPER, BASE, out)
        return out
    return None


def splits(block: SubBlock) -> bool:
    """Does this sub-block run as anything but its own single call?"""
    pieces = pieces_of(block)
    return pieces is not None and (len(pieces) > 1 or pieces[0].kind == UPPER)


@dataclass
class Batch:
    """Same-shaped pieces run as one call: per piece its first row / key, and local row / key
    indices [N * rows], [N * keys]; evenly_spaced: the first rows and the first keys each
    advance by one non-negative step (an `_even_runs` run)."""

    count: int
    rows: int
    keys: int
    kind: str
    row_starts: list[int]
    key_starts: list[int]
    evenly_spaced: bool
    row_index: torch.Tensor
    key_index: torch.Tensor

    def span(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(row range, key range) of a one-piece batch, else None."""
        if self.count != 1:
            return None
        return ((self.row_starts[0], self.row_starts[0] + self.rows),
                (self.key_starts[0], self.key_starts[0] + self.keys))


def _even_runs(members: list[Piece]) -> list[list[Piece]]:
    """Pieces whose first rows and first keys are both evenly spaced, greedily, after sorting
    them by diagonal (k_start - q_start) and row: a window's tiles, or one document's, lie on
    one diagonal at even steps, while the plan lists the two edges' pieces interleaved."""
    runs: list[list[Piece]] = []
    for piece in sorted(members, key=lambda p: (p.k_start - p.q_start, p.q_start)):
        run = runs[-1] if runs else None
        if run and (len(run) == 1 or (
                piece.q_start - run[-1].q_start == run[1].q_start - run[0].q_start
                and piece.k_start - run[-1].k_start == run[1].k_start - run[0].k_start)) and (
                piece.q_start >= run[-1].q_start and piece.k_start >= run[-1].k_start):
            run.append(piece)
        else:
            runs.append([piece])
    return runs


def batches(pieces: list[Piece], per_row_elements: int, per_key_elements: int, device,
            views: bool) -> list[Batch]:
    """Group pieces by shape and kind, at most `BATCH_ELEMENTS` gathered elements per batch.
    views: split the groups further into evenly spaced runs, so that every batch is a strided
    view of the inputs (no copy; a few more calls: one per run, e.g. per document)."""
    groups: dict[tuple[int, int, str], list[Piece]] = {}
    for piece in pieces:
        groups.setdefault(piece.shape, []).append(piece)
    out = []
    for (rows, keys, kind), members in groups.items():
        per_piece = rows * per_row_elements + keys * per_key_elements
        size = max(1, BATCH_ELEMENTS // max(per_piece, 1))
        for run in (_even_runs(members) if views else [members]):
            for first in range(0, len(run), size):
                chunk = run[first:first + size]
                row_starts = [p.q_start for p in chunk]
                key_starts = [p.k_start for p in chunk]
                row_index = (torch.tensor(row_starts, device=device)[:, None]
                             + torch.arange(rows, device=device)).reshape(-1)
                key_index = (torch.tensor(key_starts, device=device)[:, None]
                             + torch.arange(keys, device=device)).reshape(-1)
                out.append(Batch(len(chunk), rows, keys, kind, row_starts, key_starts, views,
                                 row_index, key_index))
    return out


def pick_tokens(x: torch.Tensor, batch: Batch, of_rows: bool) -> torch.Tensor:
    """[B, S, H, D] -> [B * N, n, H, D]: the rows (or keys) of each piece of `batch`; a slice
    for one piece, a strided view of evenly spaced pieces when B = 1, else copied."""
    starts, n, index = ((batch.row_starts, batch.rows, batch.row_index) if of_rows else
                        (batch.key_starts, batch.keys, batch.key_index))
    if batch.count == 1:
        return x[:, starts[0]:starts[0] + n]
    if batch.evenly_spaced and x.shape[0] == 1:
        step = starts[1] - starts[0]
        stride = x.stride()
        return x.as_strided((batch.count, n) + tuple(x.shape[2:]),
                            (step * stride[1],) + stride[1:],
                            x.storage_offset() + starts[0] * stride[1])
    return x.index_select(1, index).reshape(x.shape[0] * batch.count, n, *x.shape[2:])


def pick_row_stats(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, H, S] -> [B * N, H, rows] (lse, delta, dlse) of each piece's rows, contiguous."""
    span = batch.span()
    if span is not None:
        return x[:, :, span[0][0]:span[0][1]]
    b, h = x.shape[0], x.shape[1]
    picked = x.index_select(2, batch.row_index).reshape(b, h, batch.count, batch.rows)
    return picked.permute(0, 2, 1, 3).reshape(b * batch.count, h, batch.rows)


def unbatch_tokens(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B * N, n, H, D] -> [B, N * n, H, D] (rows in `row_index` order)."""
    return x.reshape(b, -1, *x.shape[2:])


def unbatch_row_stats(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B * N, H, n] -> [B, H, N * n]."""
    count_b, h, n = x.shape
    return x.reshape(b, count_b // b, h, n).permute(0, 2, 1, 3).reshape(b, h, -1)


def merge_partials(acc_o: torch.Tensor, acc_lse: torch.Tensor,
                   parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Merge partials (row_index [R], o [B, R, H, D], lse [B, H, R]) into the accumulators in
    place (rows may repeat). Only the span of rows the partials touch is read and written.
    The partials' o are overwritten (scaled in place)."""
    if not parts:
        return
    first = min(int(p[0].min()) for p in parts)
    last = max(int(p[0].max()) for p in parts) + 1
    parts = [(index - first, o, lse.to(acc_lse.dtype)) for index, o, lse in parts]
    span_o, span_lse = acc_o[:, first:last], acc_lse[:, :, first:last]
    top = span_lse.clone()
    for index, _, lse in parts:
        top.scatter_reduce_(2, index.expand_as(lse), lse, "amax")
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # all -inf rows: weights 0
    total = torch.exp(span_lse - top)
    span_o.mul_(total.transpose(1, 2).unsqueeze(-1).to(span_o.dtype))
    for index, o, lse in parts:
        weight = torch.exp(lse - top.index_select(2, index))
        total.index_add_(2, index, weight)
        row_weight = weight.transpose(1, 2).unsqueeze(-1)
        # The partials are the kernel's fresh outputs: scaled in place (no new buffer to fault in).
        scaled = o.mul_(row_weight) if o.dtype == span_o.dtype else o.to(span_o.dtype) * row_weight
        span_o.index_add_(1, index, scaled)
    seen = total > 0
    inverse = torch.where(seen, 1.0 / torch.where(seen, total, torch.ones_like(total)),
                          torch.zeros_like(total))
    span_o.mul_(inverse.transpose(1, 2).unsqueeze(-1).to(span_o.dtype))
    span_lse.copy_(top + torch.log(total))
