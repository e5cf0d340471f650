"""Bytes and messages each backend sends per rank: the formulas the backends document and the
tests assert against `seqpar.comm_stats`, in one place the cost model also uses.

A `Problem` is one attention call: global shapes, the group size P, the layout, and for USP the
Ulysses degree U (ring degree R = P / U). b = input itemsize, a = accumulator itemsize (4; 8
for fp64), C = S / P local tokens, N = B * C. Per rank, forward and backward (each a `Volume`):

    ring        fwd (P-1) K/V blocks 2 N Hkv D b          bwd the same + P fp32 dK/dV blocks
    tokenring   queries Q_x on to r + 1 while a rank further along sees them, and partials
                (o, lse) of the visiting rows that saw a key straight home (`tokenring_volume`)
    ulysses     all-to-alls over U ranks of q, k+v, o (+ lse); n K/V heads per rank (`kv_split`)
    usp         ulysses over U ranks + ring over R ranks on U C tokens, n K/V heads
    allgather   fwd all-gather of K/V (P-1) 2 N Hkv D b   bwd reduce-scatter of dK/dV in a
    lasp2       one all-gather of d x e states per pass, independent of S (`lasp2_volume`)

Messages: one per point-to-point transfer (packed tensors travel as one), P - 1 per
all-to-all / all-gather / reduce-scatter, 2 (P - 1) per all-reduce.

Masks (`Problem.window`, `Problem.documents`): ring and TokenRing move only what is seen, straight
to the rank that sees it (`masked_ring_rows`, `masked_query_rows`, read off the same plans the
backends run; formulas in `comm/ring.py` and `comm/tokenring.py`); the collectives' traffic
does not change. The work the cost model charges is the visible pairs of those plans
(`masked_work`), not the dense count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from ..kernels.mask import (MaskRule, Runs, causal_pairs, halo_runs, head_sharded_runs,
                            plan_blocks, visible_key_span)

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Problem:
    """One attention call as the cost model sees it.

    seq_len is the global length S; world the group size P; ulysses the Ulysses degree U of a
    USP mesh (None: no mesh). head_dim is D (linear attention: the key dim Dk, with value_dim Dv).
    itemsize / acc_itemsize: bytes per input element / per accumulator element.
    """

    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    world: int
    itemsize: int = 2
    acc_itemsize: int = 4
    causal: bool = True
    layout: str = "zigzag"
    ulysses: int | None = None
    return_lse: bool = False
    value_dim: int | None = None
    window: int | None = None  # sliding window W (seqpar.attention(window=))
    documents: tuple[int, ...] | None = None  # global document boundaries (cu_seqlens)

    @property
    def masked(self) -> bool:
        """A window or documents: visibility (hence work and ring traffic) below causal's."""
        return self.window is not None or self.documents is not None

    @property
    def rule(self) -> MaskRule:
        return MaskRule(self.causal, self.window, self.documents)

    @property
    def seq_local(self) -> int:
        return self.seq_len // self.world

    @property
    def dv(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def tokens(self) -> int:
        """N = B * C: local tokens (all batch entries) of one rank."""
        return self.batch * self.seq_local

    def with_(self, **changes) -> "Problem":
        return replace(self, **changes)


@dataclass(frozen=True)
class Volume:
    """What one rank sends in one pass (forward or backward)."""

    bytes: int = 0
    messages: int = 0

    def __add__(self, other: "Volume") -> "Volume":
        return Volume(self.bytes + other.bytes, self.messages + other.messages)


# ---------------------------------------------------------------- masks

def member_runs(p: Problem, groups: int) -> tuple[Runs, ...]:
    """The tokens of each of `groups` groups of P / groups consecutive ranks, laid out as the
    backends lay them out (P groups: each rank's own runs; fewer: the head-sharded side of a
    Ulysses group, `kernels.mask.head_sharded_runs`)."""
    from ..layout import all_local_runs  # layout -> comm.primitives; keep cost importable alone
    runs = all_local_runs(p.seq_len, p.world, p.layout, p.documents)
    if groups == p.world:
        return runs
    size = p.world // groups
    return tuple(head_sharded_runs(runs[g * size:(g + 1) * size], p.rule) for g in range(groups))


@functools.lru_cache(maxsize=256)
def masked_work(p: Problem, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(visible pairs [G, G], kernel calls [G, G]) of the queries of group x against the keys of
    group y, per batch entry and head: the plans the backends run (`plan_blocks`)."""
    runs = member_runs(p, groups)
    work, calls = np.zeros((groups, groups)), np.zeros((groups, groups))
    for x in range(groups):
        for y in range(groups):
            blocks = plan_blocks(runs[x], runs[y], p.rule)
            work[x, y], calls[x, y] = causal_pairs(blocks), len(blocks)
    return work, calls


def _hull_rows(key_runs: Runs, query_runs: Runs, rule: MaskRule) -> int:
    return sum(end - first for first, end in visible_key_span(query_runs, key_runs, rule))


@functools.lru_cache(maxsize=256)
def masked_ring_rows(p: Problem, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(sent [T, G], received [T, G]): K/V rows (per batch entry) ring member r sends to r + t
    and receives from r - t at step t (the hull of the keys the receiver sees, per run)."""
    runs = member_runs(p, groups)
    sent, received = np.zeros((groups, groups)), np.zeros((groups, groups))
    for t in range(1, groups):
        for r in range(groups):
            sent[t, r] = _hull_rows(runs[r], runs[(r + t) % groups], p.rule)
            received[t, r] = _hull_rows(runs[(r - t) % groups], runs[r], p.rule)
    return sent, received


def _row_span(query_runs: Runs, key_runs: Runs, rule: MaskRule) -> int:
    blocks = plan_blocks(query_runs, key_runs, rule)
    return max(b.q1 for b in blocks) - min(b.q0 for b in blocks) if blocks else 0


@functools.lru_cache(maxsize=256)
def masked_query_rows(p: Problem) -> np.ndarray:
    """[P, P]: rows (the hull) of rank x's queries that see some key of rank y, under the
    mask: what TokenRing sends of x's queries to y, and the rows of y's partial for x."""
    runs = member_runs(p, p.world)
    return np.array([[_row_span(runs[x], runs[y], p.rule) for y in range(p.world)]
                     for x in range(p.world)], dtype=np.int64)


# ---------------------------------------------------------------- ring

def kv_block_bytes(p: Problem, heads_kv: int | None = None, tokens: int | None = None,
                   itemsize: int | None = None) -> int:
    """One packed (K, V) block of a rank: 2 N Hkv D elements."""
    heads = p.heads_kv if heads_kv is None else heads_kv
    return 2 * (p.tokens if tokens is None else tokens) * heads * p.head_dim * (
        p.itemsize if itemsize is None else itemsize)


def ring_volume(p: Problem, world: int | None = None, heads_kv: int | None = None,
                tokens: int | None = None, rank: int = 0) -> tuple[Volume, Volume]:
    """(forward, backward): K/V hops; K/V hops + fp32 dK/dV hops (`comm/ring.py`). `world`,
    `heads_kv`, `tokens` override the problem's for the ring inside USP. With a window or
    documents, `rank`'s direct sends: its K/V rows each other rank sees, and the fp32 dK/dV
    of the rows it received, home."""
    world = p.world if world is None else world
    if world == 1:
        return Volume(), Volume()
    if p.masked:
        sent, received = masked_ring_rows(p, world)
        row = kv_block_bytes(p, heads_kv, p.batch)
        row_acc = kv_block_bytes(p, heads_kv, p.batch, p.acc_itemsize)
        out, back = sent[:, rank], received[:, rank]
        return (Volume(int(out.sum()) * row, int((out > 0).sum())),
                Volume(int(out.sum()) * row + int(back.sum()) * row_acc,
                       int((out > 0).sum() + (back > 0).sum())))
    kv = kv_block_bytes(p, heads_kv, tokens)
    dkv = kv_block_bytes(p, heads_kv, tokens, p.acc_itemsize)
    return (Volume((world - 1) * kv, world - 1),
            Volume((world - 1) * kv + world * dkv, 2 * world - 1))


# ---------------------------------------------------------------- tokenring

def _rows_before(layout: str, seq_local: int) -> int:
    """Causal: rows of rank x's queries that see a key of rank y > x (y's tokens come later),
    read off the layouts: contiguous none, zigzag the later chunk, striped all but the first."""
    return {"contiguous": 0, "zigzag": seq_local // 2, "striped": seq_local - 1}[layout]


def visible_rows(p: Problem) -> np.ndarray:
    """[P, P]: rows of rank x's queries that see some key of rank y (the rows a TokenRing
    partial of x computed on y carries)."""
    if p.masked:
        return masked_query_rows(p)
    world, s = p.world, p.seq_local
    rows = np.full((world, world), s, dtype=np.int64)
    if p.causal:
        x, y = np.indices((world, world))
        rows[x < y] = _rows_before(p.layout, s)
    return rows


def tokenring_plan(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(forwarded [P, P], returned rows [P, P]) indexed [step, rank]:
    forwarded[t, r] -- rank r sends the visiting queries of x = r - t on to r + 1 during step t
    (some rank further along, x + t + 1 .. x + P - 1, sees them);
    rows[t, r] -- rows of the partial rank r computes at step t >= 1 for x's queries (0: none),
    sent home during step t + 1."""
    world = p.world
    rows = visible_rows(p)
    step, rank = np.indices((world, world))
    owner = (rank - step) % world
    # seen[x, j]: rank x + j sees x's queries; forwarded at step t iff any j > t does.
    x, j = np.indices((world, world))
    seen = rows[x, (x + j) % world] > 0
    later = np.flip(np.logical_or.accumulate(np.flip(seen, axis=1), axis=1), axis=1)
    later_than = np.zeros_like(later)
    later_than[:, :-1] = later[:, 1:]  # any j > t
    forwarded = later_than[owner, step]
    forwarded[-1] = False  # the last step forwards nothing
    if p.masked:  # queries go straight to the ranks that see them, never along the ring
        forwarded[:] = False
    returned = np.where(step > 0, rows[owner, rank], 0)
    return forwarded, returned


def tokenring_volume(p: Problem, rank: int) -> tuple[Volume, Volume]:
    """(forward, backward) of `rank`: forwarded query blocks and returned partials
    (`comm/tokenring.py`): forward Q (N Hq D b) per block, o rows + fp32 lse per partial;
    backward Q, dO (b) + lse, delta (a) per block, fp32 dQ rows per partial."""
    if p.world == 1:
        return Volume(), Volume()
    forwarded, returned = tokenring_plan(p)
    blocks = int(forwarded[:, rank].sum())
    rows = returned[:, rank]
    partials = int((rows > 0).sum())
    n, d, b, a = p.batch * p.heads_q, p.head_dim, p.itemsize, p.acc_itemsize
    s, total_rows = p.seq_local, int(rows.sum())
    query_rows = blocks * s
    if p.masked:  # the rows of ours each other rank sees, sent to it directly
        seen = masked_query_rows(p)[rank]
        seen = np.delete(seen, rank)
        query_rows, blocks = int(seen.sum()), int((seen > 0).sum())
    fwd = query_rows * n * d * b + n * total_rows * (d * b + a)
    bwd = query_rows * n * (2 * d * b + 2 * a) + n * total_rows * d * a
    return Volume(fwd, blocks + partials), Volume(bwd, blocks + partials)


# ---------------------------------------------------------------- ulysses, usp

def kv_split(heads_q: int, heads_kv: int, ranks: int) -> tuple[int, bool]:
    """(K/V heads per rank n, replicated?) after the Ulysses all-to-all over `ranks`
    (`comm/ulysses.py`): a partition when ranks divide Hkv, one replicated head when Hkv
    divides ranks, else one K/V head per local query head."""
    if heads_kv % ranks == 0:
        return heads_kv // ranks, False
    if ranks % heads_kv == 0:
        return 1, True
    return heads_q // ranks, True


def ulysses_volume(p: Problem, ranks: int | None = None) -> tuple[Volume, Volume]:
    """(forward, backward) all-to-all traffic of `ranks` Ulysses ranks (default P): q, k+v, o
    forward, dO, dq, dk+dv backward, (+ lse / dlse with return_lse), each sending the (U-1)
    pieces bound for the other ranks; dK/dV of replicated heads travel in the accumulator dtype."""
    ranks = p.world if ranks is None else ranks
    if ranks == 1:
        return Volume(), Volume()
    b, a = p.itemsize, p.acc_itemsize
    m = p.heads_q // ranks
    n, replicated = kv_split(p.heads_q, p.heads_kv, ranks)
    c = a if replicated else b
    tokens, d = p.tokens, p.head_dim
    lse = (ranks - 1) * tokens * m * a if p.return_lse else 0
    collectives = (4 if p.return_lse else 3) * (ranks - 1)
    fwd = (ranks - 1) * tokens * d * (2 * m + 2 * n) * b + lse
    bwd = (ranks - 1) * tokens * d * (2 * m * b + 2 * n * c) + lse
    return Volume(fwd, collectives), Volume(bwd, collectives)


def usp_volume(p: Problem) -> dict[str, Volume]:
    """USP traffic per op: "usp.fwd.all_to_all", "usp.bwd.all_to_all" over U ranks and
    "usp.fwd.ring", "usp.bwd.ring" over R = P / U ranks on U C tokens with n K/V heads."""
    u = p.ulysses or 1
    a2a_fwd, a2a_bwd = ulysses_volume(p, u)
    n, _ = kv_split(p.heads_q, p.heads_kv, u)
    ring_fwd, ring_bwd = ring_volume(p, p.world // u, heads_kv=n, tokens=u * p.tokens)
    # (masked: ring rank 0's direct sends, the rows of its group's K/V the others see)
    return {"usp.fwd.all_to_all": a2a_fwd, "usp.bwd.all_to_all": a2a_bwd,
            "usp.fwd.ring": ring_fwd, "usp.bwd.ring": ring_bwd}


# ---------------------------------------------------------------- allgather, lasp2

def allgather_halo_rows(p: Problem) -> int:
    """Rows of K/V each rank shares in the all-gather: the shard, or with a window or documents
    the largest halo (`kernels.mask.halo_runs`) when it is smaller (`comm/allgather.py`)."""
    if not p.masked or p.world == 1:
        return p.seq_local
    runs = member_runs(p, p.world)
    halo = max(sum(run.length for _, run in halo_runs(runs, rank, p.rule))
               for rank in range(p.world))
    return min(halo, p.seq_local)


def allgather_volume(p: Problem) -> tuple[Volume, Volume]:
    """(forward, backward): all-gather of K and V, reduce-scatter of dK and dV in the
    accumulator dtype, (P - 1) blocks of `allgather_halo_rows` rows each (`comm/allgather.py`)."""
    if p.world == 1:
        return Volume(), Volume()
    rows = allgather_halo_rows(p)
    return (Volume((p.world - 1) * kv_block_bytes(p, tokens=p.batch * rows), p.world - 1),
            Volume((p.world - 1) * kv_block_bytes(p, tokens=p.batch * rows,
                                                  itemsize=p.acc_itemsize), p.world - 1))


def lasp2_state_bytes(p: Problem) -> int:
    """One d x e state per batch entry and head, in the accumulator dtype."""
    return p.batch * p.heads_q * p.head_dim * p.dv * p.acc_itemsize


def lasp2_volume(p: Problem, decayed: bool, documents: bool = False) -> Volume:
    """One pass (forward and backward alike) of LASP-2 (`comm/lasp2.py`): causal, one
    all-gather of a state per local chunk; non-causal with decay or with packed documents
    (cu_seqlens), two states (prefix and suffix); non-causal without either, one all-reduce of
    K^T V. Documents change no causal byte: the cut flags come from cu_seqlens, known to all."""
    world = p.world
    if world == 1:
        return Volume()
    if not p.causal and not decayed and not documents:
        return Volume(2 * (world - 1) * -(-lasp2_state_bytes(p) // world), 2 * (world - 1))
    chunks = 2 if p.layout == "zigzag" else 1
    directions = 1 if p.causal else 2
    return Volume((world - 1) * chunks * directions * lasp2_state_bytes(p), world - 1)


def backend_volume(backend: str, p: Problem, rank: int = 0) -> tuple[Volume, Volume]:
    """(forward, backward) bytes and messages `rank` sends for a softmax backend."""
    if backend == "ring":
        return ring_volume(p, rank=rank)
    if backend == "tokenring":
        return tokenring_volume(p, rank)
    if backend == "ulysses":
        return ulysses_volume(p)
    if backend == "usp":
        ops = usp_volume(p)
        return (ops["usp.fwd.all_to_all"] + ops["usp.fwd.ring"],
                ops["usp.bwd.all_to_all"] + ops["usp.bwd.ring"])
    if backend == "allgather":
        return allgather_volume(p)
    raise ValueError(f"backend_volume: no traffic formula for backend {backend!r}")
