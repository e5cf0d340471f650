"""SPMesh: a sequence-parallel group split in two dimensions, Ulysses (inner) x ring (outer).

P = U x R ranks of `group`, in group order r = g * U + u:

* Ulysses group g: ranks g*U .. g*U + U - 1 (consecutive, e.g. the GPUs of one node, where the
  all-to-all is cheap);
* ring group u: ranks u, u + U, u + 2U, ... (one per Ulysses group, the ranks that exchange K/V
  blocks across nodes).

`SPMesh(group, ulysses=U)` is collective over `group`: every rank calls it with the same U
(checked on every rank, so a mismatch raises everywhere instead of hanging), and it creates its
two subgroups once. Only groups of more than one rank are created; a one-rank dimension is
represented by a one-rank `GroupInfo` with no process group, and a dimension spanning the whole
group reuses `group` itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm.primitives import GroupInfo, agree, resolve_group


def _subgroup(info: GroupInfo, members: list[int]) -> GroupInfo:
    """The GroupInfo of `members` (group ranks of `info`, this rank among them)."""
    if len(members) == 1:
        return GroupInfo(None, 0, 1)
    if len(members) == info.world:
        return info
    ranks = [info.global_rank(r) for r in members]
    # Only the members call new_group for it (local synchronisation): other ranks are busy
    # creating their own subgroups, and `group` may itself be a subgroup of WORLD.
    group = dist.new_group(ranks, use_local_synchronization=True)
    return GroupInfo(group, members.index(info.rank), len(members))


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
        outer, inner = divmod(info.rank, ulysses)
        self.ulysses = _subgroup(info, [outer * ulysses + u for u in range(ulysses)])
        self.ring = _subgroup(info, [g * ulysses + inner for g in range(self.ring_size)])

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
