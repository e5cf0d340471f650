"""Causal linear attention with decay in PyTorch, chunked: the CPU kernel (any device works).

The chunk of n tokens is cut into blocks of T tokens (Lightning Attention's split). Within a
block the output is a small masked product; across blocks a state carries the past:

    intra   O_b  = [(Q_b K_b^T) * Lambda] V_b,            Lambda_ij = lambda^(i - j) [i >= j]
    inter   O_b += (Q_b * lambda^t) S_b                    S_b: state entering block b
    state   M_b  = (K_b * lambda^(T - t))^T V_b,          S_b = sum_{b' < b} lambda^(T(b-1-b')) M_b'
                                                                 + lambda^(T b) S_in

(q is pre-multiplied by `scale`; t is the index inside the block.) Blocks are processed a span
of `span_blocks` at a time — batched matrix products over the span's blocks and one direct scan
of its block states (`linear_state.scan_states`) — while a running state crosses from span to
span. Only the span being computed is converted to the accumulator dtype and the [B, H, n, D]
layout, so the full-length buffers are just the results: memory O(n), and no S x S (or even
span x span) matrix is ever formed.

Backward, per block (G_b: gradient flowing into M_b, the reverse scan of D_b):

    dP   = (dO_b V_b^T) * Lambda
    dQ_b = dP K_b + lambda^t * (dO_b S_b^T)                          (then times scale)
    dK_b = dP^T Q_b + lambda^(T - t) * (V_b G_b^T)
    dV_b = [(Q_b K_b^T) * Lambda]^T dO_b + (K_b * lambda^(T - t)) G_b
    D_b  = (Q_b * lambda^t)^T dO_b,   G_b = sum_{b' > b} lambda^(T(b'-1-b)) D_b'

A first pass over spans recomputes the span-entry states; a second, in reverse, computes the
gradients with a running state gradient. A ragged last block is zero-padded at the end (padding
sits after every real token, so it changes nothing); the final state and its gradient are taken
directly from the unpadded keys (F = lambda^n S_in + sum_l lambda^(n - l) k_l^T v_l).

Documents (`docs` [B, n], relative ids as in `linear_state`): every Lambda above is also
masked by [doc_i == doc_j]; per block b, with p_b the document of the token before the block
and e_b that of its last token, queries use S_b only where doc_t == p_b (first_t), keys enter M_b
only where doc_t == e_b (last_t), and S_b crosses block b only if e_b == p_b (passes_b):

    O_b  = [(Q_b K_b^T) * Lambda * Same] V_b + (Q_b * lambda^t * first) S_b
    M_b  = (K_b * lambda^(T - t) * last)^T V_b,   S_{b+1} = passes_b lambda^T S_b + M_b
    dQ_b = (dP * Same) K_b + lambda^t first * (dO_b S_b^T)
    dK_b = (dP * Same)^T Q_b + lambda^(T - t) last * (V_b G_b^T)
    dV_b = [(Q_b K_b^T) * Lambda * Same]^T dO_b + (K_b * lambda^(T - t) * last) G_b
    D_b  = (Q_b * lambda^t * first)^T dO_b,   G_{b-1} = passes_b lambda^T G_b + D_b

(the scans over a span take the passes flags, `scan_states(..., passes=)`). A ragged block is
padded with its last document id, so the padding continues the last document. No per-document
loop and no S x S matrix: documents cost one [T, T] mask per block.

Shapes: q/k [B, n, H, Dk], v [B, n, H, Dv], log_decay [H], states [B, H, Dk, Dv], docs [B, n];
results in the accumulator dtype (fp32; fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear_state import LinearKernel, chunk_weights, outer_sum, scan_states, times_state
from .plan import accumulator_dtype


def _span_blocks(t: torch.Tensor, start: int, end: int, block: int, acc: torch.dtype,
                 factor: float = 1.0) -> torch.Tensor:
    """Tokens [start, end) of a bshd tensor as blocks [B, H, nb, T, D] in `acc` (a copy of the
    span only), times `factor`, zero-padded at the end when the sequence stops inside it."""
    part = t[:, start:end].to(acc).transpose(1, 2)
    part = part * factor if factor != 1.0 else part
    padded = -(-(end - start) // block) * block
    if padded > part.shape[2]:
        part = torch.nn.functional.pad(part, (0, 0, 0, padded - part.shape[2]))
    b, h, _, d = part.shape
    return part.contiguous().view(b, h, padded // block, block, d)


def _put_span(out: torch.Tensor, start: int, blocks: torch.Tensor) -> None:
    """Write span blocks [B, H, nb, T, D] into tokens [start, ...) of the bshd `out`."""
    rows = min(out.shape[1] - start, blocks.shape[2] * blocks.shape[3])
    out[:, start:start + rows] = blocks.flatten(2, 3)[:, :, :rows].transpose(1, 2)


@dataclass(frozen=True)
class _BlockDecays:
    """Per-head decays inside one block of T tokens, shaped to broadcast over [B, H, nb, T, .]."""

    intra: torch.Tensor       # [1, H, 1, T, T]  Lambda
    from_start: torch.Tensor  # [1, H, 1, T, 1]  lambda^t
    to_end: torch.Tensor      # [1, H, 1, T, 1]  lambda^(T - t)
    across: torch.Tensor      # [1, H, 1, 1]     lambda^T

    @classmethod
    def build(cls, log_decay: torch.Tensor, block: int) -> "_BlockDecays":
        pos = torch.arange(block, device=log_decay.device)
        gap = pos[:, None] - pos[None, :]
        distance = gap.clamp(min=0).to(log_decay.dtype)
        intra = torch.exp(-log_decay[:, None, None] * distance) * (gap >= 0)
        from_start, to_end = chunk_weights(log_decay, block)
        across = torch.exp(-log_decay * block)
        return cls(intra[None, :, None], from_start.T[None, :, None, :, None],
                   to_end.T[None, :, None, :, None], across[None, :, None, None])


@dataclass(frozen=True)
class _SpanDocuments:
    """Document masks of one span's blocks (`docs` convention of `linear_state`), shaped to
    broadcast over [B, H, nb, T, .]."""

    same: torch.Tensor    # [B, 1, nb, T, T]  [doc_i == doc_j]
    first: torch.Tensor   # [B, 1, nb, T, 1]  [doc_t == document of the token before the block]
    last: torch.Tensor    # [B, 1, nb, T, 1]  [doc_t == document of the block's last token]
    passes: torch.Tensor  # [B, nb] bool      the state entering the block crosses it

    @classmethod
    def build(cls, docs: torch.Tensor, start: int, end: int, block: int, acc: torch.dtype
              ) -> "_SpanDocuments":
        part = docs[:, start:end]
        padded = -(-(end - start) // block) * block
        if padded > part.shape[1]:  # padding continues the last document
            part = torch.cat([part, part[:, -1:].expand(-1, padded - part.shape[1])], dim=1)
        blocks = part.reshape(part.shape[0], padded // block, block)
        before = docs[:, start - 1] if start > 0 else torch.zeros_like(docs[:, 0])
        prev = torch.cat([before[:, None], blocks[:, :-1, -1]], dim=1)  # [B, nb]
        end_doc = blocks[:, :, -1]
        return cls((blocks[..., :, None] == blocks[..., None, :]).to(acc)[:, None],
                   (blocks == prev[..., None]).to(acc)[:, None, ..., None],
                   (blocks == end_doc[..., None]).to(acc)[:, None, ..., None],
                   end_doc == prev)


@dataclass(frozen=True)
class _SpanWeights:
    """The weights one span's blocks use: the decays, masked by documents when there are some."""

    intra: torch.Tensor       # Lambda (* Same)
    from_start: torch.Tensor  # lambda^t (* first)
    to_end: torch.Tensor      # lambda^(T - t) (* last)
    passes: torch.Tensor | None
    across_last: torch.Tensor   # [B or 1, H, 1, 1] lambda^T (* passes of the last block)
    across_first: torch.Tensor  # the same for the first block

    @classmethod
    def build(cls, decays: _BlockDecays, docs: torch.Tensor | None, start: int, end: int,
              block: int) -> "_SpanWeights":
        if docs is None:
            return cls(decays.intra, decays.from_start, decays.to_end, None, decays.across,
                       decays.across)
        masks = _SpanDocuments.build(docs, start, end, block, decays.intra.dtype)
        crossing = masks.passes.to(decays.across.dtype)[:, None, :, None]  # [B, 1, nb, 1]
        return cls(decays.intra * masks.same, decays.from_start * masks.first,
                   decays.to_end * masks.last, masks.passes, decays.across * crossing[:, :, -1],
                   decays.across * crossing[:, :, 0])


