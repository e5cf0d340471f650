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

Shapes: q/k [B, n, H, Dk], v [B, n, H, Dv], log_decay [H], states [B, H, Dk, Dv]; results in
the accumulator dtype (fp32; fp64 for fp64 inputs).
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
class ChunkedLinearKernel(LinearKernel):
    """Blocks of `block` tokens, `span_blocks` blocks batched per step."""

    block: int = 64
    span_blocks: int = 16
    name: str = "chunked"

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Token ranges of `span_blocks` blocks each (the last may end inside a block)."""
        step = self.block * self.span_blocks
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        o = torch.empty(batch, n, heads, dv, dtype=acc, device=q.device)
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        for start, end in self._spans(n):
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v))
            scores = (q_s @ k_s.transpose(-1, -2)) * decays.intra
            block_states = (k_s * decays.to_end).transpose(-1, -2) @ v_s
            entering = scan_states(block_states, s, self.block, initial=state)
            _put_span(o, start, scores @ v_s + (q_s * decays.from_start) @ entering)
            state = decays.across * entering[:, :, -1] + block_states[:, :, -1]
        if not final_state:
            return o, None
        _, to_end = chunk_weights(s, n)
        final = outer_sum(k, v, to_end)
        if initial_state is not None:
            final = final + torch.exp(-s * n)[None, :, None, None] * initial_state.to(acc)
        return o, final

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        spans = self._spans(n)

        # Pass 1: the state entering each span.
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        span_entry = []
        for start, end in spans:
            span_entry.append(state)
            _, to_end = chunk_weights(s, end - start)
            state = (torch.exp(-s * (end - start))[None, :, None, None] * state
                     + outer_sum(k[:, start:end], v[:, start:end], to_end))

        # Pass 2, in reverse: gradients, with the running gradient of the state at the span end.
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk_ = torch.empty(k.shape, dtype=acc, device=q.device)
        dv_ = torch.empty(v.shape, dtype=acc, device=q.device)
        state_grad = torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
        for (start, end), entry in zip(reversed(spans), reversed(span_entry)):
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s, do_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v, do))
            dp = (do_s @ v_s.transpose(-1, -2)) * decays.intra
            scores = (q_s @ k_s.transpose(-1, -2)) * decays.intra
            k_out = k_s * decays.to_end
            entering = scan_states(k_out.transpose(-1, -2) @ v_s, s, self.block, initial=entry)
            block_grads = (q_s * decays.from_start).transpose(-1, -2) @ do_s
            leaving = scan_states(block_grads, s, self.block, reverse=True, initial=state_grad)
            inter_dq = (do_s @ entering.transpose(-1, -2)) * decays.from_start
            _put_span(dq, start, (dp @ k_s + inter_dq) * scale)
            inter_dk = (v_s @ leaving.transpose(-1, -2)) * decays.to_end
            _put_span(dk_, start, dp.transpose(-1, -2) @ q_s + inter_dk)
            _put_span(dv_, start, scores.transpose(-1, -2) @ do_s + k_out @ leaving)
            state_grad = decays.across * leaving[:, :, 0] + block_grads[:, :, 0]

        if dfinal_state is not None:
            _, to_end = chunk_weights(s, n)
            dfinal = dfinal_state.to(acc)
            dk_ += times_state(v, dfinal.transpose(-1, -2), to_end)
            dv_ += times_state(k, dfinal, to_end)
            state_grad = state_grad + torch.exp(-s * n)[None, :, None, None] * dfinal
        return dq, dk_, dv_, (state_grad if dinitial_state else None)


__all__ = ["ChunkedLinearKernel"]
