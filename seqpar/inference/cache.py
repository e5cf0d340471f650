"""The sharded KV cache: each rank keeps the K/V of its own tokens, per layer; nothing is
ever gathered.

P ranks of a sequence-parallel group. After the prefill of a prompt of S tokens with `layout`,
rank r holds, for every layer, K/V [B, S/P, Hkv, D] of exactly the tokens the layout gave it
(`seqpar.positions(S, group, layout)`), in the order the prefill's shards had, together with
their GLOBAL positions [S/P] (int64). Later tokens are appended:

* decode (`append_replicated`): the T new tokens are known on every rank (every rank runs the
  model on them). Each new token, in order, goes to the SHORTEST shard, lowest rank on ties.
  Every rank tracks the length of every shard of the layer (`lengths`), so every rank makes
  the same choice without communicating. After a balanced prefill that is round-robin
  (rank 0, 1, ..., P - 1, 0, ...), and shard lengths never differ by more than one token.
* partial prefill (`append_sharded`): T new tokens sharded with the cache's layout; each rank
  appends its T / P -- balance is kept because every shard grows by the same amount.

Global positions of the cached tokens are known (`positions`), so attention masks (causal,
sliding window) are decided by position, never by where a token happens to be stored.

Storage per layer is a buffer with spare capacity (doubling), so appending one token costs
O(1) amortised instead of a copy of the whole shard. Shapes: k/v [B, n, Hkv, D] (bshd).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..comm.primitives import GroupInfo, resolve_group
from ..layout import BALANCED, check_layout


@dataclass
class LayerShard:
    """One layer's K/V of this rank: the first `length` entries of the buffers are live.

    lengths[p]: tokens of this layer cached on group rank p (every rank knows every length).
    """

    k: torch.Tensor | None = None  # [B, capacity, Hkv, D]
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # [capacity] int64 global positions
    length: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        """Tokens of this layer cached over the whole group."""
        return sum(self.lengths)

    def _reserve(self, extra: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        need = self.length + extra
        if self.k is not None and need <= self.k.shape[1]:
            return
        capacity = max(need, 2 * (self.k.shape[1] if self.k is not None else 0), 16)
        k = like_k.new_empty((like_k.shape[0], capacity) + tuple(like_k.shape[2:]))
        v = like_v.new_empty((like_v.shape[0], capacity) + tuple(like_v.shape[2:]))
        pos = torch.empty(capacity, dtype=torch.int64, device=like_k.device)
        if self.length:
            k[:, :self.length] = self.k[:, :self.length]
            v[:, :self.length] = self.v[:, :self.length]
            pos[:self.length] = self.pos[:self.length]
        self.k, self.v, self.pos = k, v, pos

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append local tokens k/v [B, n, Hkv, D] at global positions pos [n]."""
        n = k.shape[1]
        if n == 0:
            return
        self._reserve(n, k, v)
        self.k[:, self.length:self.length + n] = k
        self.v[:, self.length:self.length + n] = v
        self.pos[self.length:self.length + n] = pos.to(self.pos.device)
        self.length += n


class ShardedKVCache:
    """Per-layer K/V of this rank's tokens for a group and a layout (module docstring).

    group: what `seqpar.attention` takes (None = WORLD, a ProcessGroup, or a seqpar.SPMesh);
    layout: the layout of the prefill (and of partial prefills), checked on every call.
    Layers are created on first use. Not thread-safe; one cache per sequence batch.
    """

    def __init__(self, group=None, layout: str = "zigzag"):
        check_layout(layout, "ShardedKVCache")
        if layout == BALANCED:
            raise ValueError("ShardedKVCache: layout='balanced' places a packed training batch's "
                             "documents; a cache serves one prompt: use layout='zigzag' or "
                             "'contiguous'")
        self.group = group
        self.info: GroupInfo = resolve_group(group)
        self.layout = layout
        self.layers: list[LayerShard] = []
        # the decode call shape every rank agreed on in a full check (`decode._Step`)
        self.decode_agreed = None

    def __repr__(self) -> str:
        return (f"ShardedKVCache(rank {self.info.rank} of {self.info.world}, layout="
                f"{self.layout!r}, layers={len(self.layers)}, "
                f"seq_len={self.seq_len(0) if self.layers else 0})")

    def layer(self, index: int) -> LayerShard:
        while len(self.layers) <= index:
            self.layers.append(LayerShard(lengths=[0] * self.info.world))
        return self.layers[index]

    def has(self, index: int) -> bool:
        """Does layer `index` hold any token (was it prefilled)?"""
        return index < len(self.layers) and self.layers[index].seq_len > 0

    def seq_len(self, index: int = 0) -> int:
        """Global number of tokens cached for layer `index` (0 before its prefill)."""
        return self.layers[index].seq_len if index < len(self.layers) else 0

    def keys(self, index: int) -> torch.Tensor:
        """This rank's cached keys of layer `index`, [B, n, Hkv, D] (a view)."""
        shard = self.layers[index]
        return shard.k[:, :shard.length]

    def values(self, index: int) -> torch.Tensor:
        shard = self.layers[index]
        return shard.v[:, :shard.length]

    def positions(self, index: int) -> torch.Tensor:
        """Global positions [n] (int64) of this rank's cached tokens of layer `index`."""
        shard = self.layers[index]
        return shard.pos[:shard.length]

    def owners(self, index: int, count: int) -> list[int]:
        """Which rank keeps each of the next `count` replicated tokens: the shortest shard,
        lowest rank on ties (the balance rule of the module docstring)."""
        lengths = list(self.layer(index).lengths)
        owners = []
        for _ in range(count):
            owner = min(range(len(lengths)), key=lambda p: (lengths[p], p))
            owners.append(owner)
            lengths[owner] += 1
        return owners

    def append_replicated(self, index: int, k: torch.Tensor, v: torch.Tensor,
                          pos: torch.Tensor) -> None:
        """Tokens every rank holds (decode): k/v [B, T, Hkv, D] at global positions pos [T];
        each is kept by its owner only (`owners`)."""
        shard = self.layer(index)
        owners = self.owners(index, k.shape[1])
        mine = [t for t, owner in enumerate(owners) if owner == self.info.rank]
        if mine:
            keep = torch.tensor(mine, dtype=torch.long, device=k.device)
            shard.write(k.index_select(1, keep), v.index_select(1, keep),
                        pos.index_select(0, keep.to(pos.device)))
        for owner in owners:
            shard.lengths[owner] += 1

    def append_sharded(self, index: int, k_local: torch.Tensor, v_local: torch.Tensor,
                       pos_local: torch.Tensor) -> None:
        """This rank's shard of tokens every rank shards alike (prefill, partial prefill):
        every rank appends the same count, k_local.shape[1]."""
        shard = self.layer(index)
        shard.write(k_local, v_local, pos_local)
        for p in range(self.info.world):
            shard.lengths[p] += k_local.shape[1]
