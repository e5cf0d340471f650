"""The masks of the Triton flash kernels (kernels/flash.py): `MaskSpec` on the host and the
`triton.jit` helpers that turn it into tile ranges and per-pair visibility inside a program.

    visible(i, j) = (kp_j <= qp_i          when causal)       (kp, qp: positions of the block)
                and (|qp_i - kp_j| < W     with a window W)
                and (same document         with documents: c[d] <= qp_i, kp_j < c[d + 1])
    s_ij <- c tanh(s_ij / c)               with a soft cap c; in base 2 (the kernels' unit)
                                           c tanh(s / c) log2(e) = c2 tanh(s2 / c2), c2 = c log2(e)

Documents are the boundaries `cu_seqlens` (in the positions' coordinates): a program finds the
span [c[d], c[d + 1]) of each of its own rows (forward, dQ) or keys (dK/dV) once, by binary
search, and a pair is in one document iff the other side's position lies in that span -- no
per-token document ids are stored or loaded.

Work the mask removes is not done (ARITHMETIC positions; EXPLICIT visits every tile): a tile
visits only the tiles of the other side between its first and last possibly visible position --
causality, the window (W - 1 either side) and the span of its documents each bound that range,
counted in indices so nothing overflows. Inside the range, a tile with no visible pair remains
only where the band has holes (several documents in one tile, or W below the positions' step).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Windows wider than this are clipped (they are then no constraint at all): positions are int64
# and the kernels add W to positions without overflow.
_WINDOW_CLIP = 1 << 62


class MaskMode(enum.IntEnum):
    FULL = 0
    ARITHMETIC = 1
    EXPLICIT = 2


@dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs of one block are visible.

    mode:       FULL (every pair; no positions, so no causal / window / documents),
                ARITHMETIC (qp_i = q_start + i * q_step, kp_j = k_start + j * k_step, steps >= 1)
                or EXPLICIT (q_pos [n_q], k_pos [n_k] int tensors).
    causal:     kp_j <= qp_i applies (positions modes only).
    window:     None or W >= 1: |qp_i - kp_j| < W (with causal: qp_i - W < kp_j <= qp_i).
    cu_seqlens: None or the document boundaries [n_docs + 1] (int, increasing, in the SAME
                coordinates as the positions: give global positions (q_start / k_start of the
                block's first tokens), or shift cu_seqlens by the block's origin): a pair is
                visible only inside one document. A position outside [c[0], c[-1]) sees nothing.
                Validated (0 = c[0] < ... < c[-1] = S) at the API edge, not here; pass it on the
                kernel's device as int64 to spare a copy per call.
    """

    mode: MaskMode
    q_start: int = 0
    q_step: int = 1
    k_start: int = 0
    k_step: int = 1
    q_pos: torch.Tensor | None = None  # int64 [n_q] (EXPLICIT)
    k_pos: torch.Tensor | None = None  # int64 [n_k] (EXPLICIT)
    causal: bool = True
    window: int | None = None
    cu_seqlens: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "mode", MaskMode(self.mode))  # a plain 0 / 1 / 2 works too
        if self.mode is MaskMode.FULL and (self.window is not None or self.cu_seqlens is not None):
            raise ValueError("MaskSpec: a window or documents need positions; use mode ARITHMETIC "
                             "or EXPLICIT instead of FULL")
        if self.mode is MaskMode.ARITHMETIC and (self.q_step < 1 or self.k_step < 1):
            raise ValueError(f"MaskSpec: q_step={self.q_step}, k_step={self.k_step}; arithmetic "
                             "positions need steps >= 1 (use EXPLICIT positions otherwise)")
        if self.mode is MaskMode.EXPLICIT and (self.q_pos is None or self.k_pos is None):
            raise ValueError("MaskSpec: mode EXPLICIT needs both q_pos and k_pos")
        if self.window is not None:
            if (isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral)
                    or self.window < 1):
                raise ValueError(f"MaskSpec: window={self.window!r}; pass an int >= 1 or None")
            object.__setattr__(self, "window", int(self.window))
        cu = self.cu_seqlens
        if cu is not None and (not isinstance(cu, torch.Tensor) or cu.dim() != 1
                               or cu.numel() < 2 or cu.is_floating_point() or cu.is_complex()):
            raise ValueError("MaskSpec: cu_seqlens must be a 1-D integer tensor of document "
                             f"boundaries [n_docs + 1] (at least 2 entries), got "
                             f"{getattr(cu, 'dtype', type(cu))} of shape {tuple(getattr(cu, 'shape', ()))}")


FULL = MaskSpec(MaskMode.FULL)
TOP_LEFT_CAUSAL = MaskSpec(MaskMode.ARITHMETIC)


@triton.jit
def positions(start, step, offs, POS, ok, MASK_MODE: tl.constexpr):
    if MASK_MODE == 2:
        return tl.load(POS + offs, mask=ok, other=-1)
    return start + offs.to(tl.int64) * step


@triton.jit
def count_at_most(pos, start, step, n):
    """How many of the n arithmetic positions start, start + step, ... (step >= 1) are <= pos."""
    reach = (pos - start) // step + 1
    reach = tl.where(pos < start, 0, reach)  # `//` truncates: never divide a negative
    return tl.minimum(reach, n)


