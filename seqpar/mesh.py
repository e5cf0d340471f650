"""SPMesh: a job's ranks as data-parallel replicas of a sequence-parallel group, and that
sequence-parallel group split in two dimensions, Ulysses (inner) x ring (outer).

W = D x P ranks of `group` (P = U x R), named axes ("dp", "ring", "ulysses"), in group order
r = (d * R + g) * U + u:

* sequence-parallel group d ("sp"): ranks d*P .. d*P + P - 1 (consecutive: one sequence is
  sharded over them; several such groups work side by side on different sequences);
* data-parallel group s ("dp"): ranks s, s + P, s + 2P, ... (the ranks holding the same
  position s of their group's sequence: gradients are averaged over them);
* Ulysses group g of sequence-parallel group d: ranks d*P + g*U .. d*P + g*U + U - 1
  (consecutive, e.g. the GPUs of one node, where the all-to-all is cheap);
* ring group u of sequence-parallel group d: ranks d*P + u, d*P + u + U, ... (one per Ulysses
  group, the ranks that exchange K/V blocks across nodes).

`SPMesh(group, ulysses=U)` is the mesh of one sequence-parallel group (D = 1, P = W);
`SPMesh(group, ulysses=U, dp=D)` (or `sp=P`) splits the W ranks into D sequence-parallel groups
of P = W / D. The constructor is collective over `group`: every rank calls it with the same
arguments (checked on every rank, so a mismatch raises everywhere instead of hanging), and it
creates its subgroups once (`_subgroups` says how, over the whole world and over a smaller
group). Only groups of more than one rank are created; a one-rank dimension is a one-rank
`GroupInfo` with no process group, and a dimension spanning the whole group reuses `group`.

Wherever seqpar takes a group, an SPMesh means its sequence-parallel group (`mesh.info`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm.primitives import GroupInfo, agree, resolve_group


def _subgroups(info: GroupInfo, partition: list[list[int]]) -> GroupInfo:
    """This rank's GroupInfo among `partition` (lists of group ranks of `info`, covering it).

    Over the whole world every rank creates every subgroup, in one order: torch's ordinary
    `new_group`, whose names every rank agrees on. Over a smaller group the other ranks of the
    world are not calling, so each rank creates only its own subgroup with local
    synchronisation -- torch names those from the count of groups each member holds, so the
    members must have created the same process groups before (as the collective contract of
    their group already implies in practice).
    """
    size = len(partition[0])
    mine = next(members for members in partition if info.rank in members)
    if size == 1:
        return GroupInfo(None, 0, 1)
    if size == info.world:
        return info
    whole_world = info.world == dist.get_world_size()
    own = None
    for members in partition:
        ranks = [info.global_rank(r) for r in members]
        if whole_world:
            group = dist.new_group(ranks)
        elif members is mine:
            group = dist.new_group(ranks, use_local_synchronization=True)
        else:
            continue
        if members is mine:
            own = group
    return GroupInfo(own, mine.index(info.rank), size)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(world: int, ulysses, dp, sp) -> tuple[int, Exception | None]:
    """The data-parallel size D for `dp` / `sp` (None: the other one decides; both None: D = 1),
    or the error that names the bad argument."""
    for name, value in (("ulysses", ulysses), ("dp", dp), ("sp", sp)):
        if (value is not None or name == "ulysses") and not _is_int(value):
            kind = {"ulysses": "the Ulysses degree U", "dp": "the number of data-parallel "
                    "replicas D", "sp": "the sequence-parallel group size P"}[name]
            return -1, TypeError(f"{name} must be an int ({kind}), got {value!r}")
    for name, value in (("dp", dp), ("sp", sp)):
        if value is not None and (value < 1 or world % value):
            return -1, ValueError(f"{name}={value} must divide the group size {world} "
                                  f"(dp x sp = {world}); choose one of {_divisors(world)}")
    if dp is not None and sp is not None and dp * sp != world:
        return -1, ValueError(f"dp={dp} x sp={sp} = {dp * sp} must equal the group size "
                              f"{world}; pass one of them, or a pair whose product is {world}")
    replicas = dp if dp is not None else (world // sp if sp is not None else 1)
    size = world // replicas
    if ulysses < 1 or size % ulysses:
        where = (f"the group size {size}" if replicas == 1 else
                 f"the sequence-parallel size {size} (group size {world} / dp={replicas})")
        return -1, ValueError(f"ulysses={ulysses} must divide {where} (P = ulysses x ring); "
                              f"choose one of {_divisors(size)}")
    return replicas, None


class SPMesh:
    """Data-parallel replicas of a Ulysses x ring sequence-parallel group (collective
    constructor).

    Attributes: `info` (this rank's sequence-parallel group), `dp` (its data-parallel group),
    `dp_sp` (the whole mesh), `ulysses` / `ring` (its subgroups of the sequence-parallel group),
    all as `GroupInfo`; sizes `dp_size` D, `sp_size` P, `ulysses_size` U and `ring_size` R
    (`sizes` has them by axis name). `get_group(name)` returns the process group of "dp_sp",
    "dp", "sp", "ring" or "ulysses" (None for a one-rank dimension).
    """

    AXES = ("dp", "ring", "ulysses")

    def __init__(self, group=None, ulysses: int = 1, *, dp: int | None = None,
                 sp: int | None = None):
        whole = resolve_group(group)
        replicas, problem = _split(whole.world, ulysses, dp, sp)
        ok = problem is None
        agree(whole, "seqpar.SPMesh", {"ulysses": ulysses if ok else -1,
                                       "dp": replicas if ok else -1}, problem,
              torch.device("cpu"))
        size = whole.world // replicas
        rings = size // ulysses
        self.dp_sp = whole
        self.dp_size, self.sp_size = replicas, size
        self.ulysses_size, self.ring_size = ulysses, rings
        self.info = _subgroups(whole, [[d * size + s for s in range(size)]
                                       for d in range(replicas)])
        self.dp = _subgroups(whole, [[d * size + s for d in range(replicas)]
                                     for s in range(size)])
        # A dimension spanning the sequence-parallel group is that group (no second copy).
        self.ulysses = self.info if ulysses == size else _subgroups(
            whole, [[d * size + g * ulysses + u for u in range(ulysses)]
                    for d in range(replicas) for g in range(rings)])
        self.ring = self.info if rings == size else _subgroups(
            whole, [[d * size + g * ulysses + u for g in range(rings)]
                    for d in range(replicas) for u in range(ulysses)])

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The sequence-parallel process group (None when it is one rank)."""
        return self.info.group

    @property
    def sizes(self) -> dict[str, int]:
        return {"dp": self.dp_size, "sp": self.sp_size, "ring": self.ring_size,
                "ulysses": self.ulysses_size}

    def get_info(self, name: str) -> GroupInfo:
        infos = {"dp_sp": self.dp_sp, "dp": self.dp, "sp": self.info, "ring": self.ring,
                 "ulysses": self.ulysses}
        if name not in infos:
            raise ValueError(f"SPMesh.get_group: unknown name {name!r}; choose one of "
                             f"{list(infos)}")
        return infos[name]

    def get_group(self, name: str) -> dist.ProcessGroup | None:
        return self.get_info(name).group

    def __repr__(self) -> str:
        return (f"SPMesh(dp={self.dp_size}, P={self.sp_size}, ulysses={self.ulysses_size}, "
                f"ring={self.ring_size}, rank={self.dp_sp.rank})")


__all__ = ["SPMesh"]
