"""The time and memory model: alpha-beta communication, roofline computation, and each
backend's schedule of what overlaps what.

Work. `work_matrix` counts the (query, key) products the kernel computes for the queries of
rank x against the keys of rank y, per batch entry and head, from the layout's closed forms
(the same counts `kernels.mask.plan_blocks` plans, tested against it) plus the tile waste of a
causal diagonal block (the kernel skips whole tiles above the diagonal, not single products).
With a window or documents the work is the visible pairs of the plans themselves
(`traffic.masked_work`; no tile waste) and the ring / TokenRing move only what is seen.
A kernel call costs  max(flops / FLOP/s, bytes / memory bandwidth) + overhead  (roofline),
with 4 flops per product and head dim forward, 10 backward (FlashAttention's 5 matmuls).

Communication. A message costs latency + bytes / bandwidth of its link class: inside a node a
rank's port (switched fabric: its messages share it; mesh: one link per peer), across nodes a
share of the node's network cards (the node's ranks sending off-node at the same time split
them). Collectives use the measured (latency, bandwidth) of the profile when it has them,
else the links: all-to-all as U - 1 pieces, all-gather / reduce-scatter as P - 1 pipelined
ring hops (one operation's latency plus a small latency per hop).

Schedules (per pass, the critical rank; combine(c, m) = c + m - overlap * min(c, m)):
* ring: P steps, step t = max over ranks of combine(compute of block (r, r-t), K/V hop);
  backward hops K/V and fp32 dK/dV together, plus the last dK/dV hop home, exposed;
* tokenring: the same with queries travelling and partials going home (two destinations);
* ulysses: all-to-alls (exposed) around one full-sequence kernel on H/U heads;
* usp: ulysses all-to-alls over U ranks around a ring over R groups;
* allgather: all-gather K/V (exposed), one kernel plan; backward reduce-scatter (exposed);
* lasp2 (linear): the state all-gather travels while the intra-chunk kernel runs;
* ring_linear (model only, the LASP-2 paper's ring baseline): K/V hop around the ring, each
  step computing the right-product contribution Q (K^T V) of the visiting block.
Each pass reports its time, the compute on the critical path and the communication left
exposed, bytes and messages per rank by link class, and FLOPs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .hardware import Profile
from .traffic import (Problem, kv_block_bytes, kv_split, lasp2_state_bytes, masked_ring_rows,
                      masked_work, tokenring_plan, visible_rows)

FWD_FLOPS_PER_PAIR = 4  # per head dim: q.k and p.v
BWD_FLOPS_PER_PAIR = 10  # recomputed scores, dv, dp, dq, dk


# ---------------------------------------------------------------- work

@functools.lru_cache(maxsize=4096)
def causal_block_products(n: int, tile: tuple[int, int]) -> float:
    """Products a tiled kernel computes for an n x n causal block: each tile of `tile[0]` query
    rows runs whole tiles of `tile[1]` keys up to its last row's reach."""
    if n <= 0:
        return 0.0
    rows_tile, keys_tile = tile
    starts = np.arange(0, n, rows_tile)
    rows = np.minimum(rows_tile, n - starts)
    keys = np.minimum(n, np.ceil((starts + rows) / keys_tile) * keys_tile)
    return float((rows * keys).sum())


