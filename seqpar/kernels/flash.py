"""Triton flash attention, forward and backward, masked by global token positions.

One program handles one (batch, query head) and a tile of BLOCK_M queries (forward, dQ) or one
(batch, key/value head) and a tile of BLOCK_N keys (dK/dV). Scores are kept in base 2 inside
(exp2/log2 are the fast units); lse crosses the boundary in natural log, fp32.

    s_ij  = scale * q_i . k_j                     (q head h reads kv head h // group: GQA
                                                    without materialising repeated K/V)
    s_ij  <- c * tanh(s_ij / c)                   (with a soft cap c)
    visible(i, j): causal / window / same document, by positions (`MaskSpec`, flash_mask.py)
    lse_i = log sum_{visible j} exp(s_ij)         (-inf when row i sees nothing)
    o_i   = sum_{visible j} exp(s_ij - lse_i) v_j (0 when row i sees nothing)

Backward, with the FINAL (o, lse) of the whole attention so per-block gradients are exact:
    p = exp(s - lse),  delta_i = rowsum(do_i * o_i) - dlse_i  (computed by the caller),
    ds = p * (do v^T - delta) * (1 - tanh(s_raw / c)^2 with a soft cap, else 1),
    dq = scale ds k,  dk = scale ds^T q,  dv = p^T do.
dK/dV programs loop over the `group` query heads of their kv head (no atomics, deterministic).
Attention sinks are not the kernel's business: they are applied once, after all partials merge.

Positions (`MaskSpec`): FULL (no mask); ARITHMETIC (qp_i = q_start + i * q_step, kp_j = k_start
+ j * k_step, steps >= 1: contiguous, zigzag halves, striped and ring steps are all of this form,
so a tile visits only the tiles of the other side that can hold a visible pair); EXPLICIT
(position vectors in memory; every tile is visited). Documents: the boundaries `cu_seqlens`.

Head dims 16..256, any value (padded to a power of two inside, masked loads). Inputs fp16,
bf16 or fp32; accumulation in fp32. Addresses in int64. On CPU tensors this runs under the
Triton interpreter (TRITON_INTERPRET=1): there bf16 is upcast to fp32 right after loading
(the interpreter's bf16 arithmetic is wrong) and the autotuner keeps one small config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .flash_mask import (FULL, LOG2E, TOP_LEFT_CAUSAL, MaskMode, MaskSpec, capped_scores,
                         document_spans, mask_args, positions, row_masking, tile_range,
                         visible_pairs)
from .mask import MaskKind, SubBlock
from .plan import PlanKernel, backward_slices, block_slices, softmax_delta

LN2 = 0.6931471805599453
def _configs():
    # The last GPU config is the one every dtype fits in: fp32 at head dim 128 needs 104 KiB of
    # shared memory there (measured ahead of time for sm_80) where the bigger tiles need up to
    # 450 KiB; configs that do not fit a device are skipped by the autotuner (OutOfResources).
    gpu = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
           for m, n, w, s in ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                              (64, 32, 4, 2))]
    # Last: the interpreter's config (small tiles keep the numpy emulation quick).
    return gpu + [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]


def _prune(configs, named_args, **kwargs):
    """The interpreter (CPU tensors) gets exactly one config: it cannot benchmark several.
    Block-sparse runs use tiles of exactly the sparse block. Wide head dims drop the biggest
    tiles (shared memory)."""
    sparse_block = kwargs.get("SPARSE_BLOCK", 0)
    if sparse_block:
        warps = 4 if sparse_block >= 64 else 2
        return [triton.Config({"BLOCK_M": sparse_block, "BLOCK_N": sparse_block},
                              num_warps=1 if named_args["Q"].device.type == "cpu" else warps,
                              num_stages=1 if named_args["Q"].device.type == "cpu" else 3)]
    if named_args["Q"].device.type == "cpu":
        return configs[-1:]
    gpu = configs[:-1]
    if kwargs.get("BLOCK_D", 0) > 128:
        gpu = [c for c in gpu if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or gpu[-1:]
    return gpu


_TUNE = dict(configs=_configs(), prune_configs_by={"early_config_prune": _prune},
             key=["n_q", "n_k", "BLOCK_D", "MASK_MODE", "CAUSAL", "WINDOW", "DOCS", "SOFTCAP",
                  "SPARSE_BLOCK"])


@triton.jit
def _load_tile(base, idx, stride, dims, ok, dim_ok, UPCAST: tl.constexpr):
    """[len(idx), BLOCK_D] tile of rows `idx` (int64 addressing), zero where out of range."""
    tile = tl.load(base + idx[:, None].to(tl.int64) * stride + dims[None, :],
                   mask=ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _key_tile_scores(q, q_pos, row_ok, span_lo, span_hi, k_base, v_base, start, sks, svs, dims,
                     dim_ok, n_k, KPOS, k_start, k_step, scale_log2, cap_log2, window,
                     MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The key tile at `start` seen from a query tile (forward and dQ alike): its K and V
    tiles, the base-2 scores (and tanh of the cap), and which (query, key) pairs are visible."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < n_k
    k = _load_tile(k_base, cols, sks, dims, col_ok, dim_ok, UPCAST)
    v = _load_tile(v_base, cols, svs, dims, col_ok, dim_ok, UPCAST)
    k_pos = positions(k_start, k_step, cols, KPOS, col_ok, MASK_MODE)
    s, t = capped_scores(q, k, scale_log2, cap_log2, SOFTCAP, PRECISION)
    visible = visible_pairs(q_pos, k_pos, row_ok, col_ok, span_lo, span_hi, window,
                       MASK_MODE, CAUSAL, WINDOW, DOCS, True)
    return k, v, s, t, visible


@triton.jit
def _fwd_tile(q, q_pos, row_ok, span_lo, span_hi, m_i, l_i, acc, k_base, v_base, start, sks,
              svs, dims, dim_ok, n_k, KPOS, k_start, k_step, scale_log2, cap_log2, window,
              MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax: returns the updated (row max, row sum, output)."""
    k, v, s, t, visible = _key_tile_scores(
        q, q_pos, row_ok, span_lo, span_hi, k_base, v_base, start, sks, svs, dims, dim_ok, n_k,
        KPOS, k_start, k_step, scale_log2, cap_log2, window, MASK_MODE, CAUSAL, WINDOW, DOCS,
        SOFTCAP, UPCAST, BLOCK_N, PRECISION)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _query_program(pid_m, pid_bh, heads_q, group, n_q, head_dim,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (batch, query head, kv head) and query tile of a forward / dQ program."""
    b = (pid_bh // heads_q).to(tl.int64)
    h = (pid_bh % heads_q).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    return b, h, h // group, rows, dims, rows < n_q, dims < head_dim


@triton.jit
def _key_tiles(ROW_PTR, kvh, s_ptr, pid_m, n_q, n_k, q_start, q_step, k_start, k_step, window,
               span_lo, span_hi, row_ok, MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[first, last): the key tiles a query tile visits -- tile numbers (dense; with arithmetic
    positions only those between its first and last visible key) or positions in its CSR list
    (sparse)."""
    # One return statement: the compiler types every return alike, even in pruned branches.
    if SPARSE_BLOCK > 0:
        first = tl.load(ROW_PTR + kvh * s_ptr + pid_m)
        last = tl.load(ROW_PTR + kvh * s_ptr + pid_m + 1)
    else:
        first = 0
        last = tl.cdiv(n_k, BLOCK_N)
        if MASK_MODE == 1:
            last_row = tl.minimum((pid_m + 1) * BLOCK_M, n_q) - 1
            first, last = tile_range(
                q_start + (pid_m * BLOCK_M).to(tl.int64) * q_step,
                q_start + last_row.to(tl.int64) * q_step, span_lo, span_hi, row_ok,
                k_start, k_step, n_k, window, True, CAUSAL, WINDOW, DOCS, BLOCK_N)
    return first, last


@triton.jit
def _tile_start(IDX, kvh, s_idx, i, SPARSE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First row of the i-th visited tile: i itself (dense) or the i-th CSR entry (sparse)."""
    start = i * BLOCK
    if SPARSE_BLOCK > 0:
        start = tl.load(IDX + kvh * s_idx + i) * BLOCK
    return start


@triton.autotune(**_TUNE)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QPOS, KPOS, CU, ROW_PTR, COL_IDX,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
                s_ptr, s_idx, n_q, n_k, heads_q, group, head_dim, scale_log2, cap_log2,
                q_start, q_step, k_start, k_step, window, n_docs, doc_bits, doc_top,
                MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_D: tl.constexpr, SPARSE_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b, h, kvh, rows, dims, row_ok, dim_ok = _query_program(
        pid_m, tl.program_id(1), heads_q, group, n_q, head_dim, BLOCK_M, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, sqs, dims, row_ok, dim_ok, UPCAST)
    q_pos, span_lo, span_hi = row_masking(rows, row_ok, QPOS, CU, q_start, q_step, n_docs,
                                           doc_bits, doc_top, MASK_MODE, DOCS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    first, last = _key_tiles(ROW_PTR, kvh, s_ptr, pid_m, n_q, n_k, q_start, q_step, k_start,
                             k_step, window, span_lo, span_hi, row_ok, MASK_MODE, CAUSAL, WINDOW,
                             DOCS, SPARSE_BLOCK, BLOCK_M, BLOCK_N)
    for i in range(first, last):
        start = _tile_start(COL_IDX, kvh, s_idx, i, SPARSE_BLOCK, BLOCK_N)
        m_i, l_i, acc = _fwd_tile(q, q_pos, row_ok, span_lo, span_hi, m_i, l_i, acc, k_base,
                                  v_base, start, sks, svs, dims, dim_ok, n_k, KPOS, k_start,
                                  k_step, scale_log2, cap_log2, window, MASK_MODE, CAUSAL,
                                  WINDOW, DOCS, SOFTCAP, UPCAST, BLOCK_N, PRECISION)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + h * soh + rows[:, None].to(tl.int64) * sos + dims[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + b * slb + h * slh + rows, lse, mask=row_ok)


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, b, h, rows, row_ok, dims, dim_ok, sqb, sqs, sqh,
              sdob, sdos, sdoh, slb, slh, UPCAST: tl.constexpr):
    """Query-side operands of the backward: q, do, lse (base 2, -inf rows -> 0) and delta."""
    q = _load_tile(Q + b * sqb + h * sqh, rows, sqs, dims, row_ok, dim_ok, UPCAST)
    do = _load_tile(DO + b * sdob + h * sdoh, rows, sdos, dims, row_ok, dim_ok, UPCAST)
    lse = tl.load(LSE + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    # A row that sees nothing has lse = -inf and no visible key: use 0 so p = 0, not NaN.
    lse_log2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    return q, do, lse_log2, delta


@triton.jit
def _score_grad(p, do, v, delta, t, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """dL/d(raw score): p * (do v^T - delta), times d(c tanh(s / c))/ds = 1 - t^2 with a cap."""
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dkdv_tile(k, v, k_pos, col_ok, span_lo, span_hi, dk, dv, Q, DO, LSE, DELTA, b, h, start,
               dims, dim_ok, sqb, sqs, sqh, sdob, sdos, sdoh, slb, slh, n_q, QPOS, q_start,
               q_step, scale_log2, cap_log2, window,
               MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    q, do, lse_log2, delta = _bwd_rows(Q, DO, LSE, DELTA, b, h, rows, row_ok, dims, dim_ok,
                                       sqb, sqs, sqh, sdob, sdos, sdoh, slb, slh, UPCAST)
    q_pos = positions(q_start, q_step, rows, QPOS, row_ok, MASK_MODE)
    s, t = capped_scores(q, k, scale_log2, cap_log2, SOFTCAP, PRECISION)
    visible = visible_pairs(q_pos, k_pos, row_ok, col_ok, span_lo, span_hi, window,
                       MASK_MODE, CAUSAL, WINDOW, DOCS, False)
    p = tl.where(visible, tl.exp2(s - lse_log2[:, None]), 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    ds = _score_grad(p, do, v, delta, t, SOFTCAP, PRECISION)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(**_TUNE)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QPOS, KPOS, CU, COL_PTR, ROW_IDX,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
                     slb, slh, sdkb, sdks, sdkh, s_ptr, s_idx,
                     n_q, n_k, heads_kv, group, head_dim, scale, scale_log2, cap_log2,
                     q_start, q_step, k_start, k_step, window, n_docs, doc_bits, doc_top,
                     MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_D: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_kv).to(tl.int64)
    kvh = (pid_bh % heads_kv).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < n_k
    dim_ok = dims < head_dim
    k = _load_tile(K + b * skb + kvh * skh, cols, sks, dims, col_ok, dim_ok, UPCAST)
    v = _load_tile(V + b * svb + kvh * svh, cols, svs, dims, col_ok, dim_ok, UPCAST)
    k_pos = positions(k_start, k_step, cols, KPOS, col_ok, MASK_MODE)
    # Document spans of the KEYS: a row is in a key's document iff its position lies in it.
    span_lo = k_pos
    span_hi = k_pos
    if DOCS:
        span_lo, span_hi = document_spans(k_pos, col_ok, CU, n_docs, doc_bits, doc_top)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # [first, last): query tiles (dense: with arithmetic positions only those that can see a
    # key of this tile) or positions in the tile's CSC list (sparse)
    if SPARSE_BLOCK > 0:
        first = tl.load(COL_PTR + kvh * s_ptr + pid_n)
        last = tl.load(COL_PTR + kvh * s_ptr + pid_n + 1)
    else:
        first = 0
        last = tl.cdiv(n_q, BLOCK_M)
        if MASK_MODE == 1:
            last_col = tl.minimum((pid_n + 1) * BLOCK_N, n_k) - 1
            first, last = tile_range(
                k_start + (pid_n * BLOCK_N).to(tl.int64) * k_step,
                k_start + last_col.to(tl.int64) * k_step, span_lo, span_hi, col_ok,
                q_start, q_step, n_q, window, False, CAUSAL, WINDOW, DOCS, BLOCK_M)
    for g in range(group):  # every query head reading this kv head (GQA, no atomics)
        h = kvh * group + g
        for i in range(first, last):
            start = _tile_start(ROW_IDX, kvh, s_idx, i, SPARSE_BLOCK, BLOCK_M)
            dk, dv = _dkdv_tile(k, v, k_pos, col_ok, span_lo, span_hi, dk, dv, Q, DO, LSE, DELTA,
                                b, h, start, dims, dim_ok, sqb, sqs, sqh, sdob, sdos, sdoh, slb,
                                slh, n_q, QPOS, q_start, q_step, scale_log2, cap_log2, window,
                                MASK_MODE, CAUSAL, WINDOW, DOCS, SOFTCAP, UPCAST, BLOCK_M,
                                PRECISION)
    out = b * sdkb + kvh * sdkh + cols[:, None].to(tl.int64) * sdks + dims[None, :]
    tile_ok = col_ok[:, None] & dim_ok[None, :]
    tl.store(DK + out, dk * scale, mask=tile_ok)
    tl.store(DV + out, dv, mask=tile_ok)


@triton.jit
def _dq_tile(q, do, lse_log2, delta, q_pos, row_ok, span_lo, span_hi, dq, k_base, v_base, start,
             sks, svs, dims, dim_ok, n_k, KPOS, k_start, k_step, scale_log2, cap_log2, window,
             MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of dQ: returns dq plus this tile's dS @ K."""
    k, v, s, t, visible = _key_tile_scores(
        q, q_pos, row_ok, span_lo, span_hi, k_base, v_base, start, sks, svs, dims, dim_ok, n_k,
        KPOS, k_start, k_step, scale_log2, cap_log2, window, MASK_MODE, CAUSAL, WINDOW, DOCS,
        SOFTCAP, UPCAST, BLOCK_N, PRECISION)
    p = tl.where(visible, tl.exp2(s - lse_log2[:, None]), 0.0)
    ds = _score_grad(p, do, v, delta, t, SOFTCAP, PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.autotune(**_TUNE)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QPOS, KPOS, CU, ROW_PTR, COL_IDX,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
                   slb, slh, sdqb, sdqs, sdqh, s_ptr, s_idx,
                   n_q, n_k, heads_q, group, head_dim, scale, scale_log2, cap_log2,
                   q_start, q_step, k_start, k_step, window, n_docs, doc_bits, doc_top,
                   MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_D: tl.constexpr, SPARSE_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b, h, kvh, rows, dims, row_ok, dim_ok = _query_program(
        pid_m, tl.program_id(1), heads_q, group, n_q, head_dim, BLOCK_M, BLOCK_D)
    q, do, lse_log2, delta = _bwd_rows(Q, DO, LSE, DELTA, b, h, rows, row_ok, dims, dim_ok,
                                       sqb, sqs, sqh, sdob, sdos, sdoh, slb, slh, UPCAST)
    q_pos, span_lo, span_hi = row_masking(rows, row_ok, QPOS, CU, q_start, q_step, n_docs,
                                           doc_bits, doc_top, MASK_MODE, DOCS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    first, last = _key_tiles(ROW_PTR, kvh, s_ptr, pid_m, n_q, n_k, q_start, q_step, k_start,
                             k_step, window, span_lo, span_hi, row_ok, MASK_MODE, CAUSAL, WINDOW,
                             DOCS, SPARSE_BLOCK, BLOCK_M, BLOCK_N)
    for i in range(first, last):
        start = _tile_start(COL_IDX, kvh, s_idx, i, SPARSE_BLOCK, BLOCK_N)
        dq = _dq_tile(q, do, lse_log2, delta, q_pos, row_ok, span_lo, span_hi, dq, k_base,
                      v_base, start, sks, svs, dims, dim_ok, n_k, KPOS, k_start, k_step,
                      scale_log2, cap_log2, window, MASK_MODE, CAUSAL, WINDOW, DOCS, SOFTCAP,
                      UPCAST, BLOCK_N, PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None].to(tl.int64) * sdqs + dims[None, :],
             dq * scale, mask=row_ok[:, None] & dim_ok[None, :])


# ---------------------------------------------------------------- Python entry points

def _block_d(head_dim: int) -> int:
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernels (1..256)")
    return max(16, triton.next_power_of_2(head_dim))


def _precision(t: torch.Tensor) -> str:
    """fp32 inputs get full-precision products (the GPU default would round them to tf32);
    for fp16/bf16 the choice does not apply."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _upcast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


@dataclass(frozen=True)
class SparseBlocks:
    """Block-sparse structure for one call: tiles of `block_size`; per local kv head a CSR of
    active key blocks per query block (row_ptr [Hkv, nb+1], col_idx [Hkv, nnz]) and its
    transpose (col_ptr, row_idx) for the dK/dV pass. Built by kernels.s2.BlockLists."""

    block_size: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor


def _sparse_args(sparse: SparseBlocks | None, device, transpose: bool = False):
    if sparse is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return (dummy, dummy), (0, 0), 0
    ptr, idx = (sparse.col_ptr, sparse.row_idx) if transpose else (sparse.row_ptr, sparse.col_idx)
    if sparse.block_size < 16:
        raise ValueError(f"block-sparse Triton kernels need block_size >= 16, got {sparse.block_size}")
    return (ptr, idx), (ptr.stride(0), idx.stride(0)), sparse.block_size


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: MaskSpec = FULL, sparse: SparseBlocks | None = None,
              softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (last dim contiguous) -> o like q, lse [B, Hq, Sq]
    fp32, natural log. With `sparse`, only the listed key blocks of each query block are visited
    (the mask still applies inside them); `softcap` c > 0 caps every score at c * tanh(s / c)."""
    batch, n_q, heads_q, head_dim = q.shape
    n_k, heads_kv = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads_q, n_q, dtype=torch.float32, device=q.device)
    index_tensors, (cap_log2, *arith), flags = mask_args(mask, softcap, q.device)
    (ptr, idx), sparse_strides, sparse_block = _sparse_args(sparse, q.device)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads_q)
    _fwd_kernel[grid](q, k, v, o, lse, *index_tensors, ptr, idx,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                      lse.stride(0), lse.stride(1), *sparse_strides,
                      n_q, n_k, heads_q, heads_q // heads_kv, head_dim, scale * LOG2E, cap_log2,
                      *arith, UPCAST=_upcast(q), BLOCK_D=_block_d(head_dim),
                      SPARSE_BLOCK=sparse_block, PRECISION=_precision(q), **flags)
    return o, lse


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              lse: torch.Tensor, delta: torch.Tensor, scale: float, mask: MaskSpec = FULL,
              sparse: SparseBlocks | None = None, softcap: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in fp32 for one block. lse: the FINAL lse [B, Hq, Sq] (natural log);
    delta [B, Hq, Sq] = rowsum(do * o_final) - dlse, computed by the caller; mask and softcap
    as given to flash_fwd."""
    batch, n_q, heads_q, head_dim = q.shape
    n_k, heads_kv = k.shape[1], k.shape[2]
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    index_tensors, (cap_log2, *arith), flags = mask_args(mask, softcap, q.device)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
              lse.stride(0), lse.stride(1))
    group = heads_q // heads_kv
    flags.update(UPCAST=_upcast(q), BLOCK_D=_block_d(head_dim), PRECISION=_precision(q))
    (ptr, idx), strides, sparse_block = _sparse_args(sparse, q.device, transpose=True)
    grid_kv = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads_kv)
    _bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, *index_tensors, ptr, idx, *common,
                              dk.stride(0), dk.stride(1), dk.stride(2), *strides,
                              n_q, n_k, heads_kv, group, head_dim, scale, scale * LOG2E,
                              cap_log2, *arith, SPARSE_BLOCK=sparse_block, **flags)
    (ptr, idx), strides, sparse_block = _sparse_args(sparse, q.device)
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads_q)
    _bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, *index_tensors, ptr, idx, *common,
                           dq.stride(0), dq.stride(1), dq.stride(2), *strides,
                           n_q, n_k, heads_q, group, head_dim, scale, scale * LOG2E, cap_log2,
                           *arith, SPARSE_BLOCK=sparse_block, **flags)
    return dq, dk, dv


# ---------------------------------------------------------------- running a plan

def mask_spec(block: SubBlock, device) -> MaskSpec:
    """The kernel's mask for one plan sub-block, in positions relative to the sub-block (a
    sub-block never spans two documents, so no document boundaries are needed here).

    BAND (local keys j visible to local rows i iff lo <= j - i <= hi) is "query positions i,
    key positions j - hi, causal, window hi - lo + 1": kp <= qp <=> j - i <= hi, and
    qp - kp < hi - lo + 1 <=> j - i >= lo. Both starts are shifted to stay >= 0."""
    if block.kind is MaskKind.FULL:
        return FULL
    if block.kind is MaskKind.CAUSAL:
        return TOP_LEFT_CAUSAL
    if block.kind is MaskKind.BAND:
        q_start = max(0, block.hi)
        return MaskSpec(MaskMode.ARITHMETIC, q_start=q_start, k_start=q_start - block.hi,
                        causal=True, window=block.hi - block.lo + 1)
    return MaskSpec(MaskMode.EXPLICIT, q_pos=torch.tensor(block.q_pos, device=device),
                    k_pos=torch.tensor(block.k_pos, device=device), causal=block.causal,
                    window=block.window)


@dataclass(frozen=True)
class TritonBlockKernel(PlanKernel):
    """Runs a plan of sub-blocks with the Triton flash kernels (every mask kind; fp16, bf16,
    fp32). Outputs come back in the input dtype, lse and gradients in fp32."""

    name: str = "triton"

    def _block_fwd(self, q, k, v, block: SubBlock, scale: float):
        return flash_fwd(*block_slices(q, k, v, block), scale, mask_spec(block, q.device),
                         softcap=block.softcap)

    def _block_bwd(self, do, q, k, v, o, lse, dlse, delta, block: SubBlock, scale: float):
        do_b, q_b, k_b, v_b, o_b, lse_b, dlse_b, delta_b = backward_slices(
            do, q, k, v, o, lse, dlse, delta, block)
        if delta_b is None:
            delta_b = softmax_delta(do_b, o_b, dlse_b)
        return flash_bwd(do_b, q_b, k_b, v_b, lse_b, delta_b, scale, mask_spec(block, q.device),
                         softcap=block.softcap)
