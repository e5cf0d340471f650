"""Lightning-style causal linear attention with decay in Triton: the CUDA kernel.

One program per (batch, head) walks the chunk in blocks of BLOCK tokens with the running
[Dk, Dv] state in registers (Lightning Attention-2's intra/inter split; same math as
`linear_chunked`, t = index inside the block, q pre-multiplied by `scale`):

    forward (blocks in order)
        O_b = [(Q_b K_b^T) * Lambda] V_b + (Q_b * lambda^t) S
        S   = lambda^L S + (K_b * lambda^(L - t))^T V_b           L = valid tokens of the block
    dq kernel (blocks in order, S recomputed the same way)
        dQ_b = scale * ([(dO_b V_b^T) * Lambda] K_b + lambda^t * (dO_b S^T))
    dk/dv kernel (blocks in reverse, G = gradient of the state leaving the block; starts at
    the final-state gradient, ends as the initial-state gradient)
        dK_b = [(dO_b V_b^T) * Lambda]^T Q_b + lambda^(L - t) * (V_b G^T)
        dV_b = [(Q_b K_b^T) * Lambda]^T dO_b + (K_b * lambda^(L - t)) G
        G    = lambda^L G + (Q_b * lambda^t)^T dO_b

Documents (`docs` [B, n] int, relative ids as in `linear_state`; HAS_DOCS): per block, with
p = the document of the token before the block (0 for the first block: the initial state's) and
e = that of the block's last valid token, Lambda is masked by [doc_i == doc_j] (Same), the
state reaches only queries with doc_t == p (first), only keys with doc_t == e enter it (last),
and it crosses the block only if e == p (passes):

        O_b = [(Q_b K_b^T) * Lambda * Same] V_b + (Q_b * lambda^t * first) S
        S   = passes lambda^L S + (K_b * lambda^(L - t) * last)^T V_b
        G   = passes lambda^L G + (Q_b * lambda^t * first)^T dO_b

so the final state is that of the chunk's last document and the chain is cut at every
document start. The ids are loaded per block (BLOCK int32 plus two scalars); without documents
the masks are compiled out.

Inputs are loaded and converted to fp32 before any arithmetic (bf16 arithmetic in the Triton
interpreter is wrong, and fp32 accumulation is the house rule); outputs, gradients and states
are fp32. Every decay is exp(-s * distance) with distance >= 0. Head dims are padded to a power
of two (at least 16, tl.dot's minimum) and masked. A ragged last block is masked by row;
its state decay uses its real length L, so the final state is exact.

Tested on CPU under TRITON_INTERPRET=1 (which must be set before this module is imported:
triton reads it when `triton.jit` decorates). Shapes as `linear_state`: q/k [B, n, H, Dk],
v [B, n, H, Dv] (fp16, bf16 or fp32), log_decay [H], states [B, H, Dk, Dv] fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import LIGHTNING_DTYPES, LIGHTNING_MAX_HEAD_DIM
from .linear_state import LinearKernel



@triton.jit
def _program(LOG_DECAY, HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
             DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch and head, its log-decay s, the head-dim columns and their masks,
    Lambda [BLOCK, BLOCK] and lambda^t [BLOCK] of a block, and where its [Dk, Dv] state lives
    in a contiguous [B, H, Dk, Dv] buffer."""
    pid = tl.program_id(0)
    s = tl.load(LOG_DECAY + pid % HEADS).to(tl.float32)
    t = tl.arange(0, BLOCK)
    gap = (t[:, None] - t[None, :]).to(tl.float32)
    intra = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    from_start = tl.exp(-s * t.to(tl.float32))
    d = tl.arange(0, DK_PAD)
    e = tl.arange(0, DV_PAD)
    d_ok = d < DK
    e_ok = e < DV
    state_at = pid * DK * DV + d[:, None] * DV + e[None, :]
    state_ok = d_ok[:, None] & e_ok[None, :]
    return pid // HEADS, pid % HEADS, s, d, e, d_ok, e_ok, intra, from_start, state_at, state_ok


@triton.jit
def _head_offsets(b, h, stride_qb, stride_qh, stride_vb, stride_vh):
    """Where (batch b, head h) starts in a q/k-shaped and in a v-shaped bshd tensor."""
    return b * stride_qb + h * stride_qh, b * stride_vb + h * stride_vh


