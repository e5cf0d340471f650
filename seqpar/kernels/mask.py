"""Masks between two blocks of tokens, decided by their *global* positions.

A sequence-parallel rank holds some of the tokens of the global sequence; which ones is
described by `Run`s: arithmetic runs of global positions ``start, start + stride, ...``
laid out one after another in the local tensor. Every sharding layout is a short tuple of
runs (contiguous: one run; zigzag: two runs; striped: one run of stride P).

The rule (`MaskRule`, DESIGN §4 "Masks"): key j (global position kp) is visible to query i
(global position qp) iff

    same_doc(qp, kp) and (not causal or kp <= qp) and (W is None or |qp - kp| < W)

`plan_blocks` turns that rule for a (query runs, key runs) pair into sub-blocks a fused kernel
can run directly; pairs of runs with no visible entry produce none at all (no work):

* FULL      every key of the sub-block is visible to every query;
* CAUSAL    top-left aligned causal: local key j visible to local query i iff j <= i
            (the alignment of `_scaled_dot_product_flash_attention_for_cpu(is_causal=True)`);
* BAND      local key j visible to local query i iff lo <= j - i <= hi (`SubBlock.lo/hi`,
            always finite): the partially visible diagonal bands a window (or a causal
            boundary) leaves; the kernel computes that element mask per chunk. A BAND with
            lo == keys - rows and hi >= keys - 1 is a top-left causal block with rows and keys
            reversed (`SubBlock.is_reversed_causal`): the fused op runs it on flipped inputs.
            In global terms a BAND is "query positions i, key positions j - hi, causal, window
            hi - lo + 1" -- the form a position-based kernel (Triton) takes;
* POSITIONS the general rule with explicit position vectors (`q_pos`, `k_pos`, `causal`,
            `window`), for runs whose strides differ (only a chunked kernel can run it).

Every sub-block also carries the soft cap of its scores (`softcap`, None: no cap), a property of
the kernel that runs it (the fused CPU op has none: capped blocks take the chunked path).

Documents never need an element mask: each run is first cut at the document boundaries
(`split_runs`), and only pieces of the same document are paired, so a sub-block never spans
two documents (documents may be of any length, cross shard boundaries anywhere; no padding).

Query rows covered by no sub-block see no key (lse = -inf, o = 0). Sub-blocks of one plan
may overlap in query rows (their partial results are merged) but never in (row, key) pairs.

Derivation for two runs with the same stride s, query run (a, n), key run (b, m), d = a - b:
qp - kp = d + s (i - j), so the rule is a diagonal band ``lo <= j - i <= hi`` with
    hi = floor(d / s)                     causal
    hi = ceil((W + d) / s) - 1            non-causal with a window (|qp - kp| < W)
    lo = floor((d - W) / s) + 1           with a window        (None: unbounded)
Without a window (lo = None) one tile holds every row: keys [0, hi) are FULL and keys
[hi, n + hi) CAUSAL (c = hi in the old notation: c >= m - 1 FULL, c <= -n empty). With both
bounds, rows are cut into tiles of T = w - 1 rows (w = hi - lo + 1 keys per row), so each tile
is a reversed-causal T x T block (the window's lower edge), a FULL block (empty when T = w - 1)
and a CAUSAL T x T block (the upper edge): the fused op does all of it and computes about one
product per visible pair. Masked plans (a window or documents) cap T at `EDGE_TILE` rows: the
fused op's small triangles are slow per pair, its FULL blocks are not. Dense plans keep one
causal call per pair (the cost model's calibrated kernel). Bands narrower than `MIN_TILE` keys
go to the chunked path as BAND tiles of `MIN_TILE` rows.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import functools
from dataclasses import dataclass

import torch

MIN_TILE = 64  # narrowest band the fused op is worth calling on; narrower: chunked BAND tiles
# Rows per tile of a masked plan's causal edges. The fused CPU op computes a FULL block at ~1
# unit per pair at any size >= 256, a causal n x n block at ~1.9 units (n = 256), 1.45
# (n = 1024), 1.15 (n = 8192) (fp32, D = 64, one thread). Measured per visible pair against a
# dense ring's blocks at S = 16384 (noise ~ +-0.05): windows of 1K / 2K cost 1.07-1.18x at tiles
# of 256, 512 or unbounded; packed documents (log-normal, median 1K) 1.32x at 512, 1.39x
# unbounded, 1.43x at 256. 512 rows: fewer calls and merges than 256, no slower.
EDGE_TILE = 512


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


@dataclass(frozen=True)
class MaskRule:
    """The mask of one attention call, in global positions (DESIGN §2 / §4 "Masks").

    documents: the global boundaries 0 = c_0 < c_1 < ... < c_n = S (cu_seqlens), or None;
    window: W >= 1 or None; softcap: c > 0 or None (not a visibility rule: it rides along on
    every sub-block for the kernel)."""

    causal: bool
    window: int | None = None
    documents: tuple[int, ...] | None = None
    softcap: float | None = None

    @property
    def masked(self) -> bool:
        """Does the rule hide more than the causal mask does (window or documents)?"""
        return self.window is not None or self.documents is not None

    def visible(self, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        """bool [len(qp), len(kp)]: the rule written out (tests, small shapes only)."""
        vis = torch.ones(len(qp), len(kp), dtype=torch.bool)
        if self.causal:
            vis &= kp[None, :] <= qp[:, None]
        if self.window is not None:
            vis &= (qp[:, None] - kp[None, :]).abs() < self.window
        if self.documents is not None:
            bounds = torch.tensor(self.documents, dtype=torch.int64)
            doc_q = torch.searchsorted(bounds, qp, right=True)
            doc_k = torch.searchsorted(bounds, kp, right=True)
            vis &= doc_q[:, None] == doc_k[None, :]
        return vis


def as_rule(mask: "bool | MaskRule") -> MaskRule:
    return mask if isinstance(mask, MaskRule) else MaskRule(causal=bool(mask))


class MaskKind(enum.Enum):
    FULL = "full"
    CAUSAL = "causal"
    BAND = "band"
    POSITIONS = "positions"


@dataclass(frozen=True)
class SubBlock:
    """Local query rows [q0, q1) against local keys [k0, k1) under `kind`.

    BAND: lo / hi, the band of j - i (sub-block-local indices) that is visible.
    POSITIONS: q_pos / k_pos hold the global positions of exactly those rows and keys, and the
    rule is `causal` and `window`.
    softcap: scores s become softcap * tanh(s / softcap) (any kind; None: no cap).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: MaskKind
    q_pos: tuple[int, ...] | None = None
    k_pos: tuple[int, ...] | None = None
    lo: int | None = None
    hi: int | None = None
    causal: bool = True
    window: int | None = None
    softcap: float | None = None

    @property
    def is_reversed_causal(self) -> bool:
        """A BAND that is top-left causal once rows and keys are both reversed."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return self.kind is MaskKind.BAND and self.lo == m - n and self.hi >= m - 1

    @property
    def pairs(self) -> int:
        """Number of visible (query, key) pairs of this sub-block (the work it really needs)."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        if self.kind is MaskKind.FULL:
            return n * m
        if self.kind is MaskKind.CAUSAL:
            # row i sees min(i + 1, m) keys
            full_rows = max(0, n - m)
            tri = min(n, m)
            return tri * (tri + 1) // 2 + full_rows * m
        if self.kind is MaskKind.BAND:
            rows = torch.arange(n, dtype=torch.int64)
            first = (rows + self.lo).clamp(min=0)
            last = (rows + self.hi).clamp(max=m - 1)
            return int((last - first + 1).clamp(min=0).sum())
        qp = torch.tensor(self.q_pos, dtype=torch.int64)
        kp = torch.tensor(self.k_pos, dtype=torch.int64)
        return int(MaskRule(self.causal, self.window).visible(qp, kp).sum())


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


