"""Local block attention in PyTorch: the fast CPU path and a chunked path for any device.

A *plan* (`mask.plan_blocks`) says which dense sub-blocks of (local queries x key block) a
causal rule needs. This module implements one sub-block for `plan.PlanKernel`, which runs a plan
and merges the partial (o, lse) into fp32 accumulators (forward), or adds the sub-blocks'
gradients into fp32 accumulators (backward).

Two implementations of one sub-block, same contract:

* flash   — `aten._scaled_dot_product_flash_attention_for_cpu` and its `_backward`
            (tiled, never materialises the score matrix, returns lse). Runs FULL and CAUSAL
            (top-left) sub-blocks in float32/float64/bfloat16/float16 on CPU, and reversed-
            causal BANDs with rows and keys flipped. GQA is native. No soft cap.
* chunked — plain tensor ops over query x key chunks of at most `CHUNK` x `CHUNK` scores,
            online softmax forward, recomputation backward. Runs every mask kind (BAND and
            explicit POSITIONS element masks are built one chunk at a time, never S x S) and
            soft caps (s -> c tanh(s / c); backward multiplies dS by 1 - tanh^2) on every
            device; the fallback, and the path tests compare with.

`TorchBlockKernel` runs whole plans on the fused op through `batched_blocks`: triangles cut into
squares, same-shaped pieces in one batched call, forward partials merged in one pass.

Backward of a sub-block uses the *final* (o, lse) of the whole attention, so the per-block
gradients sum to the exact gradient:  p = exp(s - lse),  delta = rowsum(do * o) - dlse,
ds = p * (do v^T - delta),  dq = scale ds k,  dk = scale ds^T q,  dv = p^T do.
The output o and `dlse` (gradient flowing into a returned lse) enter only through delta, so a
backward can be given delta (`softmax_delta`) instead of o and dlse: a rank that computes the
gradient of visiting queries (TokenRing) receives their delta, never their output. The flash
op computes delta itself from o; a given delta is fed to it through a stand-in output
(`_output_for_delta`), or by padding the head dim by two columns (`_flash_bwd_with_delta`).

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], o like q, lse [B, Hq, Sq].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import batched_blocks as batched
from .mask import MaskKind, SubBlock
from .merge import merge_into
from .plan import PlanKernel, accumulator_dtype, backward_slices, block_slices, softmax_delta

CHUNK = 512  # rows/cols of scores the chunked path materialises at once (per batch x head)
FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ---------------------------------------------------------------- flash (CPU fused op)

def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: None, or an additive [Sq, Sk] mask in q's dtype (0 / -inf) of one sub-block."""
    out, lse = _flash_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal,
                          attn_mask=mask, scale=scale)
    return out.transpose(1, 2), lse


def flash_bwd(do, q, k, v, o, lse, causal: bool, scale: float, dlse=None, delta=None,
              mask: torch.Tensor | None = None):
    """(dq, dk, dv) of one sub-block. Give o (and dlse, if lse has a gradient), or delta alone.

    The op computes delta = rowsum(do * o) itself and uses o for nothing else, so a given
    delta is fed to it through a stand-in output (`_output_for_delta`), or where none exists
    through two extra head-dim columns (`_flash_bwd_with_delta`).
    """
    if delta is None and dlse is None:
        grads = _flash_cpu_backward(do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2),
                                    v.transpose(1, 2), o.transpose(1, 2), lse.contiguous(), 0.0,
                                    causal, attn_mask=mask, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)
    if delta is None:
        delta = softmax_delta(do, o, dlse)
    stand_in = _output_for_delta(do, delta)
    if stand_in is None:
        return _flash_bwd_with_delta(do, q, k, v, delta, lse, causal, scale, mask)
    return flash_bwd(do, q, k, v, stand_in, lse, causal, scale, mask=mask)


@functools.lru_cache(maxsize=64)
def band_mask(rows: int, keys: int, lo: int, hi: int, dtype: torch.dtype, device: str
              ) -> torch.Tensor:
    """The additive [rows, keys] mask of a BAND sub-block: 0 where lo <= j - i <= hi, -inf
    elsewhere. Sub-block sized (a window's tiles: at most EDGE_TILE x (EDGE_TILE + W)), never
    S x S; tiles of one plan share it."""
    diff = (torch.arange(keys, device=device)[None, :]
            - torch.arange(rows, device=device)[:, None])
    visible = (diff >= lo) & (diff <= hi)
    return torch.zeros(rows, keys, dtype=dtype, device=device).masked_fill(~visible,
                                                                           float("-inf"))