@triton.jit
def _load_state(STATE, state_at, state_ok, PRESENT: tl.constexpr, DK_PAD: tl.constexpr,
                DV_PAD: tl.constexpr):
    """The fp32 [DK_PAD, DV_PAD] state (or state gradient) passed in, or zeros when none was."""
    if PRESENT:
        state = tl.load(STATE + state_at, mask=state_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((DK_PAD, DV_PAD), dtype=tl.float32)
    return state


@triton.jit
def _load_rows(base, rows, row_ok, stride_n, cols, cols_ok):
    """[BLOCK, D_PAD] rows of one (batch, head), masked, as fp32."""
    ptrs = base + rows[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, rows, row_ok, stride_n, cols, cols_ok, value):
    """Store [BLOCK, D_PAD] fp32 rows of one (batch, head), masked."""
    tl.store(base + rows[:, None] * stride_n + cols[None, :], value,
             mask=row_ok[:, None] & cols_ok[None, :])


@triton.jit
def _block_tail(s, row_ok, BLOCK: tl.constexpr):
    """(lambda^(L - t) for valid rows else 0, lambda^L) of a block with L valid rows."""
    t = tl.arange(0, BLOCK)
    length = tl.sum(row_ok.to(tl.int32))
    to_end = tl.where(row_ok, tl.exp(-s * tl.maximum(length - t, 0).to(tl.float32)), 0.0)
    return to_end, tl.exp(-s * length.to(tl.float32))


@triton.jit
def _documents(DOCS, start, rows, row_ok, seq_len, BLOCK: tl.constexpr):
    """Document masks of the block starting at `start` of one batch entry's ids `DOCS` [n]:
    (Same [BLOCK, BLOCK], first [BLOCK], last [BLOCK], passes), fp32 0/1."""
    doc = tl.load(DOCS + rows, mask=row_ok, other=0)
    before = tl.load(DOCS + tl.maximum(start - 1, 0))
    before = tl.where(start > 0, before, 0)  # the initial state belongs to document 0
    end_doc = tl.load(DOCS + tl.minimum(start + BLOCK, seq_len) - 1)
    same = tl.where(doc[:, None] == doc[None, :], 1.0, 0.0)
    first = tl.where(doc == before, 1.0, 0.0)
    last = tl.where(doc == end_doc, 1.0, 0.0)
    passes = tl.where(end_doc == before, 1.0, 0.0)
    return same, first, last, passes


@triton.jit
def _block_masks(DOCS, start, rows, row_ok, seq_len, intra, from_start, to_end, across,
                 BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The block's intra mask, the weight of the incoming state per row, the weight of each row
    in the outgoing state and the decay across the block -- cut by documents with HAS_DOCS."""
    if HAS_DOCS:
        same, first, last, passes = _documents(DOCS, start, rows, row_ok, seq_len, BLOCK)
        intra = intra * same
        from_start = from_start * first
        to_end = to_end * last
        across = across * passes
    return intra, from_start, to_end, across


@triton.jit
def _lightning_fwd(Q, K, V, O, LOG_DECAY, STATE_IN, STATE_OUT, DOCS, scale, seq_len,
                   stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                   HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_STATE_IN: tl.constexpr, HAS_STATE_OUT: tl.constexpr,
                   HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    b, h, s, d, e, d_ok, e_ok, intra, from_start, state_at, state_ok = _program(
        LOG_DECAY, HEADS, DK, DV, DK_PAD, DV_PAD, BLOCK)
    t = tl.arange(0, BLOCK)
    state = _load_state(STATE_IN, state_at, state_ok, HAS_STATE_IN, DK_PAD, DV_PAD)
    qk_at, v_at = _head_offsets(b, h, stride_qb, stride_qh, stride_vb, stride_vh)
    for start in range(0, seq_len, BLOCK):
        rows = start + t
        row_ok = rows < seq_len
        q = _load_rows(Q + qk_at, rows, row_ok, stride_qn, d, d_ok) * scale
        k = _load_rows(K + qk_at, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(V + v_at, rows, row_ok, stride_vn, e, e_ok)
        to_end, across = _block_tail(s, row_ok, BLOCK)
        block_intra, q_weight, to_end, across = _block_masks(
            DOCS + b * seq_len, start, rows, row_ok, seq_len, intra, from_start, to_end, across,
            BLOCK, HAS_DOCS)
        q_in = q * q_weight[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * block_intra
        o = tl.dot(scores, v, input_precision=PRECISION)
        o += tl.dot(q_in, state, input_precision=PRECISION)
        _store_rows(O + v_at, rows, row_ok, stride_vn, e, e_ok, o)
        state = state * across + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PRECISION)
    if HAS_STATE_OUT:
        tl.store(STATE_OUT + state_at, state, mask=state_ok)


@triton.jit
def _lightning_bwd_dq(Q, K, V, DO, DQ, LOG_DECAY, STATE_IN, DOCS, scale, seq_len,
                      stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                      HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_STATE_IN: tl.constexpr, HAS_DOCS: tl.constexpr,
                      PRECISION: tl.constexpr):
    b, h, s, d, e, d_ok, e_ok, intra, from_start, state_at, state_ok = _program(
        LOG_DECAY, HEADS, DK, DV, DK_PAD, DV_PAD, BLOCK)
    t = tl.arange(0, BLOCK)
    state = _load_state(STATE_IN, state_at, state_ok, HAS_STATE_IN, DK_PAD, DV_PAD)
    qk_at, v_at = _head_offsets(b, h, stride_qb, stride_qh, stride_vb, stride_vh)
    for start in range(0, seq_len, BLOCK):
        rows = start + t
        row_ok = rows < seq_len
        k = _load_rows(K + qk_at, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(V + v_at, rows, row_ok, stride_vn, e, e_ok)
        do = _load_rows(DO + v_at, rows, row_ok, stride_vn, e, e_ok)
        to_end, across = _block_tail(s, row_ok, BLOCK)
        block_intra, q_weight, to_end, across = _block_masks(
            DOCS + b * seq_len, start, rows, row_ok, seq_len, intra, from_start, to_end, across,
            BLOCK, HAS_DOCS)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * block_intra
        dq = tl.dot(dp, k, input_precision=PRECISION)
        dq += tl.dot(do, tl.trans(state), input_precision=PRECISION) * q_weight[:, None]
        _store_rows(DQ + qk_at, rows, row_ok, stride_qn, d, d_ok, dq * scale)
        state = state * across + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PRECISION)


@triton.jit
def _lightning_bwd_dkv(Q, K, V, DO, DK_OUT, DV_OUT, LOG_DECAY, DSTATE_OUT, DSTATE_IN, DOCS,
                       scale, seq_len, n_blocks,
                       stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                       HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_DSTATE_OUT: tl.constexpr, HAS_DSTATE_IN: tl.constexpr,
                       HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    b, h, s, d, e, d_ok, e_ok, intra, from_start, state_at, state_ok = _program(
        LOG_DECAY, HEADS, DK, DV, DK_PAD, DV_PAD, BLOCK)
    t = tl.arange(0, BLOCK)
    grad = _load_state(DSTATE_OUT, state_at, state_ok, HAS_DSTATE_OUT, DK_PAD, DV_PAD)
    qk_at, v_at = _head_offsets(b, h, stride_qb, stride_qh, stride_vb, stride_vh)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK
        rows = start + t
        row_ok = rows < seq_len
        q = _load_rows(Q + qk_at, rows, row_ok, stride_qn, d, d_ok) * scale
        k = _load_rows(K + qk_at, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(V + v_at, rows, row_ok, stride_vn, e, e_ok)
        do = _load_rows(DO + v_at, rows, row_ok, stride_vn, e, e_ok)
        to_end, across = _block_tail(s, row_ok, BLOCK)
        block_intra, q_weight, to_end, across = _block_masks(
            DOCS + b * seq_len, start, rows, row_ok, seq_len, intra, from_start, to_end, across,
            BLOCK, HAS_DOCS)
        q_in = q * q_weight[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * block_intra
        dk = tl.dot(tl.trans(dp), q, input_precision=PRECISION)
        dk += tl.dot(v, tl.trans(grad), input_precision=PRECISION) * to_end[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * block_intra
        dv = tl.dot(tl.trans(scores), do, input_precision=PRECISION)
        dv += tl.dot(k * to_end[:, None], grad, input_precision=PRECISION)
        _store_rows(DK_OUT + qk_at, rows, row_ok, stride_qn, d, d_ok, dk)
        _store_rows(DV_OUT + v_at, rows, row_ok, stride_vn, e, e_ok, dv)
        grad = grad * across + tl.dot(tl.trans(q_in), do, input_precision=PRECISION)
    if HAS_DSTATE_IN:
        tl.store(DSTATE_IN + state_at, grad, mask=state_ok)


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def auto_block(key_dim: int, value_dim: int, dtype: torch.dtype) -> int:
    """Tokens per block, so one program's tiles and state fit an SM's shared memory (227 KiB on
    sm_90, 163 KiB on sm_80). Measured by compiling ahead of time for those targets (largest of
    the three kernels): head dims <= 64, 64-token blocks: fp32 160 KiB, fp16/bf16 112 KiB; head
    dims 128: 64-token blocks need 256-352 KiB (too much), 32-token ones fp32 208 KiB (too much
    for sm_80), fp16/bf16 80 KiB; 16-token ones fp32 136 KiB."""
    if max(_padded(key_dim), _padded(value_dim)) <= 64:
        return 64
    return 16 if dtype == torch.float32 else 32


@dataclass(frozen=True)
class LightningKernel(LinearKernel):
    """The Triton kernels behind the `LinearKernel` contract; blocks of `block` tokens (None:
    `auto_block` from the head dims)."""

    block: int | None = None
    name: str = "lightning"

    def _meta(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        if q.dtype not in LIGHTNING_DTYPES:
            raise TypeError(f"lightning kernel: dtype {q.dtype} is not supported; use one of "
                            f"{[str(d) for d in LIGHTNING_DTYPES]} (fp64 runs the chunked kernel)")
        if max(q.shape[3], v.shape[3]) > LIGHTNING_MAX_HEAD_DIM:
            raise ValueError(f"lightning kernel: head dims Dk={q.shape[3]}, Dv={v.shape[3]}; at "
                             f"most {LIGHTNING_MAX_HEAD_DIM} fit (larger ones run the chunked kernel)")
        block = self.block or auto_block(q.shape[3], v.shape[3], q.dtype)
        return dict(HEADS=q.shape[2], DK=q.shape[3], DV=v.shape[3], DK_PAD=_padded(q.shape[3]),
                    DV_PAD=_padded(v.shape[3]), BLOCK=block,
                    # fp32 inputs keep fp32 products; half inputs are exact in tf32.
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    @staticmethod
    def _strides(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
        return (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2))

    @staticmethod
    def _state(t, like):
        return like if t is None else t.to(torch.float32).contiguous()

    @staticmethod
    def _docs(docs, like):
        """int32 [B, n] document ids (or a placeholder pointer when there are none)."""
        return like if docs is None else docs.to(device=like.device, dtype=torch.int32).contiguous()

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False, docs=None):
        meta = self._meta(q, v)
        q, k, v = (t.contiguous() for t in (q, k, v))
        batch, n, heads, dk = q.shape
        o = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        state_out = (torch.empty(batch, heads, dk, v.shape[-1], dtype=torch.float32, device=q.device)
                     if final_state else o)
        _lightning_fwd[(batch * heads,)](
            q, k, v, o, log_decay.to(torch.float32).contiguous(), self._state(initial_state, o),
            state_out, self._docs(docs, o), float(scale), n, *self._strides(q, v), **meta,
            HAS_STATE_IN=initial_state is not None, HAS_STATE_OUT=final_state,
            HAS_DOCS=docs is not None)
        return o, (state_out if final_state else None)

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False, docs=None):
        meta = self._meta(q, v)
        q, k, v, do = (t.contiguous() for t in (q, k, v, do))
        batch, n, heads, dk = q.shape
        decay = log_decay.to(torch.float32).contiguous()
        dq, dk_ = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        dstate_in = (torch.empty(batch, heads, dk, v.shape[-1], dtype=torch.float32, device=q.device)
                     if dinitial_state else dq)
        grid = (batch * heads,)
        strides = self._strides(q, v)
        doc_ids = self._docs(docs, dq)
        _lightning_bwd_dq[grid](q, k, v, do, dq, decay, self._state(initial_state, dq), doc_ids,
                                float(scale), n, *strides, **meta,
                                HAS_STATE_IN=initial_state is not None, HAS_DOCS=docs is not None)
        _lightning_bwd_dkv[grid](q, k, v, do, dk_, dv, decay, self._state(dfinal_state, dq),
                                 dstate_in, doc_ids, float(scale), n, triton.cdiv(n, meta["BLOCK"]),
                                 *strides, **meta, HAS_DSTATE_OUT=dfinal_state is not None,
                                 HAS_DSTATE_IN=dinitial_state, HAS_DOCS=docs is not None)
        return dq, dk_, dv, (dstate_in if dinitial_state else None)