def _final_weights(log_decay: torch.Tensor, n: int, docs: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key weights into the final state [n, H] or [B, n, H], carry of the initial state into it
    [B or 1, H, 1, 1]): lambda^(n - l) (* last_l) and lambda^n (* passes)."""
    _, to_end = chunk_weights(log_decay, n)
    carry = torch.exp(-log_decay * n)[None, :, None, None]
    if docs is None:
        return to_end, carry
    last = (docs == docs[:, -1:]).to(to_end.dtype)
    passes = (docs[:, -1] == 0).to(to_end.dtype)[:, None, None, None]
    return to_end[None] * last[..., None], carry * passes


def _span_passes(docs: torch.Tensor | None, start: int, end: int, acc: torch.dtype
                 ) -> torch.Tensor | float:
    """[B, 1, 1, 1]: the state entering tokens [start, end) crosses them (1.0 without docs)."""
    if docs is None:
        return 1.0
    before = docs[:, start - 1] if start > 0 else torch.zeros_like(docs[:, 0])
    return (docs[:, end - 1] == before).to(acc)[:, None, None, None]


@dataclass(frozen=True)
class ChunkedLinearKernel(LinearKernel):
    """Blocks of `block` tokens, `span_blocks` blocks batched per step."""

    block: int = 64
    span_blocks: int = 16
    name: str = "chunked"

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Token ranges of `span_blocks` blocks each (the last may end inside a block)."""
        step = self.block * self.span_blocks
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False, docs=None):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        o = torch.empty(batch, n, heads, dv, dtype=acc, device=q.device)
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        for start, end in self._spans(n):
            w = _SpanWeights.build(decays, docs, start, end, self.block)
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v))
            scores = (q_s @ k_s.transpose(-1, -2)) * w.intra
            block_states = (k_s * w.to_end).transpose(-1, -2) @ v_s
            entering = scan_states(block_states, s, self.block, initial=state, passes=w.passes)
            _put_span(o, start, scores @ v_s + (q_s * w.from_start) @ entering)
            state = w.across_last * entering[:, :, -1] + block_states[:, :, -1]
        if not final_state:
            return o, None
        to_end, carry = _final_weights(s, n, docs)
        final = outer_sum(k, v, to_end)
        if initial_state is not None:
            final = final + carry * initial_state.to(acc)
        return o, final

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False, docs=None):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        spans = self._spans(n)

        # Pass 1: the state entering each span (of the document open there).
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        span_entry = []
        for start, end in spans:
            span_entry.append(state)
            # Keys of the span's last document, decayed to its end (equality of relative ids
            # is all `_final_weights` reads), plus the entering state if it crosses the span.
            to_end, _ = _final_weights(s, end - start, None if docs is None else docs[:, start:end])
            carry = torch.exp(-s * (end - start))[None, :, None, None]
            state = (carry * _span_passes(docs, start, end, acc) * state
                     + outer_sum(k[:, start:end], v[:, start:end], to_end))

        # Pass 2, in reverse: gradients, with the running gradient of the state at the span end.
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk_ = torch.empty(k.shape, dtype=acc, device=q.device)
        dv_ = torch.empty(v.shape, dtype=acc, device=q.device)
        state_grad = torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
        for (start, end), entry in zip(reversed(spans), reversed(span_entry)):
            w = _SpanWeights.build(decays, docs, start, end, self.block)
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s, do_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v, do))
            dp = (do_s @ v_s.transpose(-1, -2)) * w.intra
            scores = (q_s @ k_s.transpose(-1, -2)) * w.intra
            k_out = k_s * w.to_end
            entering = scan_states(k_out.transpose(-1, -2) @ v_s, s, self.block, initial=entry,
                                   passes=w.passes)
            block_grads = (q_s * w.from_start).transpose(-1, -2) @ do_s
            leaving = scan_states(block_grads, s, self.block, reverse=True, initial=state_grad,
                                  passes=w.passes)
            inter_dq = (do_s @ entering.transpose(-1, -2)) * w.from_start
            _put_span(dq, start, (dp @ k_s + inter_dq) * scale)
            inter_dk = (v_s @ leaving.transpose(-1, -2)) * w.to_end
            _put_span(dk_, start, dp.transpose(-1, -2) @ q_s + inter_dk)
            _put_span(dv_, start, scores.transpose(-1, -2) @ do_s + k_out @ leaving)
            state_grad = w.across_first * leaving[:, :, 0] + block_grads[:, :, 0]

        if dfinal_state is not None:
            to_end, carry = _final_weights(s, n, docs)
            dfinal = dfinal_state.to(acc)
            dk_ += times_state(v, dfinal.transpose(-1, -2), to_end)
            dv_ += times_state(k, dfinal, to_end)
            state_grad = state_grad + carry * dfinal
        return dq, dk_, dv_, (state_grad if dinitial_state else None)


__all__ = ["ChunkedLinearKernel"]
