"""Causal linear attention with decay in PyTorch, chunked: the CPU kernel (any device works).

The chunk of n tokens is cut into blocks of T tokens (Lightning Attention's split). Within a
block the output is a small masked product; across blocks a state carries the past:

    intra   O_b  = [(Q_b K_b^T) * Lambda] V_b,            Lambda_ij = lambda^(i - j) [i >= j]
    inter   O_b += (Q_b * lambda^t) S_b                    S_b: state entering block b
    state   M_b  = (K_b * lambda^(T - t))^T V_b,          S_b = sum_{b' < b} lambda^(T(b-1-b')) M_b'
                                                                 + lambda^(T b) S_in

(q is pre-multiplied by `scale`; t is the index inside the block.) Blocks are processed a span
of `span_blocks` at a time: each product is ONE bmm over the span's blocks and heads
([B * H * nb, T, D] operands, small enough to stay in cache), and the scan is the recurrence
S_{b+1} = lambda^T S_b + M_b, one fused multiply-add per block on [B, H, Dk, Dv] states, while
a running state crosses from span to span. Only the span being computed is converted to the
accumulator dtype and the [B, H, n, D] layout (one strided copy in, one out), so the
full-length buffers are the results and the per-block states ([B, H, n / T, Dk, Dv], kept
between passes): memory O(n), and no S x S (or even span x span) matrix is ever formed.

Backward, per block (G_b: gradient flowing into M_b, the reverse scan of D_b):

    dP   = (dO_b V_b^T) * Lambda
    dQ_b = dP K_b + lambda^t * (dO_b S_b^T)                          (then times scale)
    dK_b = dP^T Q_b + lambda^(T - t) * (V_b G_b^T)
    dV_b = [(Q_b K_b^T) * Lambda]^T dO_b + (K_b * lambda^(T - t)) G_b
    D_b  = (Q_b * lambda^t)^T dO_b,   G_b = sum_{b' > b} lambda^(T(b'-1-b)) D_b'

A first pass over spans recomputes the block states M_b and from them the state entering
every block (kept: the second pass needs no scan forward); a second, in reverse, computes the
gradients with a running state gradient; a final-state gradient dF enters that reverse scan as
the gradient leaving the last block. A ragged last block is zero-padded at the end (padding
sits after every real token, so it changes nothing); the final state and its gradient are taken
directly from the unpadded keys (F = lambda^n S_in + sum_l lambda^(n - l) k_l^T v_l).

LASP-2 (`fwd_exchanged` / `bwd_exchanged`, the contract in `linear_state.LinearKernel`): the
chunk's own final state (forward: the scan of the M_b with no state in) or initial-state
gradient (backward: the reverse scan of the D_b) is posted first, the first span's intra-block
products run while it travels, and what arrives (S_in; dF) is folded into the block scans above.
So the exchange adds no product over the chunk: a rank does the same products as one process
over the same tokens (the generic default adds two [n, D] x [D, D] products forward, K^T V and
Q S, and four backward, Q^T dO, dO S^T, V dF^T and K dF).

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

from .linear_state import LinearKernel, chunk_weights, outer_sum, times_state
from .plan import accumulator_dtype


def _span_blocks(t: torch.Tensor, start: int, end: int, block: int, acc: torch.dtype,
                 factor: float = 1.0) -> torch.Tensor:
    """Tokens [start, end) of a bshd tensor as blocks [B, H, nb, T, D] in `acc`: ONE strided
    copy of the span (layout, dtype and `factor` in the same pass), zero-padded at the end when
    the sequence stops inside it."""
    batch, _, heads, dim = t.shape
    rows = end - start
    padded = -(-rows // block) * block
    out = torch.empty(batch, heads, padded, dim, dtype=acc, device=t.device)
    if padded > rows:
        out[:, :, rows:].zero_()
    source = t[:, start:end].transpose(1, 2)
    if factor != 1.0:
        torch.mul(source, factor, out=out[:, :, :rows])
    else:
        out[:, :, :rows].copy_(source)
    return out.view(batch, heads, padded // block, block, dim)


def _put_span(out: torch.Tensor, start: int, blocks: torch.Tensor, factor: float = 1.0) -> None:
    """Write span blocks [B, H, nb, T, D] (times `factor`) into tokens [start, ...) of the bshd
    `out`: one strided copy."""
    rows = min(out.shape[1] - start, blocks.shape[2] * blocks.shape[3])
    source = blocks.flatten(2, 3)[:, :, :rows].transpose(1, 2)
    if factor != 1.0:
        torch.mul(source, factor, out=out[:, start:start + rows])
    else:
        out[:, start:start + rows].copy_(source)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over blocks [..., m, k] x [..., k, n] as one bmm (transposed views go to BLAS as
    flags, without a copy)."""
    lead = a.shape[:-2]
    return torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])).view(
        *lead, a.shape[-2], b.shape[-1])