def work_matrix(layout: str, causal: bool, world: int, seq_local: int,
                tile: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(products [P, P], kernel calls [P, P]) of the queries of rank x against the keys of
    rank y, per batch entry and head. tile=(1, 1) gives the exact causal products."""
    n = seq_local
    x, y = np.indices((world, world))
    full = float(n * n)
    if not causal:
        return np.full((world, world), full), np.ones((world, world))
    diagonal = causal_block_products(n, tile)
    if layout == "contiguous":
        work = np.where(x > y, full, 0.0)
        work[x == y] = diagonal
    elif layout == "zigzag":
        work = np.where(x == y, diagonal, 2 * (n // 2) ** 2)
    elif layout == "striped":
        # Stride-P runs: keys j <= i when y <= x (a causal triangle), j < i otherwise.
        work = np.where(y <= x, diagonal, causal_block_products(n - 1, tile))
    else:
        raise ValueError(f"work_matrix: unknown layout {layout!r}")
    return work, (work > 0).astype(float)


def group_work(p: Problem, groups: int, size: int, tile: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Work between `groups` groups of `size` consecutive ranks (USP: the Ulysses groups the
    ring runs across). One group (Ulysses) holds the whole sequence in global order: one causal
    block. Contiguous and zigzag groups hold the layout's own pieces at R = groups (two runs at
    most); striped groups keep one run per member (size^2 kernel calls). With a window or
    documents: the visible pairs and calls of the plans themselves (`traffic.masked_work`)."""
    if p.masked:
        return masked_work(p, groups)
    if groups == 1 or p.layout != "striped" or not p.causal:
        return work_matrix(p.layout, p.causal, groups, size * p.seq_local, tile)
    work, _ = work_matrix(p.layout, p.causal, p.world, p.seq_local, tile)
    summed = work.reshape(groups, size, groups, size).sum(axis=(1, 3))
    return summed, np.full((groups, groups), float(size * size))


def steps_of(matrix: np.ndarray, visiting_queries: bool = False) -> np.ndarray:
    """[step, rank]: matrix[r, r - t] (ring: rank r meets the keys of r - t at step t), or
    matrix[r - t, r] (TokenRing: rank r meets the queries of r - t)."""
    world = matrix.shape[0]
    step, rank = np.indices((world, world))
    other = (rank - step) % world
    return matrix[other, rank] if visiting_queries else matrix[rank, other]


# ---------------------------------------------------------------- compute

def attention_seconds(hw: Profile, p: Problem, products, calls, heads_q: int, heads_kv: int,
                      q_tokens, k_tokens, backward: bool):
    """Seconds of kernel calls (arrays broadcast): roofline of flops and the bytes of q, k, v,
    o (and dO, dq, dk, dv backward), plus a per-call overhead."""
    products, calls = np.asarray(products, float), np.asarray(calls, float)
    flops = (BWD_FLOPS_PER_PAIR if backward else FWD_FLOPS_PER_PAIR) * products * (
        p.batch * heads_q * p.head_dim)
    compute = flops / hw.attention_rate(p.head_dim, backward) + calls * hw.kernel_overhead
    io = p.batch * p.head_dim * p.itemsize * (
        np.asarray(q_tokens) * heads_q * (4 if backward else 2)
        + np.asarray(k_tokens) * heads_kv * (4 if backward else 2))
    return np.where(calls > 0, np.maximum(compute, io / hw.memory_bandwidth), 0.0), flops


def elementwise_seconds(hw: Profile, nbytes) -> float:
    """Memory-bound work (merges, accumulator adds, permutations): bytes read + written."""
    return np.asarray(nbytes, float) / hw.memory_bandwidth


def combine(compute, comm, overlap: float):
    compute, comm = np.asarray(compute, float), np.asarray(comm, float)
    return compute + comm - overlap * np.minimum(compute, comm)


# ---------------------------------------------------------------- communication

@dataclass(frozen=True)
class Placement:
    """Where the ranks of the group sit: node of rank r = r // ranks_per_node."""

    world: int
    ranks_per_node: int

    @property
    def nodes(self) -> np.ndarray:
        return np.arange(self.world) // self.ranks_per_node

    @property
    def node_count(self) -> int:
        return -(-self.world // self.ranks_per_node)


@dataclass
class LinkBytes:
    """Bytes and messages one rank sends in a pass, by link class (the critical rank's)."""

    intra_bytes: float = 0.0
    inter_bytes: float = 0.0
    intra_messages: float = 0.0
    inter_messages: float = 0.0

    def add(self, other: "LinkBytes", times: float = 1.0) -> None:
        self.intra_bytes += times * other.intra_bytes
        self.inter_bytes += times * other.inter_bytes
        self.intra_messages += times * other.intra_messages
        self.inter_messages += times * other.inter_messages


def p2p_seconds(hw: Profile, where: Placement, flows: list[tuple[np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Point-to-point messages posted together: flows = [(bytes [T, P], destination [T, P])],
    one message per flow and rank and step. Returns (seconds [T, P], off-node [F, T, P])."""
    nodes = where.nodes
    rank = np.arange(where.world)
    off = np.stack([(nodes[dest] != nodes[rank]) & (nbytes > 0) for nbytes, dest in flows])
    # ranks of a node sending off-node at the same step share the node's network cards
    sending = np.stack([np.bincount(nodes, weights=row, minlength=where.node_count)
                        for row in off.sum(axis=0).astype(float)])  # [T, nodes]
    share = hw.nics_per_node * hw.nic.bandwidth / np.maximum(sending[:, nodes], 1.0)
    nic_bw = np.minimum(hw.nic.bandwidth, share)
    intra_parts, inter = [], 0.0
    for (nbytes, _), off_node in zip(flows, off):
        inside = (nbytes > 0) & ~off_node
        intra_parts.append(np.where(inside, hw.intra.latency + nbytes / hw.intra.bandwidth, 0.0))
        inter = inter + np.where(off_node, hw.nic.latency + nbytes / nic_bw, 0.0)
    intra = np.max(intra_parts, axis=0) if hw.fabric == "mesh" else np.sum(intra_parts, axis=0)
    return np.maximum(intra, inter), off


def all_to_all_seconds(hw: Profile, where: Placement, ranks: int, sent: float
                       ) -> tuple[float, LinkBytes]:
    """All-to-all inside groups of `ranks` consecutive ranks (all groups at once), each rank
    sending `sent` bytes in ranks - 1 equal pieces."""
    if ranks == 1:
        return 0.0, LinkBytes()
    piece = sent / (ranks - 1)
    near = min(ranks, where.ranks_per_node) - 1
    far = ranks - 1 - near
    measured = hw.collective("all_to_all")
    if measured is not None:
        return measured.seconds(sent, ranks - 1), LinkBytes(near * piece, far * piece, near, far)
    inside = (hw.intra.seconds(piece) if hw.fabric == "mesh" else
              hw.intra.seconds(near * piece, near)) if near else 0.0
    node_share = hw.nics_per_node * hw.nic.bandwidth / where.ranks_per_node
    outside = (far * hw.nic.latency + far * piece / min(hw.nic.bandwidth, node_share)
               if far else 0.0)
    return max(inside, outside), LinkBytes(near * piece, far * piece, near, far)


def ring_collective_seconds(hw: Profile, where: Placement, kind: str, shard: float
                            ) -> tuple[float, LinkBytes]:
    """All-gather or reduce-scatter over the whole group, `shard` bytes per rank per step:
    P - 1 ring steps (NCCL); across nodes the ring's channels use every network card of a
    node. Measured collectives keep their own time; their bytes are split as direct exchanges
    (gloo's all-gather sends a rank's shard to every other rank)."""
    steps = where.world - 1
    if steps == 0:
        return 0.0, LinkBytes()
    measured = hw.collective(kind)
    if measured is not None:
        # a measured (gloo) collective exchanges pieces with every other rank directly
        crossing = (steps - (min(where.world, where.ranks_per_node) - 1)) / steps
    else:
        crossing = (where.node_count - 1) / where.world  # share of ring hops leaving a node
    sent = LinkBytes(steps * shard * (1 - crossing), steps * shard * crossing,
                     steps * (1 - crossing), steps * crossing)
    if measured is not None:
        return measured.seconds(steps * shard, steps), sent
    hops = steps * hw.collective_step_latency
    if where.node_count == 1:
        bandwidth = hw.intra.bandwidth * (where.world - 1 if hw.fabric == "mesh" else 1)
        return hw.intra.latency + hops + steps * shard / bandwidth, sent
    bus = min(hw.intra.bandwidth, hw.nics_per_node * hw.nic.bandwidth)
    return hw.nic.latency + hops + steps * shard / bus, sent


# ---------------------------------------------------------------- one pass

@dataclass
class Pass:
    """One pass (forward or backward) on the critical rank."""

    seconds: float = 0.0
    compute: float = 0.0
    exposed: float = 0.0  # communication not hidden behind computation
    flops: float = 0.0
    sent: LinkBytes = field(default_factory=LinkBytes)

    def serial(self, compute: float = 0.0, comm: float = 0.0) -> None:
        """A stage where nothing overlaps."""
        self.seconds += compute + comm
        self.compute += compute
        self.exposed += comm


def _sent_by_critical(nbytes: np.ndarray, off: np.ndarray, per_step_seconds: np.ndarray
                      ) -> LinkBytes:
    """Bytes by link class of the rank whose communication takes longest over the pass."""
    critical = int(np.argmax(per_step_seconds.sum(axis=0)))
    total = LinkBytes()
    for flow_bytes, flow_off in zip(nbytes, off):
        mine, far = flow_bytes[:, critical], flow_off[:, critical]
        total.add(LinkBytes(float(mine[~far].sum()), float(mine[far].sum()),
                            float(((mine > 0) & ~far).sum()), float(far.sum())))
    return total


def pipelined_pass(hw: Profile, where: Placement, compute: np.ndarray,
                   flows: list[tuple[np.ndarray, np.ndarray]], flops: float,
                   tail: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Pass:
    """Steps [T, P] whose messages travel while the step computes; `tail`: messages after the
    last step (nothing to hide behind)."""
    comm, off = p2p_seconds(hw, where, flows)
    steps = combine(compute, comm, hw.overlap).max(axis=1)
    result = Pass(float(steps.sum()), float(compute.max(axis=1).sum()), 0.0, flops,
                  _sent_by_critical(np.stack([f[0] for f in flows]), off, comm))
    result.exposed = result.seconds - result.compute
    if tail:
        tail_comm, tail_off = p2p_seconds(hw, where, tail)
        result.serial(comm=float(tail_comm.max()))
        result.sent.add(_sent_by_critical(np.stack([f[0] for f in tail]), tail_off, tail_comm))
    return result


# ---------------------------------------------------------------- backends

def _masked_flows(p: Problem, members: np.ndarray, heads_kv: int, backward: bool):
    """The direct schedule of a masked ring (`comm/ring.py`): during step t the K/V slices of
    step t + 1 travel to r + t + 1 and (backward) the fp32 dK/dV of step t - 1's slice home to
    r - t + 1; the last one after the loop (tail)."""
    ring = len(members)
    sent, received = masked_ring_rows(p, ring)
    step, index = np.indices((ring, ring))
    kv_row = kv_block_bytes(p, heads_kv, p.batch)
    dkv_row = kv_block_bytes(p, heads_kv, p.batch, p.acc_itemsize)
    next_rows = np.vstack([sent[1:], np.zeros((1, ring))])
    flows = [(next_rows * kv_row, members[(index + step + 1) % ring])]
    tail = None
    if backward:
        home_rows = np.vstack([np.zeros((2, ring)), received[1:-1]])[:ring]
        flows.append((home_rows * dkv_row, members[(index - step + 1) % ring]))
        tail = [(received[-1:] * dkv_row, members[(index[:1] - ring + 1) % ring])]
    return flows, tail


def _ring_passes(hw: Profile, p: Problem, where: Placement, members: np.ndarray,
                 work: np.ndarray, calls: np.ndarray, heads_kv: int, tokens: int,
                 heads_q: int) -> tuple[Pass, Pass]:
    """Ring attention over `members` (global ranks of one ring, the others running alike):
    blocks of `tokens` local tokens (all batch entries), `heads_kv` travelling heads. A window
    or documents: the direct schedule's slices (`_masked_flows`) instead of whole blocks."""
    ring = len(members)
    products, kernel_calls = steps_of(work), steps_of(calls)
    seq = tokens // p.batch
    passes = []
    for backward in (False, True):
        seconds, flops = attention_seconds(hw, p, products, kernel_calls, heads_q, heads_kv,
                                           seq, seq, backward)
        acc = tokens * p.head_dim * p.acc_itemsize
        if p.masked:  # only steps with something planned touch the accumulators
            acc = acc * (kernel_calls > 0)
        if backward:  # dq += ; dK/dV local zeroed, added to the travelling accumulators
            seconds = seconds + elementwise_seconds(hw, (3 * heads_q + 8 * heads_kv) * acc)
        else:  # merge of each later block into the fp32 accumulators
            seconds = seconds + np.where(np.arange(ring)[:, None] > 0,
                                         elementwise_seconds(hw, 4 * heads_q * acc), 0.0)
        kv = kv_block_bytes(p, heads_kv, tokens)
        dkv = kv_block_bytes(p, heads_kv, tokens, p.acc_itemsize)
        step_bytes = np.where(np.arange(ring)[:, None] < ring - 1, kv, 0) * np.ones((1, ring))
        if backward:
            step_bytes = step_bytes + dkv  # the accumulator of the block just used travels too
        dest = np.broadcast_to(np.roll(members, -1), (ring, ring))
        tail = [(np.full((1, ring), float(dkv)), dest[:1])] if backward and ring > 1 else None
        flows = [(step_bytes, dest)]
        if p.masked and ring > 1:
            flows, tail = _masked_flows(p, members, heads_kv, backward)
        passes.append(_members_pass(hw, where, members, seconds, flows,
                                    float(flops.max(axis=1).sum()), tail))
    return passes[0], passes[1]


def _members_pass(hw, where, members, seconds, flows, flops, tail) -> Pass:
    """`pipelined_pass` for a ring of `members` among the group's ranks: every ring of the
    same shape runs at once (USP: U rings), so off-node flows are counted for all of them."""
    if len(members) == where.world:
        return pipelined_pass(hw, where, seconds, flows, flops, tail)
    # The other rings are shifted copies of `members` (ring u: u, u + U, ...): lay them out.
    offsets = range(where.world // len(members))

    def widen(array, dest=False):
        array = np.asarray(array)
        out = np.empty((array.shape[0], where.world), dtype=float)
        for offset in offsets:
            out[:, members + offset] = array + (offset if dest else 0)
        return out.astype(int) if dest else out
    flows = [(widen(b), widen(d, dest=True)) for b, d in flows]
    tail = tail and [(widen(b), widen(d, dest=True)) for b, d in tail]
    return pipelined_pass(hw, where, widen(seconds), flows, flops, tail)


def ring_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    work, calls = group_work(p, p.world, 1, hw.tile)
    where = Placement(p.world, hw.ranks_per_node)
    return _ring_passes(hw, p, where, np.arange(p.world), work, calls, p.heads_kv, p.tokens,
                        p.heads_q)


def tokenring_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    world, where = p.world, Placement(p.world, hw.ranks_per_node)
    work, calls = group_work(p, world, 1, hw.tile)
    products, kernel_calls = steps_of(work, True), steps_of(calls, True)
    forwarded, returned = tokenring_plan(p)
    rows = visible_rows(p)
    step, rank = np.indices((world, world))
    n, d, b, a, s = p.batch * p.heads_q, p.head_dim, p.itemsize, p.acc_itemsize, p.seq_local
    returning = np.vstack([np.zeros((1, world)), returned[:-1]])  # partials leave a step later
    owner = (rank - step + 1) % world
    passes = []
    for backward in (False, True):
        visiting_rows = np.where(step > 0, rows[(rank - step) % world, rank], s)
        seconds, flops = attention_seconds(hw, p, products, kernel_calls, p.heads_q, p.heads_kv,
                                           visiting_rows, s, backward)
        query_bytes = n * s * (2 * d * b + 2 * a if backward else d * b)
        row_bytes = n * (d * a if backward else d * b + a)
        # merge of each arriving partial (4 passes over its rows, fp32) and the packing of ours
        seconds = seconds + elementwise_seconds(hw, returning * n * d * (4 * a + 2 * b))
        flows = [(np.where(forwarded, query_bytes, 0.0), (rank + 1) % world),
                 (returning * row_bytes, owner)]
        if p.masked:  # the rows of ours that r + t + 1 sees go to it directly during step t
            seen = rows[rank, (rank + step + 1) % world] * (step + 1 < world)
            flows[0] = (seen * query_bytes / s, (rank + step + 1) % world)
        last = returned[-1:] * row_bytes  # the partials of the last step go home after it
        tail = [(last, (np.arange(world)[None] - world + 1) % world)] if world > 1 else None
        passes.append(pipelined_pass(hw, where, seconds, flows, float(flops.max(axis=1).sum()),
                                     tail))
    return passes[0], passes[1]


def _ulysses_passes(hw: Profile, p: Problem, ulysses: int) -> tuple[Pass, Pass]:
    """Ulysses over groups of `ulysses` consecutive ranks, with the ring across R = P / U
    groups in the middle (plain Ulysses: R = 1; USP otherwise)."""
    where = Placement(p.world, hw.ranks_per_node)
    rings = p.world // ulysses
    m = p.heads_q // ulysses
    n, replicated = kv_split(p.heads_q, p.heads_kv, ulysses)
    work, calls = group_work(p, rings, ulysses, hw.tile)
    if rings == 1:
        inner_fwd, inner_bwd = Pass(), Pass()
        for inner, backward in ((inner_fwd, False), (inner_bwd, True)):
            seconds, flops = attention_seconds(hw, p, work[0, 0], calls[0, 0], m, n,
                                               ulysses * p.seq_local, ulysses * p.seq_local,
                                               backward)
            inner.serial(compute=float(seconds))
            inner.flops = float(flops)
    else:
        members = np.arange(rings) * ulysses
        inner_fwd, inner_bwd = _ring_passes(hw, p, where, members, work, calls, n,
                                            ulysses * p.tokens, m)
    # What each rank sends in each all-to-all: the (U - 1) / U of a local tensor bound for the
    # others (`traffic.ulysses_volume`, one entry per all-to-all).
    piece = (ulysses - 1) * p.tokens
    q_like = piece * m * p.head_dim * p.itemsize
    lse = [piece * m * p.acc_itemsize] if p.return_lse else []
    kv_grad_itemsize = p.acc_itemsize if replicated else p.itemsize
    moves = ([q_like, piece * 2 * n * p.head_dim * p.itemsize, q_like] + lse,
             [q_like, q_like, piece * 2 * n * p.head_dim * kv_grad_itemsize] + lse)
    passes = []
    for inner, sends in zip((inner_fwd, inner_bwd), moves):
        outer = Pass(inner.seconds, inner.compute, inner.exposed, inner.flops)
        outer.sent.add(inner.sent)
        for sent in sends if ulysses > 1 else ():
            seconds, link_bytes = all_to_all_seconds(hw, where, ulysses, sent)
            # token and head permutations around the all-to-all: the whole local tensor,
            # read and written on the way out and on the way in
            local = sent * ulysses / (ulysses - 1)
            outer.serial(compute=float(elementwise_seconds(hw, 4 * local)), comm=seconds)
            outer.sent.add(link_bytes)
        passes.append(outer)
    return passes[0], passes[1]


def ulysses_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    return _ulysses_passes(hw, p, p.world)


def usp_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    return _ulysses_passes(hw, p, p.ulysses or 1)


def allgather_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    where = Placement(p.world, hw.ranks_per_node)
    work, _ = work_matrix(p.layout, p.causal, p.world, p.seq_local, hw.tile)
    products = work.sum(axis=1)
    calls = 1 if not p.causal else {"contiguous": 2, "zigzag": 4, "striped": p.world}[p.layout]
    if p.masked:  # the plan of the local queries against the gathered K/V, roughly
        work, block_calls = masked_work(p, p.world)
        products, calls = work.sum(axis=1), block_calls.sum(axis=1)
    kv, dkv = kv_block_bytes(p), kv_block_bytes(p, itemsize=p.acc_itemsize)
    passes = []
    for backward, kind, shard in ((False, "all_gather", kv), (True, "reduce_scatter", dkv)):
        seconds, flops = attention_seconds(hw, p, products, calls, p.heads_q, p.heads_kv,
                                           p.seq_local, p.seq_len, backward)
        comm, sent = ring_collective_seconds(hw, where, kind, shard)
        one = Pass(flops=float(flops.max()))
        # forward: the gathered K/V put in order; backward: whole-sequence fp32 dK/dV zeroed,
        # accumulated into and picked per rank (each a read and a write of P shards)
        permute = elementwise_seconds(hw, (8 if backward else 2) * shard * p.world)
        one.serial(compute=float(seconds.max() + permute), comm=comm)
        one.sent = sent
        passes.append(one)
    return passes[0], passes[1]


def linear_chunk_flops(p: Problem, block: int = 64) -> float:
    """Chunked linear attention on the local tokens, forward: scores and values inside
    `block`-token blocks, plus the state products across blocks (per batch entry and head)."""
    return p.seq_local * (2 * block * (p.head_dim + p.dv) + 4 * p.head_dim * p.dv)


def lasp2_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    """Causal LASP-2: the state all-gather travels while the intra-chunk kernel runs
    (`comm/lasp2.py`); outgoing states are computed before it, the inter-chunk terms after."""
    where = Placement(p.world, hw.ranks_per_node)
    heads = p.batch * p.heads_q
    chunks = 2 if p.layout == "zigzag" else 1
    state_product = heads * 2 * p.seq_local * p.head_dim * p.dv  # one (C x d) x (d x e)
    passes = []
    for backward in (False, True):
        intra = (2 if backward else 1) * heads * linear_chunk_flops(p)
        # forward: M = K^T V before, Q S after; backward: D = Q^T dO and dQ before, dK, dV after
        before = (2 if backward else 1) * state_product
        after = (2 if backward else 1) * state_product
        scan = heads * p.world * chunks * p.head_dim * p.dv * 2
        comm, sent = ring_collective_seconds(hw, where, "all_gather",
                                             chunks * lasp2_state_bytes(p))
        rate = hw.linear_flops
        one = Pass(flops=intra + before + after + scan, sent=sent)
        one.compute = (intra + before + after + scan) / rate
        one.seconds = float((before + scan + after) / rate + combine(intra / rate, comm,
                                                                       hw.overlap))
        one.exposed = one.seconds - one.compute
        passes.append(one)
    return passes[0], passes[1]


def ring_linear_passes(hw: Profile, p: Problem) -> tuple[Pass, Pass]:
    """Ring-style sequence parallelism on linear attention (K/V blocks hop; each step adds
    Q_r (K_j^T V_j) of the visiting block): the LASP-2 paper's Ring Attention baseline."""
    where, world = Placement(p.world, hw.ranks_per_node), p.world
    heads = p.batch * p.heads_q
    per_step = heads * 4 * p.seq_local * p.head_dim * p.dv  # K^T V, then Q times it
    kv = p.tokens * p.heads_q * (p.head_dim + p.dv) * p.itemsize
    dkv = kv // p.itemsize * p.acc_itemsize
    dest = np.broadcast_to((np.arange(world) + 1) % world, (world, world))
    step = np.arange(world)[:, None] * np.ones((1, world))
    passes = []
    for backward in (False, True):
        scale = 2 if backward else 1
        work, _ = work_matrix(p.layout, p.causal, world, p.seq_local)
        visible = np.minimum(1.0, steps_of(work) / float(p.seq_local) ** 2)
        compute = np.where(step == 0, scale * heads * linear_chunk_flops(p),
                           scale * per_step * visible) / hw.linear_flops
        step_bytes = np.where(step < world - 1, kv, 0.0) + (dkv if backward else 0.0)
        tail = [(np.full((1, world), float(dkv)), dest[:1])] if backward and world > 1 else None
        passes.append(pipelined_pass(hw, where, compute, [(step_bytes, dest)],
                                     float((compute * hw.linear_flops).max(axis=1).sum()), tail))
    return passes[0], passes[1]


PASSES = {"ring": ring_passes, "tokenring": tokenring_passes, "ulysses": ulysses_passes,
          "usp": usp_passes, "allgather": allgather_passes, "lasp2": lasp2_passes,
          "ring_linear": ring_linear_passes}
