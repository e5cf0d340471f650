"""Running a plan of dense sub-blocks (`mask.plan_blocks`) with any block kernel.

A block kernel implements two methods for ONE sub-block (rows [q0, q1) x keys [k0, k1) under its
mask kind):

    _block_fwd(q, k, v, block, scale) -> (o_blk, lse_blk)
        the partial result of those rows against those keys (o in the input or accumulator
        dtype, lse [B, Hq, rows]);
    _block_bwd(do, q, k, v, o, lse, dlse, delta, block, scale) -> (dq_blk, dk_blk, dv_blk)
        that sub-block's share of the gradients, from the FINAL o / lse of the whole attention
        (so the shares sum to the exact gradient) — o and dlse, or delta = rowsum(do * o) - dlse
        alone when the output lives elsewhere (TokenRing).

`PlanKernel` turns those into what the backends call: merge a plan's partials into fp32
accumulators (`fwd_into`), add its gradients into accumulators (`bwd_into`), or return them in
fresh accumulators (`fwd`, `bwd`; a one-block plan returns the block kernel's own result, without
a zero-fill and a merge). Implementations: `torch_cpu.TorchBlockKernel` (CPU fused op, chunked
PyTorch) and `flash.TritonBlockKernel` (Triton, CUDA).
"""

from __future__ import annotations

import torch

from .mask import SubBlock
from .merge import merge_into


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input precision; fp64 stays fp64 (the reference dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_delta(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """delta = rowsum(do * o) - dlse, [B, H, S] in the accumulator dtype: all a backward needs
    of the output o and of the gradient on lse."""
    acc_dtype = accumulator_dtype(do.dtype)
    delta = (do.to(acc_dtype) * o.to(acc_dtype)).sum(-1).transpose(1, 2)
    return delta if dlse is None else delta - dlse.to(acc_dtype)


class PlanKernel:
    """The plan-running half of a block kernel; subclasses provide `_block_fwd`/`_block_bwd`."""

    def _block_fwd(self, q, k, v, block: SubBlock, scale: float):
        raise NotImplementedError

    def _block_bwd(self, do, q, k, v, o, lse, dlse, delta, block: SubBlock, scale: float):
        raise NotImplementedError

    def _splits(self, block: SubBlock, dtype: torch.dtype) -> bool:
        """Does the kernel run this sub-block as more than one call (then even a one-block plan
        goes through the accumulators)?"""
        return False

    def fwd_into(self, acc_o, acc_lse, q, k, v, blocks: tuple[SubBlock, ...], scale: float) -> None:
        """Attend q to each sub-block's keys and merge the partials into (acc_o, acc_lse)."""
        for block in blocks:
            o_blk, lse_blk = self._block_fwd(q, k, v, block, scale)
            merge_into(acc_o[:, block.q0:block.q1], acc_lse[:, :, block.q0:block.q1], o_blk, lse_blk)

    def bwd_into(self, dq, dk, dv, do, q, k, v, o, lse, dlse, blocks: tuple[SubBlock, ...],
                 scale: float, delta=None) -> None:
        """Add each sub-block's (dq, dk, dv) into the accumulators. o/lse are the final ones.

        Where the output is not at hand, pass o=None, dlse=None and `delta` [B, Hq, Sq]
        (`softmax_delta` of the final output, computed where it lives).
        """
        if (delta is None) == (o is None) or (delta is not None and dlse is not None):
            raise ValueError("bwd_into: pass the final o (and dlse), or delta alone")
        for block in blocks:
            dq_blk, dk_blk, dv_blk = self._block_bwd(do, q, k, v, o, lse, dlse, delta, block, scale)
            dq[:, block.q0:block.q1] += dq_blk
            dk[:, block.k0:block.k1] += dk_blk
            dv[:, block.k0:block.k1] += dv_blk

    def fwd(self, q, k, v, blocks: tuple[SubBlock, ...], scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(o, lse) of a plan in fresh accumulators (accumulator dtype).

        A plan of one sub-block over every query row (the diagonal block of a ring, a whole
        sequence under Ulysses) has nothing to merge: the kernel's own result is the
        accumulator (cast if needed; o may be a strided view), instead of merging it into
        zero-filled accumulators (~5 passes over o and two buffers saved).
        """
        acc_dtype = accumulator_dtype(q.dtype)
        if (len(blocks) == 1 and (blocks[0].q0, blocks[0].q1) == (0, q.shape[1])
                and not self._splits(blocks[0], q.dtype)):
            o_blk, lse_blk = self._block_fwd(q, k, v, blocks[0], scale)
            return o_blk.to(acc_dtype), lse_blk.to(acc_dtype)
        o = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype,
                         device=q.device)
        self.fwd_into(o, lse, q, k, v, blocks, scale)
        return o, lse

    def bwd(self, do, q, k, v, o, lse, dlse, blocks: tuple[SubBlock, ...], scale: float,
            delta=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of a plan in fresh accumulators (accumulator dtype); for one sub-block
        covering every row and key they are the kernel's own (cast if needed), not added into
        zeros. o/dlse or delta as in `bwd_into`."""
        acc_dtype = accumulator_dtype(q.dtype)
        if len(blocks) == 1 and (blocks[0].q0, blocks[0].q1, blocks[0].k0, blocks[0].k1) == (
                0, q.shape[1], 0, k.shape[1]) and not self._splits(blocks[0], q.dtype):
            grads = self._block_bwd(do, q, k, v, o, lse, dlse, delta, blocks[0], scale)
            return tuple(g.to(acc_dtype) for g in grads)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        self.bwd_into(dq, dk, dv, do, q, k, v, o, lse, dlse, blocks, scale, delta)
        return dq, dk, dv


def block_slices(q, k, v, block: SubBlock):
    """The rows and keys of one sub-block."""
    return q[:, block.q0:block.q1], k[:, block.k0:block.k1], v[:, block.k0:block.k1]


def backward_slices(do, q, k, v, o, lse, dlse, delta, block: SubBlock):
    """(do, q, k, v, o, lse, dlse, delta) restricted to one sub-block (None stays None)."""
    rows, keys = slice(block.q0, block.q1), slice(block.k0, block.k1)
    return (do[:, rows], q[:, rows], k[:, keys], v[:, keys],
            None if o is None else o[:, rows], lse[:, :, rows],
            None if dlse is None else dlse[:, :, rows], None if delta is None else delta[:, :, rows])