# ---------------------------------------------------------------- documents

@dataclass(frozen=True)
class Piece:
    """The part of a local run inside one document: `run` at local offset `offset`."""

    run: Run
    offset: int
    doc: int


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def split_runs(runs: Runs, documents: tuple[int, ...] | None) -> list[Piece]:
    """Cut each run (in local order) at the document boundaries: one piece per (run, document)
    the run has tokens of. Without documents every run is one piece of document 0."""
    pieces: list[Piece] = []
    offset = 0
    for run in runs:
        if run.length == 0:
            continue
        if documents is None:
            pieces.append(Piece(run, offset, 0))
        else:
            stride = run.stride if run.length > 1 else 1
            doc = bisect.bisect_right(documents, run.start) - 1
            while doc < len(documents) - 1 and documents[doc] <= run.last:
                first = max(0, _ceil_div(documents[doc] - run.start, stride))
                end = min(run.length, _ceil_div(documents[doc + 1] - run.start, stride))
                if first < end:
                    pieces.append(Piece(Run(run.start + first * stride, end - first, stride),
                                        offset + first, doc))
                doc += 1
        offset += run.length
    return pieces


# ---------------------------------------------------------------- one pair of runs

def _band_part(r0: int, r1: int, k0: int, k1: int, n: int, m: int, lo: int | None,
               hi: int | None) -> list[SubBlock]:
    """Rows [r0, r1) x keys [k0, k1) of an n x m pair whose visible entries are
    lo <= j - i <= hi (None: unbounded), trimmed to the rows and keys that see something, as
    a FULL, CAUSAL or BAND sub-block (local coordinates of the pair); [] when none is visible."""
    r0, r1, k0, k1 = max(r0, 0), min(r1, n), max(k0, 0), min(k1, m)
    if hi is not None:
        r0 = max(r0, k0 - hi)  # row i sees keys <= i + hi
    if lo is not None:
        r1 = min(r1, k1 - lo)  # row i sees keys >= i + lo
    if lo is not None:
        k0 = max(k0, r0 + lo)
    if hi is not None:
        k1 = min(k1, r1 + hi)
    if r0 >= r1 or k0 >= k1:
        return []
    rows, keys = r1 - r0, k1 - k0
    # The band relative to the sub-block, clipped to its extent (clipping hides nothing).
    lo_local = -(rows - 1) if lo is None else max(lo - (k0 - r0), -(rows - 1))
    hi_local = keys - 1 if hi is None else min(hi - (k0 - r0), keys - 1)
    if lo_local == -(rows - 1) and hi_local == keys - 1:
        return [SubBlock(r0, r1, k0, k1, MaskKind.FULL)]
    if lo_local == -(rows - 1) and hi_local == 0:
        return [SubBlock(r0, r1, k0, k1, MaskKind.CAUSAL)]
    return [SubBlock(r0, r1, k0, k1, MaskKind.BAND, lo=lo_local, hi=hi_local)]