def _mm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b over blocks, in place (one baddbmm)."""
    flat = out.view(-1, *out.shape[-2:])
    flat.baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out


def _scan_blocks(pieces: torch.Tensor, across: torch.Tensor, initial: torch.Tensor,
                 reverse: bool = False) -> torch.Tensor:
    """The state entering each block: pieces [B, H, nb, d, e] (what each block adds to the state
    leaving it), across [B or 1, H, nb, 1, 1] (the decay lambda^T of each block, times its
    `passes` flag), initial [B, H, d, e] -> [B, H, nb, d, e],

        forward   x_0 = initial,   x_b = across_{b-1} x_{b-1} + pieces_{b-1}
        reverse   x_{nb-1} = initial,   x_b = across_{b+1} x_{b+1} + pieces_{b+1}

    (reverse: `initial` is the gradient leaving the last block). One fused multiply-add per
    block on [B, H, d, e] states: the recurrence itself, O(nb d e), no nb x nb weights."""
    out = torch.empty_like(pieces)
    outs, adds, decays = out.unbind(2), pieces.unbind(2), across.unbind(2)  # views, one call each
    order = range(len(outs) - 1, -1, -1) if reverse else range(len(outs))
    previous = None
    for b in order:
        if previous is None:
            outs[b].copy_(initial)
        else:
            torch.addcmul(adds[previous], decays[previous], outs[previous], out=outs[b])
        previous = b
    return out


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

    intra: torch.Tensor       # Lambda (* Same)                  [1 or B, H, 1 or nb, T, T]
    from_start: torch.Tensor  # lambda^t (* first)               [1 or B, H, 1 or nb, T, 1]
    to_end: torch.Tensor      # lambda^(T - t) (* last)          [1 or B, H, 1 or nb, T, 1]
    across: torch.Tensor      # lambda^T (* passes) per block    [1 or B, H, nb, 1, 1]

    @classmethod
    def build(cls, decays: _BlockDecays, docs: torch.Tensor | None, start: int, end: int,
              block: int) -> "_SpanWeights":
        blocks = -(-(end - start) // block)
        across = decays.across[..., None]  # [1, H, 1, 1, 1]
        if docs is None:
            return cls(decays.intra, decays.from_start, decays.to_end,
                       across.expand(-1, -1, blocks, -1, -1))
        masks = _SpanDocuments.build(docs, start, end, block, decays.intra.dtype)
        crossing = masks.passes.to(across.dtype)[:, None, :, None, None]  # [B, 1, nb, 1, 1]
        return cls(decays.intra * masks.same, decays.from_start * masks.first,
                   decays.to_end * masks.last, across * crossing)


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




@dataclass(frozen=True)
class ChunkedLinearKernel(LinearKernel):
    """Blocks of `block` tokens, `span_blocks` blocks batched per step (one bmm per product
    over all of a span's blocks and heads)."""

    block: int = 64
    span_blocks: int = 16  # 16 x 64 tokens x H heads a bmm: cache-resident, few ops (measured)
    name: str = "chunked"

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Token ranges of `span_blocks` blocks each (the last may end inside a block)."""
        step = self.block * self.span_blocks
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def _weights(self, decays: _BlockDecays, docs, start: int, end: int) -> _SpanWeights:
        return _SpanWeights.build(decays, docs, start, end, self.block)

    # -- the products of one span (blocks [B, H, nb, T, D]; q already times scale)

    @staticmethod
    def _block_states(w: _SpanWeights, k_s, v_s) -> torch.Tensor:
        """M_b = (K_b * lambda^(T - t))^T V_b, [B, H, nb, Dk, Dv]."""
        return _mm((k_s * w.to_end).transpose(-1, -2), v_s)

    @staticmethod
    def _block_grads(w: _SpanWeights, q_s, do_s) -> torch.Tensor:
        """D_b = (Q_b * lambda^t)^T dO_b, [B, H, nb, Dk, Dv]."""
        return _mm((q_s * w.from_start).transpose(-1, -2), do_s)

    def _intra(self, w: _SpanWeights, q_s, k_s, v_s) -> torch.Tensor:
        """[(Q_b K_b^T) * Lambda] V_b: the blocks' own share of the output."""
        scores = _mm(q_s, k_s.transpose(-1, -2)).mul_(w.intra)
        return _mm(scores, v_s)

    def _intra_grads(self, w: _SpanWeights, q_s, k_s, v_s, do_s):
        """The blocks' own shares of (dQ / scale, dK, dV)."""
        dp = _mm(do_s, v_s.transpose(-1, -2)).mul_(w.intra)
        scores = _mm(q_s, k_s.transpose(-1, -2)).mul_(w.intra)
        return _mm(dp, k_s), _mm(dp.transpose(-1, -2), q_s), _mm(scores.transpose(-1, -2), do_s)

    # -- forward

    def fwd(self, q, k, v, log_decay, scale, initial_state=None, final_state=False, docs=None):
        o, _, final = self._forward(q, k, v, log_decay, scale, initial_state, None, final_state,
                                    docs)
        return o, final

    def fwd_exchanged(self, q, k, v, log_decay, scale, post, docs=None):
        """Pass A computes every block's state M_b (kept) and from them the chunk's own final
        state, which `post` sends; the first span's intra-block product runs while it travels;
        pass B adds the states' share with the initial state that arrived folded into the
        block scan, so the exchange costs no extra product over the chunk."""
        o, initial, _ = self._forward(q, k, v, log_decay, scale, None, post, False, docs)
        return o, initial

    def _forward(self, q, k, v, log_decay, scale, initial_state, post, final_state, docs):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        spans = self._spans(n)
        aligned = n % self.block == 0
        zeros = torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)
        block_states, pending = None, None
        if post is not None:  # pass A: the blocks' states and the chunk's own final state
            block_states, state = [], zeros
            for start, end in spans:
                w = self._weights(decays, docs, start, end)
                k_s, v_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v))
                m = self._block_states(w, k_s, v_s)
                entering = _scan_blocks(m, w.across, state)
                state = torch.addcmul(m[:, :, -1], w.across[:, :, -1], entering[:, :, -1])
                block_states.append(m)
            if not aligned:  # the padded last block decays too far: take F directly
                to_end, _ = _final_weights(s, n, docs)
                state = outer_sum(k, v, to_end)
            pending = post(state)
            state = None
        else:
            state = zeros if initial_state is None else initial_state.to(acc)
        initial = state
        o = torch.empty(batch, n, heads, dv, dtype=acc, device=q.device)
        for i, (start, end) in enumerate(spans):
            w = self._weights(decays, docs, start, end)
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v))
            o_s = self._intra(w, q_s, k_s, v_s)
            if pending is not None:  # the exchange travelled during the first intra product
                state = initial = pending.wait().to(acc)
                pending = None
            m = block_states[i] if block_states is not None else self._block_states(w, k_s, v_s)
            entering = _scan_blocks(m, w.across, state)
            _mm_add(o_s, q_s * w.from_start, entering)
            _put_span(o, start, o_s)
            state = torch.addcmul(m[:, :, -1], w.across[:, :, -1], entering[:, :, -1])
        if not final_state:
            return o, initial, None
        if aligned:
            return o, initial, state
        to_end, carry = _final_weights(s, n, docs)
        final = outer_sum(k, v, to_end)
        if initial_state is not None:
            final = final + carry * initial_state.to(acc)
        return o, initial, final

    # -- backward

    def bwd(self, do, q, k, v, log_decay, scale, initial_state=None, dfinal_state=None,
            dinitial_state=False, docs=None):
        return self._backward(do, q, k, v, log_decay, scale, initial_state, dfinal_state,
                              dinitial_state, docs, None)

    def bwd_exchanged(self, do, q, k, v, log_decay, scale, initial_state, post, docs=None):
        """Pass 1 also computes every block's gradient piece D_b and from them the chunk's own
        initial-state gradient, which `post` sends; it returns the gradient of the final state,
        folded into the reverse block scan of pass 2."""
        dq, dk, dv, _ = self._backward(do, q, k, v, log_decay, scale, initial_state, None,
                                       False, docs, post)
        return dq, dk, dv

    def _backward(self, do, q, k, v, log_decay, scale, initial_state, dfinal_state,
                  dinitial_state, docs, post):
        acc = accumulator_dtype(q.dtype)
        batch, n, heads, dk = q.shape
        dv = v.shape[-1]
        s = log_decay.to(acc)
        decays = _BlockDecays.build(s, self.block)
        spans = self._spans(n)
        aligned = n % self.block == 0
        zeros = torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device)

        # Pass 1, in order: the state entering every block (kept for pass 2); with `post`,
        # also every block's gradient piece D_b.
        state = zeros if initial_state is None else initial_state.to(acc)
        entering_states, acrosses = [], []
        block_grads = [] if post is not None else None
        for start, end in spans:
            w = self._weights(decays, docs, start, end)
            k_s, v_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v))
            m = self._block_states(w, k_s, v_s)
            entering = _scan_blocks(m, w.across, state)
            state = torch.addcmul(m[:, :, -1], w.across[:, :, -1], entering[:, :, -1])
            entering_states.append(entering)
            acrosses.append(w.across)
            if block_grads is not None:
                q_s = _span_blocks(q, start, end, self.block, acc, scale)
                block_grads.append(self._block_grads(w, q_s, _span_blocks(do, start, end,
                                                                            self.block, acc)))
        pending = None
        if post is not None:
            # The chunk's own initial-state gradient (none at its end): D_b scanned in reverse.
            grad = zeros
            for pieces, across in zip(reversed(block_grads), reversed(acrosses)):
                leaving = _scan_blocks(pieces, across, grad, reverse=True)
                grad = torch.addcmul(pieces[:, :, 0], across[:, :, 0], leaving[:, :, 0])
            pending = post(grad)
        # dF enters the reverse block scan as the gradient leaving the last block; with a
        # padded last block (which decays too far) it is applied directly after the loop.
        state_grad = dfinal_state.to(acc) if dfinal_state is not None and aligned else zeros

        # Pass 2, in reverse: gradients, with the running gradient of the state at span ends.
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk_ = torch.empty(k.shape, dtype=acc, device=q.device)
        dv_ = torch.empty(v.shape, dtype=acc, device=q.device)
        for i in range(len(spans) - 1, -1, -1):
            start, end = spans[i]
            w = self._weights(decays, docs, start, end)
            q_s = _span_blocks(q, start, end, self.block, acc, scale)
            k_s, v_s, do_s = (_span_blocks(t, start, end, self.block, acc) for t in (k, v, do))
            dq_s, dk_s, dv_s = self._intra_grads(w, q_s, k_s, v_s, do_s)
            if pending is not None and aligned:  # it travelled during the intra products
                state_grad = pending.wait().to(acc)
                pending = None
            entering = entering_states[i]
            pieces = block_grads[i] if block_grads is not None else self._block_grads(w, q_s, do_s)
            leaving = _scan_blocks(pieces, w.across, state_grad, reverse=True)
            _mm_add(dq_s, do_s * w.from_start, entering.transpose(-1, -2))
            _put_span(dq, start, dq_s, scale)
            _mm_add(dk_s, v_s * w.to_end, leaving.transpose(-1, -2))
            _put_span(dk_, start, dk_s)
            _mm_add(dv_s, k_s * w.to_end, leaving)
            _put_span(dv_, start, dv_s)
            state_grad = torch.addcmul(pieces[:, :, 0], w.across[:, :, 0], leaving[:, :, 0])

        if pending is not None:
            dfinal_state = pending.wait()
        if dfinal_state is not None and not aligned:
            to_end, carry = _final_weights(s, n, docs)
            dfinal = dfinal_state.to(acc)
            dk_ += times_state(v, dfinal.transpose(-1, -2), to_end)
            dv_ += times_state(k, dfinal, to_end)
            state_grad = state_grad + carry * dfinal
        return dq, dk_, dv_, (state_grad if dinitial_state else None)


__all__ = ["ChunkedLinearKernel"]