def _output_for_delta(do: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """An output o' in do's dtype with rowsum(do * o') = delta, or None if a row has none.

    o' is zero except in the two columns where |do| is largest: the first carries
    delta / do_j1 rounded to the input precision, the second the remainder / do_j2, so delta
    keeps about twice the input precision (bf16: ~16 bits), as products of two input-precision
    numbers summed in fp32 inside the op. The head dim stays as it is: a padded column costs
    the CPU kernel a whole extra vector (~25% slower at D = 64). A zero row of do fits only a
    zero delta; a row where that fails, or a ratio that overflows, leaves no such o' (None:
    the caller pads instead).
    """
    if do.shape[-1] < 2:
        return None
    acc_dtype = delta.dtype
    target = delta.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    do_acc = do.to(acc_dtype)
    size = do_acc.abs()
    first_size, first_column = size.max(dim=-1, keepdim=True)
    second_size, second_column = size.scatter(-1, first_column, -1.0).max(dim=-1, keepdim=True)
    first, second = do_acc.gather(-1, first_column), do_acc.gather(-1, second_column)
    first_value = torch.where(target != 0, target / first, 0).to(do.dtype)
    remainder = target - first * first_value.to(acc_dtype)
    second_value = torch.where(second_size > 0, remainder / second, 0).to(do.dtype)
    values = torch.cat([first_value, second_value], dim=-1)
    if not torch.isfinite(values).all():
        return None
    return torch.zeros_like(do).scatter_(-1, torch.cat([first_column, second_column], dim=-1),
                                         values)


def _flash_bwd_with_delta(do, q, k, v, delta, lse, causal, scale, mask=None):
    """Run the fused backward with a given delta in place of the output, for any do.

    Appending two head-dim columns -- zeros to q, k, v (scores and do v^T unchanged), zeros
    to o except ones in the new columns, and to do the two numbers hi + lo = delta (hi: delta
    rounded to the input precision, lo: the remainder, so a bf16 delta keeps ~16 bits) --
    makes the op's delta equal to the given one. The extra columns are dropped after.
    """
    pad = torch.nn.functional.pad
    hi = delta.to(do.dtype)
    lo = (delta - hi.to(delta.dtype)).to(do.dtype)
    columns = torch.stack([hi, lo], dim=-1).transpose(1, 2)  # [B, S, H, 2]
    do_aug = torch.cat([do, columns], dim=-1)
    o_aug = torch.cat([torch.zeros_like(do), torch.ones_like(columns)], dim=-1)
    dq, dk, dv = flash_bwd(do_aug, pad(q, (0, 2)), pad(k, (0, 2)), pad(v, (0, 2)), o_aug, lse,
                           causal, scale, mask=mask)
    return dq[..., :-2], dk[..., :-2], dv[..., :-2]


# ---------------------------------------------------------------- chunked (any device)

def _chunk_visibility(block: SubBlock, i0: int, i1: int, j0: int, j1: int, device
                      ) -> torch.Tensor | None:
    """Boolean [i1-i0, j1-j0] visibility of sub-block-local rows/keys; None when all visible.

    Only ever one chunk of the mask: callers skip chunks where nothing is visible
    (`_chunk_is_empty`) before asking.
    """
    if block.kind is MaskKind.FULL:
        return None
    if block.kind in (MaskKind.CAUSAL, MaskKind.BAND):
        lo = -(i1 - 1) if block.kind is MaskKind.CAUSAL else block.lo
        hi = 0 if block.kind is MaskKind.CAUSAL else block.hi
        if j0 - (i1 - 1) >= lo and (j1 - 1) - i0 <= hi:
            return None
        diff = torch.arange(j0, j1, device=device)[None, :] - torch.arange(i0, i1, device=device)[:, None]
        return (diff >= lo) & (diff <= hi)
    rows = torch.tensor(block.q_pos[i0:i1], device=device)
    cols = torch.tensor(block.k_pos[j0:j1], device=device)
    visible = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if block.causal:
        visible &= cols[None, :] <= rows[:, None]
    if block.window is not None:
        visible &= (rows[:, None] - cols[None, :]).abs() < block.window
    return visible


def _chunk_is_empty(block: SubBlock, i0: int, i1: int, j0: int, j1: int) -> bool:
    if block.kind is MaskKind.FULL:
        return False
    if block.kind is MaskKind.CAUSAL:
        return j0 > i1 - 1
    if block.kind is MaskKind.BAND:
        return (j1 - 1) - i0 < block.lo or j0 - (i1 - 1) > block.hi
    q_first, q_last = min(block.q_pos[i0:i1]), max(block.q_pos[i0:i1])
    k_first, k_last = min(block.k_pos[j0:j1]), max(block.k_pos[j0:j1])
    if block.causal and k_first > q_last:
        return True
    return block.window is not None and (q_first - k_last >= block.window
                                         or k_first - q_last >= block.window)


def _scores(q_chunk, k_chunk, scale: float, softcap: float | None):
    """(scores, tanh of the capped scores or None): s = scale q.k, capped to c tanh(s / c)."""
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_chunk, k_chunk) * scale
    if softcap is None:
        return scores, None
    capped = torch.tanh(scores / softcap)
    return capped * softcap, capped


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, S, Hq, D] -> [B, S, Hkv, G, D]: query heads grouped by the K/V head they use."""
    b, s, hq, d = q.shape
    return q.reshape(b, s, hkv, hq // hkv, d)


def chunked_fwd(q, k, v, block: SubBlock, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one sub-block, o in the accumulator dtype. Online softmax over key chunks."""
    acc_dtype = accumulator_dtype(q.dtype)
    b, n, hq, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    o = torch.zeros(b, n, hq, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hq, n), float("-inf"), dtype=acc_dtype, device=q.device)
    qg = _grouped(q, hkv)
    for i0 in range(0, n, CHUNK):
        i1 = min(n, i0 + CHUNK)
        q_chunk = qg[:, i0:i1].to(acc_dtype)
        row_max = torch.full((b, hkv, hq // hkv, i1 - i0), float("-inf"), dtype=acc_dtype,
                             device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(b, i1 - i0, hkv, hq // hkv, d, dtype=acc_dtype, device=q.device)
        for j0 in range(0, m, CHUNK):
            j1 = min(m, j0 + CHUNK)
            if _chunk_is_empty(block, i0, i1, j0, j1):
                continue
            scores, _ = _scores(q_chunk, k[:, j0:j1].to(acc_dtype), scale, block.softcap)
            visible = _chunk_visibility(block, i0, i1, j0, j1, q.device)
            if visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale.permute(0, 3, 1, 2)[..., None] + torch.einsum(
                "bhgqk,bkhd->bqhgd", probs, v[:, j0:j1].to(acc_dtype))
            row_max = new_max
        seen = row_sum > 0
        inv = torch.where(seen, 1.0 / torch.where(seen, row_sum, torch.ones_like(row_sum)),
                          torch.zeros_like(row_sum))
        o[:, i0:i1] = (acc * inv.permute(0, 3, 1, 2)[..., None]).reshape(b, i1 - i0, hq, d)
        chunk_lse = torch.where(seen, row_max + torch.log(torch.where(seen, row_sum, torch.ones_like(row_sum))),
                                torch.full_like(row_sum, float("-inf")))
        lse[:, :, i0:i1] = chunk_lse.reshape(b, hq, i1 - i0)
    return o, lse


def chunked_bwd(do, q, k, v, o, lse, block: SubBlock, scale: float, dlse=None, delta=None):
    """(dq, dk, dv) of one sub-block in the accumulator dtype, from the final lse and either
    the final o (and dlse) or delta."""
    acc_dtype = accumulator_dtype(q.dtype)
    b, n, hq, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    delta = softmax_delta(do, o, dlse) if delta is None else delta.to(acc_dtype)  # [B, Hq, n]
    lse = lse.to(acc_dtype)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(b, n, hkv, g, d, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(b, m, hkv, d, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(b, m, hkv, d, dtype=acc_dtype, device=q.device)
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)
    for i0 in range(0, n, CHUNK):
        i1 = min(n, i0 + CHUNK)
        q_chunk = qg[:, i0:i1].to(acc_dtype)
        do_chunk = dog[:, i0:i1].to(acc_dtype)
        lse_chunk = safe_lse[:, :, i0:i1].reshape(b, hkv, g, i1 - i0)
        delta_chunk = delta[:, :, i0:i1].reshape(b, hkv, g, i1 - i0)
        for j0 in range(0, m, CHUNK):
            j1 = min(m, j0 + CHUNK)
            if _chunk_is_empty(block, i0, i1, j0, j1):
                continue
            k_chunk = k[:, j0:j1].to(acc_dtype)
            v_chunk = v[:, j0:j1].to(acc_dtype)
            scores, tanh = _scores(q_chunk, k_chunk, scale, block.softcap)
            visible = _chunk_visibility(block, i0, i1, j0, j1, q.device)
            if visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.exp(scores - lse_chunk[..., None])
            dv[:, j0:j1] += torch.einsum("bhgqk,bqhgd->bkhd", probs, do_chunk)
            dprobs = torch.einsum("bqhgd,bkhd->bhgqk", do_chunk, v_chunk)
            dscores = probs * (dprobs - delta_chunk[..., None]) * scale
            if tanh is not None:  # d(c tanh(s / c)) / ds = 1 - tanh^2
                dscores = dscores * (1 - tanh * tanh)
            dq[:, i0:i1] += torch.einsum("bhgqk,bkhd->bqhgd", dscores, k_chunk)
            dk[:, j0:j1] += torch.einsum("bhgqk,bqhgd->bkhd", dscores, q_chunk)
    return dq.reshape(b, n, hq, d), dk, dv


# ---------------------------------------------------------------- running a plan

def _flip(*tensors, dim: int = 1):
    """Reverse the token order (dim 1 of [B, S, H, D], dim -1 of [B, H, S]); None stays None."""
    return tuple(None if t is None else t.flip(dim if t.dim() == 4 else -1) for t in tensors)


@dataclass(frozen=True)
class TorchBlockKernel(PlanKernel):
    """Runs a plan of sub-blocks with the CPU flash op (`flash=True`) or the chunked path.

    The flash op runs FULL and CAUSAL sub-blocks, reversed-causal BANDs (a window's lower
    edge) on inputs with rows and keys reversed (it skips the masked tiles), and other BANDs
    with their small additive mask (`band_mask`); POSITIONS, soft-capped scores and dtypes it
    lacks take the chunked path.
    """

    flash: bool
    name: str = "torch"

    def _use_flash(self, block: SubBlock, dtype: torch.dtype) -> bool:
        return (self.flash and block.softcap is None and dtype in FLASH_DTYPES
                and block.kind is not MaskKind.POSITIONS)

    @staticmethod
    def _mask(block: SubBlock, q: torch.Tensor) -> torch.Tensor | None:
        if block.kind is not MaskKind.BAND or block.is_reversed_causal:
            return None
        return band_mask(block.q1 - block.q0, block.k1 - block.k0, block.lo, block.hi, q.dtype,
                         str(q.device))

    # ------------------------------------------------------------ whole plans, batched

    def _splits(self, block: SubBlock, dtype: torch.dtype) -> bool:
        return self._use_flash(block, dtype) and batched.splits(block)

    def _sort(self, blocks, dtype) -> tuple[list[batched.Piece], tuple[SubBlock, ...]]:
        """The fused op's sub-blocks as pieces (`batched_blocks`), and the rest."""
        pieces, others = [], []
        for block in blocks:
            cut = batched.pieces_of(block) if self._use_flash(block, dtype) else None
            if cut is None:
                others.append(block)
            else:
                pieces += cut
        return pieces, tuple(others)

    def _batches(self, pieces, q, k) -> list[batched.Batch]:
        return batched.batches(pieces, q.shape[2] * q.shape[3], 2 * k.shape[2] * k.shape[3],
                               q.device, views=q.shape[0] == 1)

    @staticmethod
    def _batch_mask(batch: batched.Batch, q: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """(is_causal, additive mask) of a batch's kind for the fused op."""
        if batch.kind == batched.UPPER:
            return False, band_mask(batch.rows, batch.keys, 0, batch.keys - 1, q.dtype,
                                    str(q.device))
        return batch.kind == batched.LOWER, None

    def fwd_into(self, acc_o, acc_lse, q, k, v, blocks: tuple[SubBlock, ...], scale: float) -> None:
        """Pieces of the fused op's sub-blocks run in same-shaped batches and are merged in one
        pass (`batched_blocks`); other sub-blocks one by one."""
        pieces, others = self._sort(blocks, q.dtype)
        super().fwd_into(acc_o, acc_lse, q, k, v, others, scale)
        b, parts, held = q.shape[0], [], 0
        for batch in self._batches(pieces, q, k):
            causal, mask = self._batch_mask(batch, q)
            o_b, lse_b = flash_fwd(batched.pick_tokens(q, batch, True),
                                   batched.pick_tokens(k, batch, False),
                                   batched.pick_tokens(v, batch, False), causal, scale, mask)
            span = batch.span()
            if span is not None and o_b.numel() >= batched.MERGE_AT_ONCE:
                (r0, r1), _ = span
                merge_into(acc_o[:, r0:r1], acc_lse[:, :, r0:r1], o_b, lse_b)
                continue
            parts.append((batch.row_index, batched.unbatch_tokens(o_b, b),
                          batched.unbatch_row_stats(lse_b, b)))
            held += o_b.numel()
            if held >= batched.PENDING_ELEMENTS:
                batched.merge_partials(acc_o, acc_lse, parts)
                parts, held = [], 0
        batched.merge_partials(acc_o, acc_lse, parts)

    def bwd_into(self, dq, dk, dv, do, q, k, v, o, lse, dlse, blocks: tuple[SubBlock, ...],
                 scale: float, delta=None) -> None:
        """Pieces of the fused op's sub-blocks run in same-shaped batches, their gradients
        index-added into the accumulators; other sub-blocks one by one."""
        pieces, others = self._sort(blocks, q.dtype)
        super().bwd_into(dq, dk, dv, do, q, k, v, o, lse, dlse, others, scale, delta)
        b = q.shape[0]
        for batch in self._batches(pieces, q, k):
            causal, mask = self._batch_mask(batch, q)
            do_b, q_b, o_b = (None if x is None else batched.pick_tokens(x, batch, True)
                              for x in (do, q, o))
            lse_b, dlse_b, delta_b = (None if x is None else batched.pick_row_stats(x, batch)
                                      for x in (lse, dlse, delta))
            dq_b, dk_b, dv_b = flash_bwd(do_b, q_b, batched.pick_tokens(k, batch, False),
                                         batched.pick_tokens(v, batch, False), o_b, lse_b,
                                         causal, scale, dlse_b, delta_b, mask=mask)
            span = batch.span()
            if span is not None:
                (r0, r1), (k0, k1) = span
                dq[:, r0:r1] += dq_b
                dk[:, k0:k1] += dk_b
                dv[:, k0:k1] += dv_b
                continue
            dq.index_add_(1, batch.row_index, batched.unbatch_tokens(dq_b, b).to(dq.dtype))
            dk.index_add_(1, batch.key_index, batched.unbatch_tokens(dk_b, b).to(dk.dtype))
            dv.index_add_(1, batch.key_index, batched.unbatch_tokens(dv_b, b).to(dv.dtype))

    # ------------------------------------------------------------ one sub-block

    def _block_fwd(self, q, k, v, block: SubBlock, scale: float):
        q_blk, k_blk, v_blk = block_slices(q, k, v, block)
        if not self._use_flash(block, q.dtype):
            return chunked_fwd(q_blk, k_blk, v_blk, block, scale)
        if block.is_reversed_causal:
            o, lse = flash_fwd(*_flip(q_blk, k_blk, v_blk), True, scale)
            return _flip(o, lse)
        return flash_fwd(q_blk, k_blk, v_blk, block.kind is MaskKind.CAUSAL, scale,
                         self._mask(block, q))

    def _block_bwd(self, do, q, k, v, o, lse, dlse, delta, block: SubBlock, scale: float):
        sliced = backward_slices(do, q, k, v, o, lse, dlse, delta, block)
        if not self._use_flash(block, q.dtype):
            return chunked_bwd(*sliced[:6], block, scale, *sliced[6:])
        if block.is_reversed_causal:
            return _flip(*flash_bwd(*_flip(*sliced[:6]), True, scale, *_flip(*sliced[6:])))
        return flash_bwd(*sliced[:6], block.kind is MaskKind.CAUSAL, scale, *sliced[6:],
                         mask=self._mask(block, q))
