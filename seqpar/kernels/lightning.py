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

from .linear_state import LinearKernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block_decays(s, BLOCK: tl.constexpr):
    """Lambda [BLOCK, BLOCK] and lambda^t [BLOCK] of one block."""
    t = tl.arange(0, BLOCK)
    gap = (t[:, None] - t[None, :]).to(tl.float32)
    intra = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    from_start = tl.exp(-s * t.to(tl.float32))
    return intra, from_start


@triton.jit
def _load_rows(base, rows, row_ok, stride_n, cols, cols_ok):
    """[BLOCK, D_PAD] rows of one (batch, head), masked, as fp32."""
    ptrs = base + rows[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _block_tail(s, row_ok, BLOCK: tl.constexpr):
    """(lambda^(L - t) for valid rows else 0, lambda^L) of a block with L valid rows."""
    t = tl.arange(0, BLOCK)
    length = tl.sum(row_ok.to(tl.int32))
    to_end = tl.where(row_ok, tl.exp(-s * tl.maximum(length - t, 0).to(tl.float32)), 0.0)
    return to_end, tl.exp(-s * length.to(tl.float32))


@triton.jit
def _lightning_fwd(Q, K, V, O, LOG_DECAY, STATE_IN, STATE_OUT, scale, seq_len,
                   stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                   HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_STATE_IN: tl.constexpr, HAS_STATE_OUT: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    s = tl.load(LOG_DECAY + h).to(tl.float32)
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, DK_PAD)
    e = tl.arange(0, DV_PAD)
    d_ok = d < DK
    e_ok = e < DV
    intra, from_start = _block_decays(s, BLOCK)
    state_ptrs = pid * DK * DV + d[:, None] * DV + e[None, :]
    state_ok = d_ok[:, None] & e_ok[None, :]
    if HAS_STATE_IN:
        state = tl.load(STATE_IN + state_ptrs, mask=state_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((DK_PAD, DV_PAD), dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_vb + h * stride_vh
    for start in range(0, seq_len, BLOCK):
        rows = start + t
        row_ok = rows < seq_len
        q = _load_rows(q_base, rows, row_ok, stride_qn, d, d_ok) * scale
        k = _load_rows(k_base, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(v_base, rows, row_ok, stride_vn, e, e_ok)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra
        o = tl.dot(scores, v, input_precision=PRECISION)
        o += tl.dot(q * from_start[:, None], state, input_precision=PRECISION)
        tl.store(o_base + rows[:, None] * stride_vn + e[None, :], o,
                 mask=row_ok[:, None] & e_ok[None, :])
        to_end, across = _block_tail(s, row_ok, BLOCK)
        state = state * across + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PRECISION)
    if HAS_STATE_OUT:
        tl.store(STATE_OUT + state_ptrs, state, mask=state_ok)


@triton.jit
def _lightning_bwd_dq(Q, K, V, DO, DQ, LOG_DECAY, STATE_IN, scale, seq_len,
                      stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                      HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_STATE_IN: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    s = tl.load(LOG_DECAY + h).to(tl.float32)
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, DK_PAD)
    e = tl.arange(0, DV_PAD)
    d_ok = d < DK
    e_ok = e < DV
    intra, from_start = _block_decays(s, BLOCK)
    state_ok = d_ok[:, None] & e_ok[None, :]
    if HAS_STATE_IN:
        state = tl.load(STATE_IN + pid * DK * DV + d[:, None] * DV + e[None, :], mask=state_ok,
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros((DK_PAD, DV_PAD), dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_vb + h * stride_vh
    dq_base = DQ + b * stride_qb + h * stride_qh
    for start in range(0, seq_len, BLOCK):
        rows = start + t
        row_ok = rows < seq_len
        k = _load_rows(k_base, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(v_base, rows, row_ok, stride_vn, e, e_ok)
        do = _load_rows(do_base, rows, row_ok, stride_vn, e, e_ok)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * intra
        dq = tl.dot(dp, k, input_precision=PRECISION)
        dq += tl.dot(do, tl.trans(state), input_precision=PRECISION) * from_start[:, None]
        tl.store(dq_base + rows[:, None] * stride_qn + d[None, :], dq * scale,
                 mask=row_ok[:, None] & d_ok[None, :])
        to_end, across = _block_tail(s, row_ok, BLOCK)
        state = state * across + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PRECISION)


@triton.jit
def _lightning_bwd_dkv(Q, K, V, DO, DK_OUT, DV_OUT, LOG_DECAY, DSTATE_OUT, DSTATE_IN, scale,
                       seq_len, n_blocks,
                       stride_qb, stride_qn, stride_qh, stride_vb, stride_vn, stride_vh,
                       HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_DSTATE_OUT: tl.constexpr, HAS_DSTATE_IN: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    s = tl.load(LOG_DECAY + h).to(tl.float32)
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, DK_PAD)
    e = tl.arange(0, DV_PAD)
    d_ok = d < DK
    e_ok = e < DV
    intra, from_start = _block_decays(s, BLOCK)
    state_ptrs = pid * DK * DV + d[:, None] * DV + e[None, :]
    state_ok = d_ok[:, None] & e_ok[None, :]
    if HAS_DSTATE_OUT:
        grad = tl.load(DSTATE_OUT + state_ptrs, mask=state_ok, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((DK_PAD, DV_PAD), dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_vb + h * stride_vh
    dk_base = DK_OUT + b * stride_qb + h * stride_qh
    dv_base = DV_OUT + b * stride_vb + h * stride_vh
    for i in range(0, n_blocks):
        rows = (n_blocks - 1 - i) * BLOCK + t
        row_ok = rows < seq_len
        q = _load_rows(q_base, rows, row_ok, stride_qn, d, d_ok) * scale
        k = _load_rows(k_base, rows, row_ok, stride_qn, d, d_ok)
        v = _load_rows(v_base, rows, row_ok, stride_vn, e, e_ok)
        do = _load_rows(do_base, rows, row_ok, stride_vn, e, e_ok)
        to_end, across = _block_tail(s, row_ok, BLOCK)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * intra
        dk = tl.dot(tl.trans(dp), q, input_precision=PRECISION)
        dk += tl.dot(v, tl.trans(grad), input_precision=PRECISION) * to_end[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra
        dv = tl.dot(tl.trans(scores), do, input_precision=PRECISION)
        dv += tl.dot(k * to_end[:, None], grad, input_precision=PRECISION)
        tl.store(dk_base + rows[:, None] * stride_qn + d[None, :], dk,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(dv_base + rows[:, None] * stride_vn + e[None, :], dv,
                 mask=row_ok[:, None] & e_ok[None, :])
        grad = grad * across + tl.dot(tl.trans(q * from_start[:, None]), do, input_precision=PRECISION)
    if HAS_DSTATE_IN:
        tl.store(DSTATE_IN + state_ptrs, grad, mask=state_ok)


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@dataclass(frozen=True)
class LightningKernel(LinearKernel):
    """The Triton kernels behind the `LinearKernel` contract; blocks of `block` tokens."""

    block: int = 64
    name: str = "lightning"

    def _meta(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        if q.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"lightning kernel: dtype {q.dtype} is not supported; use one of "
                            f"{[str(d) for d in SUPPORTED_DTYPES]} (fp64 runs the chunked kernel)")
        return dict(HEADS=q.shape[2], DK=q.shape[3], DV=v.shape[3], DK_PAD=_padded(q.shape[3]),
                    DV_PAD=_padded(v.shape[3]), BLOCK=self.block,
                    # fp32 inputs keep fp32 products; half inputs are exact in tf32.
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    @staticmethod
    def _strides(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
        return (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2))

    @staticmethod
    def _state(t, like):
        return like if t is None else t.to(torch.float32).contiguous()

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False):
        meta = self._meta(q, v)
        q, k, v = (t.contiguous() for t in (q, k, v))
        batch, n, heads, dk = q.shape
        o = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        state_out = (torch.empty(batch, heads, dk, v.shape[-1], dtype=torch.float32, device=q.device)
                     if final_state else o)
        _lightning_fwd[(batch * heads,)](
            q, k, v, o, log_decay.to(torch.float32).contiguous(), self._state(initial_state, o),
            state_out, float(scale), n, *self._strides(q, v), **meta,
            HAS_STATE_IN=initial_state is not None, HAS_STATE_OUT=final_state)
        return o, (state_out if final_state else None)

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False):
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
        _lightning_bwd_dq[grid](q, k, v, do, dq, decay, self._state(initial_state, dq), float(scale),
                                n, *strides, **meta, HAS_STATE_IN=initial_state is not None)
        _lightning_bwd_dkv[grid](q, k, v, do, dk_, dv, decay, self._state(dfinal_state, dq),
                                 dstate_in, float(scale), n, triton.cdiv(n, self.block), *strides,
                                 **meta, HAS_DSTATE_OUT=dfinal_state is not None,
                                 HAS_DSTATE_IN=dinitial_state)
        return dq, dk_, dv, (dstate_in if dinitial_state else None)