def _band_blocks(n: int, m: int, lo: int | None, hi: int | None, edge_tile: int | None = None
                 ) -> list[SubBlock]:
    """Sub-blocks (pair-local coordinates) of an n x m pair visible on lo <= j - i <= hi.
    edge_tile: rows per tile at most (None: a band with one open side is one tile)."""
    if lo is not None and lo <= -(n - 1):
        lo = None
    if hi is not None and hi >= m - 1:
        hi = None
    if lo is None and hi is None:
        return [SubBlock(0, n, 0, m, MaskKind.FULL)]
    if lo is not None and hi is not None and (lo > hi or hi < -(n - 1) or lo > m - 1):
        return []
    if lo is not None and hi is not None and hi - lo < MIN_TILE:
        # A narrow band: chunked BAND tiles, each over the keys its rows can reach.
        return [b for r0 in range(0, n, MIN_TILE)
                for b in _band_part(r0, r0 + MIN_TILE, r0 + lo, r0 + MIN_TILE + hi, n, m, lo, hi)]
    # Tiles of T rows: keys [r0 + lo, r1 + lo) reversed-causal, [r1 + lo, r0 + hi) FULL,
    # [r0 + hi, r1 + hi) CAUSAL (None bound: that side is all FULL, one tile holds every row).
    tile = n if lo is None or hi is None else hi - lo
    if edge_tile is not None:
        tile = min(tile, edge_tile)
    blocks: list[SubBlock] = []
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        full_from = 0 if lo is None else r1 + lo
        full_to = m if hi is None else r0 + hi
        if lo is not None:
            blocks += _band_part(r0, r1, r0 + lo, full_from, n, m, lo, hi)
        blocks += _band_part(r0, r1, full_from, full_to, n, m, lo, hi)
        if hi is not None:
            blocks += _band_part(r0, r1, full_to, r1 + hi, n, m, lo, hi)
    return blocks


