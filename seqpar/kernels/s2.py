"""S2-Attention (sparsely-sharded heads): each head attends to its own strided shard of blocks.

Tokens are cut into blocks of `block_size`. Query block i of a head whose KV head has GLOBAL id
h may attend key block j (causal only, j <= i) iff

    i - j < local_blocks                                   (the local window), or
    (j + h * step + head_offset) % vert_stride == 0         (its vertical stripes),

with step = max(1, vert_stride // Hq) (Hq: the model's total query heads) and h = 0 for every
head when `heterogeneous=False`; inside the diagonal block the token-level causal mask applies.
Heads differ only by their residue (h * step + head_offset) mod vert_stride, so with at least
`vert_stride` heterogeneous KV heads the union of the heads covers the whole context, while
each head computes about 1 / vert_stride of the dense work (plus the local window).

Head ids are GLOBAL: after a Ulysses all-to-all a rank holds heads [p*H/P, (p+1)*H/P) and must
build its masks from those ids (`kv_head_ids`), or the heads' shards no longer tile the context.

Offset convention: `head_offset=0` gives head 0 the stripes j = 0, vs, 2vs, ... (dkernel's
convention). Phi-3-small style checkpoints shift every head by one: use `head_offset=1`.

Layouts here are the head-sharded, full-sequence ones: q [B, S, Hq_local, D], k/v
[B, S, Hkv_local, D] in global token order; `kv_head_ids[i]` is the global id of local KV head i.
Two implementations with one contract: a Triton block-sparse kernel (CSR list of active key
blocks per query block; `flash.flash_fwd/bwd` with `sparse=`) and a CPU path that gathers only
the active key blocks of each (head, query block) and runs the local fused kernel on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .mask import MaskKind, SubBlock
from .plan import PlanKernel, accumulator_dtype, softmax_delta


@dataclass(frozen=True)
class S2Pattern:
    block_size: int = 64
    local_blocks: int = 4
    vert_stride: int = 4
    heterogeneous: bool = True
    head_offset: int = 0

    def __post_init__(self):
        def bad(name, value, need):
            raise ValueError(f"S2Pattern: {name}={value!r} is invalid; {need}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block_size", self.block_size, "use a power of two, e.g. 64")
        if isinstance(self.local_blocks, bool) or not isinstance(self.local_blocks, int) or self.local_blocks < 1:
            bad("local_blocks", self.local_blocks, "use an integer >= 1 (1 = the diagonal block only)")
        if isinstance(self.vert_stride, bool) or not isinstance(self.vert_stride, int) or self.vert_stride < 1:
            bad("vert_stride", self.vert_stride, "use an integer >= 1 (1 = dense)")
        if not isinstance(self.heterogeneous, bool):
            bad("heterogeneous", self.heterogeneous, "use True or False")
        if isinstance(self.head_offset, bool) or not isinstance(self.head_offset, int) or self.head_offset < 0:
            bad("head_offset", self.head_offset, "use an integer >= 0 (Phi-3-small style: 1)")

    def residue(self, kv_head: int, num_q_heads: int) -> int:
        """The vertical-stripe residue of a GLOBAL kv head."""
        step = max(1, self.vert_stride // num_q_heads)
        h = kv_head if self.heterogeneous else 0
        return (h * step + self.head_offset) % self.vert_stride

    def check_length(self, seq_len: int) -> None:
        if seq_len % self.block_size:
            padded = -(-seq_len // self.block_size) * self.block_size
            raise ValueError(f"S2Pattern: sequence length {seq_len} is not a multiple of "
                             f"block_size={self.block_size}; pad it to {padded}")


def block_mask(pattern: S2Pattern, num_blocks: int, kv_head_ids: list[int], num_q_heads: int
               ) -> torch.Tensor:
    """bool [len(kv_head_ids), num_blocks, num_blocks]: may query block i attend key block j."""
    i = torch.arange(num_blocks)[:, None]
    j = torch.arange(num_blocks)[None, :]
    causal = j <= i
    local = (i - j) < pattern.local_blocks
    masks = []
    for h in kv_head_ids:
        vertical = (j + pattern.residue(h, num_q_heads)) % pattern.vert_stride == 0
        masks.append(causal & (local | vertical))
    return torch.stack(masks)


def coverage(pattern: S2Pattern, num_blocks: int, num_kv_heads: int, num_q_heads: int) -> float:
    """Fraction of causal (query block, key block) pairs that at least one head attends."""
    union = block_mask(pattern, num_blocks, list(range(num_kv_heads)), num_q_heads).any(0)
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    return union.sum().item() / causal.sum().item()


def warn_if_uncovered(pattern: S2Pattern, num_blocks: int, num_kv_heads: int, num_q_heads: int) -> None:
    """Warn when the union of all heads misses some causal block pairs (context is lost)."""
    covered = coverage(pattern, num_blocks, num_kv_heads, num_q_heads)
    if covered < 1.0:
        warnings.warn(
            f"S2Pattern {pattern}: the union of the {num_kv_heads} kv heads covers only "
            f"{covered:.1%} of the causal block pairs over {num_blocks} blocks (full coverage "
            f"needs at least vert_stride={pattern.vert_stride} heterogeneous heads with distinct "
            f"residues); some tokens are invisible to every head", stacklevel=3)


@dataclass(frozen=True)
class BlockLists:
    """CSR of active key blocks per (local kv head, query block), and its transpose (CSC:
    active query blocks per key block) for the dK/dV pass. int32 tensors."""

    row_ptr: torch.Tensor   # [Hkv, nb + 1]
    col_idx: torch.Tensor   # [Hkv, nnz_max] (padded with -1)
    col_ptr: torch.Tensor   # [Hkv, nb + 1]
    row_idx: torch.Tensor   # [Hkv, nnz_max]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, device) -> "BlockLists":
        def compress(m):  # m [H, rows, cols] -> ptr [H, rows+1], idx [H, nnz_max]
            counts = m.sum(-1)
            ptr = torch.zeros(m.shape[0], m.shape[1] + 1, dtype=torch.int32)
            ptr[:, 1:] = counts.cumsum(-1)
            nnz = int(counts.sum(-1).max().item()) if m.numel() else 0
            idx = torch.full((m.shape[0], max(1, nnz)), -1, dtype=torch.int32)
            for h in range(m.shape[0]):
                cols = m[h].nonzero()[:, 1].to(torch.int32)  # row-major: sorted by row, then col
                idx[h, :cols.numel()] = cols
            return ptr.to(device), idx.to(device)
        row_ptr, col_idx = compress(mask)
        col_ptr, row_idx = compress(mask.transpose(1, 2))
        return cls(row_ptr, col_idx, col_ptr, row_idx)


def _active_blocks(mask_row: torch.Tensor) -> list[int]:
    return mask_row.nonzero().flatten().tolist()


def _gather_index(blocks: list[int], block_size: int, device) -> torch.Tensor:
    starts = torch.tensor(blocks, device=device)[:, None] * block_size
    return (starts + torch.arange(block_size, device=device)).flatten()


def _diagonal_plan(n_keys: int, block_size: int) -> tuple[SubBlock, ...]:
    """Gathered keys end with the diagonal block: everything before it is fully visible."""
    plan = (SubBlock(0, block_size, n_keys - block_size, n_keys, MaskKind.CAUSAL),)
    if n_keys > block_size:
        plan = (SubBlock(0, block_size, 0, n_keys - block_size, MaskKind.FULL),) + plan
    return plan


def _query_blocks(mask: torch.Tensor, heads_q: int, block_size: int, device):
    """For every (local kv head h, query block i): the query heads reading h, the block's rows,
    and the token indices of the key blocks it attends (diagonal block last)."""
    heads_kv, num_blocks = mask.shape[0], mask.shape[1]
    group = heads_q // heads_kv
    for h in range(heads_kv):
        for i in range(num_blocks):
            index = _gather_index(_active_blocks(mask[h, i]), block_size, device)
            yield (h, slice(h * group, (h + 1) * group),
                   slice(i * block_size, (i + 1) * block_size), index)


def s2_fwd_torch(q, k, v, mask: torch.Tensor, block_size: int, scale: float, kernel: PlanKernel):
    """CPU/any-device path: (o, lse) in the accumulator dtype, computing only active blocks."""
    acc_dtype = accumulator_dtype(q.dtype)
    o = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype,
                     device=q.device)
    for h, heads, rows, index in _query_blocks(mask, q.shape[2], block_size, q.device):
        kernel.fwd_into(o[:, rows, heads], lse[:, heads, rows], q[:, rows, heads],
                        k[:, index, h:h + 1], v[:, index, h:h + 1],
                        _diagonal_plan(index.numel(), block_size), scale)
    return o, lse


def s2_bwd_torch(do, q, k, v, o, lse, dlse, mask: torch.Tensor, block_size: int, scale: float,
                 kernel: PlanKernel):
    """(dq, dk, dv) in the accumulator dtype; gathered-key gradients are scattered back."""
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for h, heads, rows, index in _query_blocks(mask, q.shape[2], block_size, q.device):
        dk_sel = torch.zeros((k.shape[0], index.numel(), 1, k.shape[3]), dtype=acc_dtype,
                             device=q.device)
        dv_sel = torch.zeros_like(dk_sel)
        kernel.bwd_into(dq[:, rows, heads], dk_sel, dv_sel, do[:, rows, heads], q[:, rows, heads],
                        k[:, index, h:h + 1], v[:, index, h:h + 1], o[:, rows, heads],
                        lse[:, heads, rows], None if dlse is None else dlse[:, heads, rows],
                        _diagonal_plan(index.numel(), block_size), scale)
        dk[:, :, h:h + 1].index_add_(1, index, dk_sel)
        dv[:, :, h:h + 1].index_add_(1, index, dv_sel)
    return dq, dk, dv


@dataclass(frozen=True, eq=False)
class S2Plan:
    """S2 attention over the full sequence (tokens in global order) on the heads a rank holds:
    the attention a Ulysses plan runs in its middle for backend "s2".

    mask [Hkv_local, nb, nb] is built from the GLOBAL ids of the local K/V heads; the Triton
    kernel walks its CSR lists (`lists`), any other block kernel runs the gathering CPU path.
    """

    pattern: S2Pattern
    mask: torch.Tensor
    lists: BlockLists | None
    scale: float
    kernel: PlanKernel

    @classmethod
    def build(cls, pattern: S2Pattern, seq_len: int, kv_head_ids: list[int], num_q_heads: int,
              scale: float, kernel: PlanKernel, device=None) -> "S2Plan":
        pattern.check_length(seq_len)
        mask = block_mask(pattern, seq_len // pattern.block_size, kv_head_ids, num_q_heads)
        lists = BlockLists.from_mask(mask, device) if kernel.name == "triton" else None
        return cls(pattern, mask, lists, scale, kernel)

    def _sparse(self, device):
        from .flash import SparseBlocks  # triton is optional: only the Triton path needs it
        lists = self.lists
        if lists.row_ptr.device != device:
            lists = BlockLists(*(t.to(device) for t in (lists.row_ptr, lists.col_idx,
                                                          lists.col_ptr, lists.row_idx)))
        return SparseBlocks(self.pattern.block_size, lists.row_ptr, lists.col_idx,
                            lists.col_ptr, lists.row_idx)

    def fwd(self, q, k, v):
        """(o, lse) in the accumulator dtype."""
        if self.lists is None:
            return s2_fwd_torch(q, k, v, self.mask, self.pattern.block_size, self.scale, self.kernel)
        from .flash import TOP_LEFT_CAUSAL, flash_fwd
        o, lse = flash_fwd(q, k, v, self.scale, TOP_LEFT_CAUSAL, self._sparse(q.device))
        return o.to(accumulator_dtype(q.dtype)), lse

    def bwd(self, do, q, k, v, o, lse, dlse):
        """(dq, dk, dv) in the accumulator dtype, from the final o and lse."""
        if self.lists is None:
            return s2_bwd_torch(do, q, k, v, o, lse, dlse, self.mask, self.pattern.block_size,
                                self.scale, self.kernel)
        from .flash import TOP_LEFT_CAUSAL, flash_bwd
        return flash_bwd(do, q, k, v, lse, softmax_delta(do, o, dlse), self.scale,
                         TOP_LEFT_CAUSAL, self._sparse(q.device))


def dense_fraction(mask: torch.Tensor) -> float:
    """Active block pairs / causal block pairs: the compute S2 keeps relative to dense."""
    nb = mask.shape[-1]
    return mask.sum().item() / (mask.shape[0] * nb * (nb + 1) / 2)


__all__ = ["S2Pattern", "S2Plan", "block_mask", "coverage", "warn_if_uncovered", "BlockLists",
           "s2_fwd_torch", "s2_bwd_torch", "dense_fraction"]
