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
span, so memory stays O(n) and no S x S (or even span x span) matrix is ever formed.

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
from .torch_cpu import accumulator_dtype


def _blocked(t: torch.Tensor, acc: torch.dtype, padded: int, factor: float = 1.0) -> torch.Tensor:
    """bshd -> [B, H, padded, D] in `acc`, zero-padded at the end, times `factor`."""
    out = t.to(acc).transpose(1, 2)
    out = out * factor if factor != 1.0 else out
    if padded > t.shape[1]:
        out = torch.nn.functional.pad(out, (0, 0, 0, padded - t.shape[1]))
    return out.contiguous()


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
        intra = torch.exp(-log_decay[:, None, None] * gap.clamp(min=0).to(log_decay.dtype)) * (gap >= 0)
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

    def _spans(self, padded: int):
        step = self.block * self.span_blocks
        return [(start, min(start + step, padded)) for start in range(0, padded, step)]

    def _view(self, t: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """[B, H, padded, D] -> the span's blocks [B, H, nb, T, D] (a view)."""
        b, h, _, d = t.shape
        return t[:, :, start:end].view(b, h, (end - start) // self.block, self.block, d)

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        padded = -(-n // self.block) * self.block
        qb, kb, vb = _blocked(q, acc, padded, scale), _blocked(k, acc, padded), _blocked(v, acc, padded)
        decays = _BlockDecays.build(s, self.block)
        o = torch.empty(batch, heads, padded, dv, dtype=acc, device=q.device)
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        for start, end in self._spans(padded):
            q_s, k_s, v_s = (self._view(t, start, end) for t in (qb, kb, vb))
            scores = (q_s @ k_s.transpose(-1, -2)) * decays.intra
            block_states = (k_s * decays.to_end).transpose(-1, -2) @ v_s
            entering = scan_states(block_states, s, self.block, initial=state)
            o_s = scores @ v_s + (q_s * decays.from_start) @ entering
            o[:, :, start:end] = o_s.flatten(2, 3)
            state = decays.across * entering[:, :, -1] + block_states[:, :, -1]
        out = o[:, :, :n].transpose(1, 2).contiguous()
        if not final_state:
            return out, None
        _, to_end = chunk_weights(s, n)
        final = outer_sum(k, v, to_end)
        if initial_state is not None:
            final = final + torch.exp(-s * n)[None, :, None, None] * initial_state.to(acc)
        return out, final

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        padded = -(-n // self.block) * self.block
        qb, kb, vb = _blocked(q, acc, padded, scale), _blocked(k, acc, padded), _blocked(v, acc, padded)
        dob = _blocked(do, acc, padded)
        decays = _BlockDecays.build(s, self.block)
        spans = self._spans(padded)

        # Pass 1: the state entering each span.
        state = (torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
                 if initial_state is None else initial_state.to(acc))
        span_entry = []
        for start, end in spans:
            span_entry.append(state)
            _, to_end = chunk_weights(s, end - start)
            span_k, span_v = kb[:, :, start:end].transpose(1, 2), vb[:, :, start:end].transpose(1, 2)
            state = torch.exp(-s * (end - start))[None, :, None, None] * state + outer_sum(span_k, span_v, to_end)

        # Pass 2, in reverse: gradients, with the running gradient of the state at the span end.
        dq, dk_, dv_ = (torch.empty(batch, heads, padded, d, dtype=acc, device=q.device)
                        for d in (dk, dk, dv))
        state_grad = torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
        for (start, end), entry in zip(reversed(spans), reversed(span_entry)):
            q_s, k_s, v_s, do_s = (self._view(t, start, end) for t in (qb, kb, vb, dob))
            dp = (do_s @ v_s.transpose(-1, -2)) * decays.intra
            scores = (q_s @ k_s.transpose(-1, -2)) * decays.intra
            k_out = k_s * decays.to_end
            block_states = k_out.transpose(-1, -2) @ v_s
            entering = scan_states(block_states, s, self.block, initial=entry)
            block_grads = (q_s * decays.from_start).transpose(-1, -2) @ do_s
            leaving = scan_states(block_grads, s, self.block, reverse=True, initial=state_grad)
            dq[:, :, start:end] = (dp @ k_s + (do_s @ entering.transpose(-1, -2)) * decays.from_start).flatten(2, 3)
            dk_[:, :, start:end] = (dp.transpose(-1, -2) @ q_s
                                    + (v_s @ leaving.transpose(-1, -2)) * decays.to_end).flatten(2, 3)
            dv_[:, :, start:end] = (scores.transpose(-1, -2) @ do_s + k_out @ leaving).flatten(2, 3)
            state_grad = decays.across * leaving[:, :, 0] + block_grads[:, :, 0]

        dq, dk_, dv_ = (t[:, :, :n].transpose(1, 2).contiguous() for t in (dq, dk_, dv_))
        dq = dq * scale
        if dfinal_state is not None:
            _, to_end = chunk_weights(s, n)
            dfinal = dfinal_state.to(acc)
            dk_ = dk_ + times_state(v, dfinal.transpose(-1, -2), to_end)
            dv_ = dv_ + times_state(k, dfinal, to_end)
            state_grad = state_grad + torch.exp(-s * n)[None, :, None, None] * dfinal
        return dq, dk_, dv_, (state_grad if dinitial_state else None)


__all__ = ["ChunkedLinearKernel"]