@triton.jit
def document_spans(pos, ok, CU, n_docs, doc_bits, doc_top):
    """[lo, hi) = [c[d], c[d + 1]): the document holding each position (binary search over the
    boundaries CU[0..n_docs] for the last c[d] <= pos); [pos, pos) -- nothing -- outside them."""
    d = tl.zeros_like(pos)
    for it in range(doc_bits):  # probes doc_top, doc_top / 2, ..., 1 ahead
        probe = d + (doc_top >> it)
        inside = ok & (probe < n_docs)
        bound = tl.load(CU + probe, mask=inside, other=0)
        d = tl.where(inside & (bound <= pos), probe, d)
    lo = tl.load(CU + d, mask=ok, other=0)
    hi = tl.load(CU + d + 1, mask=ok, other=0)
    member = (lo <= pos) & (pos < hi)
    return tl.where(member, lo, pos), tl.where(member, hi, pos)


@triton.jit
def tile_range(pos_first, pos_last, span_lo, span_hi, ok, start, step, n, window,
                OTHER_IS_KEYS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                DOCS: tl.constexpr, BLOCK: tl.constexpr):
    """[first, last): the tiles of BLOCK along the other side (arithmetic positions start +
    i * step, i < n) that can hold a visible entry for this tile (increasing positions
    pos_first..pos_last; document spans span_lo/span_hi where ok). Bounds are counted in
    indices, [first, last), so no position arithmetic can overflow."""
    first = tl.full([], 0, tl.int64)
    last = first + n
    if CAUSAL:
        if OTHER_IS_KEYS:  # no key after the last query
            last = tl.minimum(last, count_at_most(pos_last, start, step, n))
        else:  # no query before the first key
            first = tl.maximum(first, count_at_most(pos_first - 1, start, step, n))
    if WINDOW:
        first = tl.maximum(first, count_at_most(pos_first - window, start, step, n))
        last = tl.minimum(last, count_at_most(pos_last + window - 1, start, step, n))
    if DOCS:
        # Fillers can only widen the range (a min over more values is lower, a max higher).
        doc_lo = tl.min(tl.where(ok, span_lo, tl.max(span_hi, 0)), 0)
        doc_hi = tl.max(tl.where(ok, span_hi, doc_lo), 0)
        first = tl.maximum(first, count_at_most(doc_lo - 1, start, step, n))
        last = tl.minimum(last, count_at_most(doc_hi - 1, start, step, n))
    first_tile = first // BLOCK
    return first_tile, tl.where(last > first, tl.cdiv(last, BLOCK), first_tile)


@triton.jit
def visible_pairs(q_pos, k_pos, row_ok, col_ok, span_lo, span_hi, window,
             MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             DOCS: tl.constexpr, SPANS_OF_ROWS: tl.constexpr):
    """[rows, keys] visibility. Document spans belong to the rows (forward, dQ: a key must lie
    in its row's document) or to the keys (dK/dV: the row must lie in the key's document)."""
    visible = row_ok[:, None] & col_ok[None, :]
    if MASK_MODE != 0:
        ahead = q_pos[:, None] - k_pos[None, :]
        if CAUSAL:
            visible = visible & (ahead >= 0)
        if WINDOW:
            visible = visible & (ahead < window) & (ahead > -window)
        if DOCS:
            if SPANS_OF_ROWS:
                visible = visible & (k_pos[None, :] >= span_lo[:, None]) & (k_pos[None, :] < span_hi[:, None])
            else:
                visible = visible & (q_pos[:, None] >= span_lo[None, :]) & (q_pos[:, None] < span_hi[None, :])
    return visible


@triton.jit
def capped_scores(q, k, scale_log2, cap_log2, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of a tile, soft-capped, and t = tanh(s / c) (the backward's 1 - t^2;
    without a cap t is the scores themselves, unused)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    t = s
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 with no inf / inf; exp(2x) =
        # exp2(2 log2(e) x), x = s2 / c2.
        t = 1.0 - 2.0 / (tl.exp2(s * (2.8853900817779268 / cap_log2)) + 1.0)
        s = cap_log2 * t
    return s, t


@triton.jit
def row_masking(rows, row_ok, QPOS, CU, q_start, q_step, n_docs, doc_bits, doc_top,
                 MASK_MODE: tl.constexpr, DOCS: tl.constexpr):
    """Positions of a query tile and, with documents, each row's document span."""
    q_pos = positions(q_start, q_step, rows, QPOS, row_ok, MASK_MODE)
    span_lo = q_pos
    span_hi = q_pos
    if DOCS:
        span_lo, span_hi = document_spans(q_pos, row_ok, CU, n_docs, doc_bits, doc_top)
    return q_pos, span_lo, span_hi


def mask_args(mask: MaskSpec, softcap: float | None, device):
    """(QPOS, KPOS, CU) tensors, the runtime scalars after the scales (cap_log2 ... doc_top) and
    the mask constexprs, for any kernel."""
    if softcap is not None and not (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap!r}; pass a finite number > 0 or None")
    dummy = torch.empty(1, dtype=torch.int64, device=device)
    as_index = lambda t: t.to(device=device, dtype=torch.int64).contiguous() if t is not None else dummy
    positions = mask.mode is not MaskMode.FULL
    docs = mask.cu_seqlens is not None
    n_docs = mask.cu_seqlens.numel() - 1 if docs else 1
    doc_bits = (n_docs - 1).bit_length()  # binary-search steps: 2^bits >= n_docs
    window = min(mask.window, _WINDOW_CLIP) if mask.window is not None else 1
    scalars = (float(softcap) * LOG2E if softcap is not None else 1.0,
               mask.q_start, mask.q_step, mask.k_start, mask.k_step,
               window, n_docs, doc_bits, 1 << (doc_bits - 1) if doc_bits else 0)
    flags = dict(MASK_MODE=int(mask.mode), CAUSAL=positions and mask.causal,
                 WINDOW=mask.window is not None, DOCS=docs, SOFTCAP=softcap is not None)
    return (as_index(mask.q_pos), as_index(mask.k_pos), as_index(mask.cu_seqlens)), scalars, flags