def _pair_blocks(q: Run, q_off: int, k: Run, k_off: int, rule: MaskRule) -> list[SubBlock]:
    """Sub-blocks of one (query run, key run) pair (same document), in local coordinates."""
    n, m = q.length, k.length
    # A run of length 1 has no meaningful stride: borrow the other's.
    qs = q.stride if n > 1 else (k.stride if m > 1 else 1)
    ks = k.stride if m > 1 else qs
    window = rule.window
    q_first, q_last = min(q.start, q.last), max(q.start, q.last)
    k_first, k_last = min(k.start, k.last), max(k.start, k.last)
    if rule.causal and k_first > q_last:  # every key after every query
        return []
    if window is not None and (q_first - k_last >= window
                               or (not rule.causal and k_first - q_last >= window)):
        return []
    if qs != ks or qs <= 0:
        rows = range(q.start, q.last + 1, q.stride) if n > 1 else (q.start,)
        cols = range(k.start, k.last + 1, k.stride) if m > 1 else (k.start,)
        return [SubBlock(q_off, q_off + n, k_off, k_off + m, MaskKind.POSITIONS,
                         tuple(rows), tuple(cols), causal=rule.causal, window=window)]
    d = q.start - k.start
    hi = d // qs if rule.causal else (None if window is None else _ceil_div(window + d, qs) - 1)
    lo = None if window is None else (d - window) // qs + 1
    return [dataclasses.replace(b, q0=b.q0 + q_off, q1=b.q1 + q_off, k0=b.k0 + k_off,
                                k1=b.k1 + k_off)
            for b in _band_blocks(n, m, lo, hi, EDGE_TILE if rule.masked else None)]


def _coalesce_full(blocks: list[SubBlock]) -> list[SubBlock]:
    """Fuse FULL sub-blocks that tile a larger rectangle, so the kernel runs fewer, bigger calls.

    First keys: same rows, adjacent key ranges. Then rows: same keys, adjacent row ranges.
    Linear in the number of sub-blocks (a masked plan may hold thousands).
    """
    def fuse(items: list[SubBlock], along_keys: bool) -> list[SubBlock]:
        out: list[SubBlock | None] = []
        open_end: dict[tuple[int, int, int], int] = {}  # (other extent, end) -> index in out
        for b in items:
            if b.kind is not MaskKind.FULL:
                out.append(b)
                continue
            other, start, end = ((b.q0, b.q1), b.k0, b.k1) if along_keys else ((b.k0, b.k1), b.q0, b.q1)
            index = open_end.pop(other + (start,), None)
            if index is None:
                out.append(b)
                index = len(out) - 1
            else:
                a = out[index]
                out[index] = (SubBlock(a.q0, a.q1, a.k0, b.k1, MaskKind.FULL) if along_keys
                              else SubBlock(a.q0, b.q1, a.k0, a.k1, MaskKind.FULL))
            open_end[other + (end,)] = index
        return out

    if sum(b.kind is MaskKind.FULL for b in blocks) < 2:
        return blocks
    return fuse(fuse(blocks, along_keys=True), along_keys=False)


def plan_blocks(q_runs: Runs, k_runs: Runs, causal: "bool | MaskRule") -> tuple[SubBlock, ...]:
    """Sub-blocks computing attention of the local queries against a key block under `causal`:
    a `MaskRule`, or a bool (plain causal / non-causal attention)."""
    rule = as_rule(causal)
    nq, nk = runs_length(q_runs), runs_length(k_runs)
    if nq == 0 or nk == 0:
        return ()
    if not rule.masked and not rule.causal:
        blocks = [SubBlock(0, nq, 0, nk, MaskKind.FULL)]
    elif not rule.masked and q_runs == k_runs and _is_increasing(q_runs):
        # Same tokens in increasing order: position order is local order, one causal call.
        blocks = [SubBlock(0, nq, 0, nk, MaskKind.CAUSAL)]
    else:
        keys_of_doc: dict[int, list[Piece]] = {}
        for piece in split_runs(k_runs, rule.documents):
            keys_of_doc.setdefault(piece.doc, []).append(piece)
        blocks = [block for q in split_runs(q_runs, rule.documents)
                  for k in keys_of_doc.get(q.doc, ())
                  for block in _pair_blocks(q.run, q.offset, k.run, k.offset, rule)]
        blocks = _coalesce_full(blocks)
    if rule.softcap is not None:
        blocks = [dataclasses.replace(b, softcap=rule.softcap) for b in blocks]
    return tuple(blocks)


def causal_pairs(blocks: tuple[SubBlock, ...]) -> int:
    """Total visible (query, key) products of a plan: the work a balanced layout equalises."""
    return sum(b.pairs for b in blocks)


