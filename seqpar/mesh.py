"""SPMesh: a sequence-parallel group split in two dimensions, Ulysses (inner) x ring (outer).

P = U x R ranks of `group`, in group order r = g * U + u:

* Ulysses group g: ranks g*U .. g*U + U - 1 (consecutive, e.g. the GPUs of one node, where the
  all-to-all is cheap);
* ring group u: ranks u, u + U, u + 2U, ... (one per Ulysses group, the ranks that exchange K/V
  blocks across nodes).

`SPMesh(group, ulysses=U)` is collective over `group`: every rank calls it with the same U
(checked on every rank, so a mismatch raises everywhere instead of hanging), and it creates its
subgroups once (`_subgroups` says how, over the whole world and over a smaller group). Only
groups of more than one rank are created; a one-rank dimension is a one-rank `GroupInfo` with
no process group, and a dimension spanning the whole group reuses `group` itself.
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


class SPMesh:
    """Ulysses x ring split of a sequence-parallel group (collective constructor).

    Attributes: `info` (the whole group), `ulysses` / `ring` (this rank's subgroups as
    `GroupInfo`), `ulysses_size` U and `ring_size` R. `get_group(name)` returns the process
    group of "sp" (whole), "ulysses" or "ring" (None for a one-rank dimension).
    """

    def __init__(self, group=None, ulysses: int = 1):
        info = resolve_group(group)
        problem = None
        if isinstance(ulysses, bool) or not isinstance(ulysses, int):
            problem = TypeError(f"ulysses must be an int (the Ulysses degree U), got {ulysses!r}")
        elif ulysses < 1 or info.world % ulysses:
            divisors = [d for d in range(1, info.world + 1) if info.world % d == 0]
            problem = ValueError(f"ulysses={ulysses} must divide the group size {info.world} "
                                 f"(P = ulysses x ring); choose one of {divisors}")
        agree(info, "seqpar.SPMesh", {"ulysses": ulysses if problem is None else -1}, problem,
              torch.device("cpu"))
        self.info = info
        self.ulysses_size = ulysses
        self.ring_size = info.world // ulysses
        rings = self.ring_size
        self.ulysses = _subgroups(info, [[g * ulysses + u for u in range(ulysses)]
                                         for g in range(rings)])
        self.ring = _subgroups(info, [[g * ulysses + u for g in range(rings)]
                                      for u in range(ulysses)])

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.info.group

    def get_group(self, name: str) -> dist.ProcessGroup | None:
        infos = {"sp": self.info, "ulysses": self.ulysses, "ring": self.ring}
        if name not in infos:
            raise ValueError(f"SPMesh.get_group: unknown name {name!r}; choose one of {list(infos)}")
        return infos[name].group

    def __repr__(self) -> str:
        return (f"SPMesh(P={self.info.world}, ulysses={self.ulysses_size}, ring={self.ring_size}, "
                f"rank={self.info.rank})")


__all__ = ["SPMesh"]
