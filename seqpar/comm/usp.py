"""USP (2-D sequence parallelism): Ulysses inside groups of U ranks, ring attention across R groups.

P = U x R ranks arranged by `seqpar.SPMesh(group, ulysses=U)`: rank r = g * U + u belongs to
Ulysses group g (ranks g*U .. g*U + U - 1) and ring group u (ranks u, u + U, ...).

    1. all-to-all inside Ulysses group g: rank (g, u) trades its tokens' heads for all the group's
       tokens T_g on Hq/U query heads (and their K/V heads) -- `ulysses.seq_to_heads`;
    2. ring attention across the R ranks of ring group u, which hold T_0 .. T_(R-1) on the same
       heads: the ring backend's `ring_fwd` / `ring_bwd` with the global positions of each T_g
       (causal masks stay exact for every layout);
    3. all-to-all back inside the Ulysses group.

T_g is laid out as few runs as possible: contiguous -> one run, zigzag -> two (group g holds
chunks gU .. gU + U - 1 and their mirrors, so the ring across groups stays balanced), striped
-> one stride-P run per member. U = P is plain Ulysses (one-rank ring), U = 1 plain ring (the
all-to-alls move nothing). The code is `ulysses.py`'s, with the mesh's two subgroups.

Traffic per rank: the Ulysses all-to-alls of `ulysses.py` with U ranks ("usp.fwd.all_to_all",
"usp.bwd.all_to_all") plus the ring of `ring.py` over R ranks on blocks of U * S_loc tokens and
the n K/V heads of the rank ("usp.fwd.ring", "usp.bwd.ring"):
    forward   (R-1) * 2 * B * U * S_loc * n * D * b
    backward  (R-1) * 2 * B * U * S_loc * n * D * b  +  R * 2 * B * U * S_loc * n * D * 4
(no ring traffic when R = 1).
"""

from __future__ import annotations

from ..kernels.mask import Runs
from ..kernels.plan import PlanKernel
from .primitives import CommStats, GroupInfo
from .ulysses import UlyssesPlan


def usp_plan(ulysses: GroupInfo, ring: GroupInfo, all_runs: tuple[Runs, ...], heads_q: int,
             heads_kv: int, causal: bool, scale: float, kernel: PlanKernel,
             recorders: tuple[CommStats, ...], return_lse: bool) -> UlyssesPlan:
    """The Ulysses plan over an SPMesh's Ulysses group, with the ring over its ring group."""
    return UlyssesPlan.build(ulysses, ring, all_runs, heads_q, heads_kv, causal, scale, kernel,
                             recorders, return_lse, op="usp")