def visible_key_span(q_runs: Runs, k_runs: Runs, rule: MaskRule) -> list[tuple[int, int]]:
    """For each key run (local order), the local key range [first, end) holding every key some
    query of `q_runs` sees under `rule` (its hull; (0, 0) when none): what a rank must receive
    of that run. Computed from the plan, so it is exactly what the kernel reads."""
    spans, offset = [], 0
    blocks = plan_blocks(q_runs, k_runs, dataclasses.replace(rule, softcap=None))
    for run in k_runs:
        end = offset + run.length
        inside = [b for b in blocks if b.k0 < end and b.k1 > offset]  # FULL ones may straddle
        if inside:
            spans.append((max(min(b.k0 for b in inside), offset) - offset,
                          min(max(b.k1 for b in inside), end) - offset))
        else:
            spans.append((0, 0))
        offset += run.length
    return spans


@functools.lru_cache(maxsize=256)
def halo_runs(all_runs: tuple[Runs, ...], rank: int, rule: MaskRule) -> tuple[tuple[int, Run], ...]:
    """The keys of `rank` that some OTHER rank's queries see under `rule`: per key run of the
    rank, the hull of what every other rank sees of it (`visible_key_span`), as (local offset,
    run of global positions) pieces in local order. What a masked all-gather must share.
    Cached: every all-gather call and the cost model ask for the same layouts again, and each
    answer plans P - 1 pairs of ranks."""
    runs = all_runs[rank]
    spans = [visible_key_span(all_runs[x], runs, rule) for x in range(len(all_runs)) if x != rank]
    pieces, offset = [], 0
    for j, run in enumerate(runs):
        seen = [span[j] for span in spans if span[j][1] > span[j][0]]
        if seen:
            first, end = min(a for a, _ in seen), max(b for _, b in seen)
            stride = run.stride if run.length > 1 else 1
            pieces.append((offset + first, Run(run.start + first * stride, end - first, stride)))
        offset += run.length
    return tuple(pieces)


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


def _joined(runs: list[Run]) -> list[Run]:
    """`runs` in the given order, each merged into the one before it where it continues it."""
    merged: list[Run] = []
    for run in runs:
        joined = _append(merged[-1], run) if merged else None
        if joined is None:
            merged.append(run)
        else:
            merged[-1] = joined
    return merged


def gathered_runs(member_runs: tuple[Runs, ...], interleave: bool) -> Runs:
    """How the tokens of several ranks are laid out in one local tensor once gathered.

    The members' runs are sorted by start and adjacent ones merged, so a contiguous group
    becomes one run and a zigzag group two (or one, for the whole sequence): a causal kernel
    then runs a few large blocks. Striped runs interleave and cannot merge that way; with
    `interleave`, k equal runs of stride k starting at consecutive positions (a whole striped
    sequence) become one stride-1 run, i.e. global order. Without it they stay one run per
    rank, the order in which their stride matches the local queries' (no explicit mask).
    """
    merged = _joined(sorted((r for runs in member_runs for r in runs if r.length),
                            key=lambda r: r.start))
    k = len(merged)
    if (interleave and k > 1 and all(r.length == merged[0].length and r.stride == k for r in merged)
            and all(r.start == merged[0].start + i for i, r in enumerate(merged))):
        return (Run(merged[0].start, k * merged[0].length),)
    return tuple(merged)


def head_sharded_runs(member_runs: tuple[Runs, ...], rule: MaskRule) -> Runs:
    """How the head-sharded side of Ulysses (and of each USP group) lays out its members' tokens.

    Dense rules: global order (`gathered_runs`, interleaved), so a causal call is one big
    triangle. Masked rules (windows, documents): rank-major -- each member's runs as they
    arrive, adjacent ones merged -- so `token_slots` is None and no permutation runs; their
    plans are many sub-blocks in any order, and documents cut at the members' chunk boundaries
    ran ~10% cheaper per visible pair than whole documents in global order (one thread, the
    masks benchmark's documents on 2 heads, median of 5 interleaved runs: 1.32 vs 1.45 x
    dense; the window: 1.33 vs 1.32)."""
    if not rule.masked:
        return gathered_runs(member_runs, interleave=True)
    return tuple(_joined([r for runs in member_runs for r in runs if r.length]))


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
