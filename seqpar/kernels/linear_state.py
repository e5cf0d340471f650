"""The state algebra of linear attention with per-head decay, and the local-kernel contract.

Linear attention (DESIGN §2), per head with log-decay s >= 0 and lambda = exp(-s):

    causal:      o_i = sum_{j <= i} lambda^(i - j) * scale * (q_i . k_j) v_j
    bidirectional (non-causal): the same over all j with lambda^|i - j|

A *state* is a [B, H, Dk, Dv] matrix standing for the keys and values of tokens outside a chunk,
already decayed to the chunk boundary it enters by. For a chunk of n tokens starting at global
position a (local index l in [0, n)):

    prefix state at the chunk start   S = sum_{j < a} lambda^(a - j) k_j^T v_j
    its share of a chunk query        o_l += scale * lambda^l * q_l S            (`times_state`)
    the chunk's share of later ones   M = sum_l lambda^(n - l) k_l^T v_l         (`outer_sum`)
    the state at the chunk end        F = lambda^n S + M

Chunks of equal length C combine by an exclusive scan, S_c = sum_{c' < c} lambda^(C(c-1-c')) M_c'
(`scan_states`); the gradients flow through the same scan reversed. The suffix direction of
bidirectional attention is this algebra on the reversed sequence (weights flipped).

Every weight is exp(-s * distance) with distance >= 0, computed directly: strong decays
underflow to exactly 0, and nothing is ever written as lambda^(+t) * lambda^(-t) (which
overflows for long spans).

Documents (packed sequences, DESIGN §4 "Masks"): key j reaches query i only inside one
document, weight lambda^(i - j) [doc_i == doc_j]. A chunk describes its tokens by `docs`, an
int tensor [B, n] of document ids *relative to the state entering it*: non-decreasing, 0 for
the tokens of the document that was open when the chunk began (the one the entering state S
belongs to), +1 at every document start (a chunk whose first token starts a document has
docs[:, 0] = 1; `relative_documents` builds them from global boundaries). Then, per token,

    first_l = [docs_l == 0]            query l may use S:   o_l += scale lambda^l first_l q_l S
    last_l  = [docs_l == docs_{n-1}]   key l is in M:       M = sum_l lambda^(n-l) last_l k_l^T v_l
    passes  = [docs_{n-1} == 0]        S crosses the chunk: F = passes lambda^n S + M

so a state is always the state of ONE document (that of the token just before the boundary it
sits at), and the chain is cut at every document start: across pieces, the decayed scan only
multiplies in the `passes` flags of the pieces a state crosses (`scan_states(..., passes=)`).
For the reversed (suffix) direction the same holds on the reversed sequence.

`LinearKernel` is what a local kernel provides: causal linear attention of one chunk with an
optional initial state in and the final state out (`fwd` / `bwd`), from which it derives the
zero-state chunk computation, causal or bidirectional, that LASP-2 overlaps with its all-gather
(`intra_fwd` / `intra_bwd`). Kernels return results in the accumulator dtype (fp32; fp64 for
fp64 inputs). Shapes: q/k [B, n, H, Dk], v [B, n, H, Dv], log_decay [H], states [B, H, Dk, Dv].
"""

from __future__ import annotations

import torch

from .plan import accumulator_dtype


def decay_powers(log_decay: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """[len(distances), H] weights lambda_h^distance = exp(-s_h * distance), distances >= 0."""
    return torch.exp(-log_decay[None, :] * distances.to(log_decay.dtype)[:, None])


def chunk_weights(log_decay: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(from_start, to_end), each [n, H]: lambda^l (a state entering at the chunk start, seen by
    query l) and lambda^(n - l) (key l's weight in the state leaving at the chunk end).
    Flipped along n they are the same weights for the reversed (suffix) direction."""
    pos = torch.arange(n, device=log_decay.device)
    return decay_powers(log_decay, pos), decay_powers(log_decay, n - pos)


def outer_sum(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_l w_l a_l^T b_l per (batch, head): a [B, n, H, Da], b [B, n, H, Db], w [n, H] (or
    [B, n, H]: per batch entry, e.g. masked by documents) -> [B, H, Da, Db], in the accumulator
    dtype."""
    acc = accumulator_dtype(a.dtype)
    a = a.to(acc) if weights is None else a.to(acc) * weights[..., None]
    return torch.einsum("bnhd,bnhe->bhde", a, b.to(acc))


def times_state(a: torch.Tensor, state: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """w_l * a_l @ state per (batch, head): a [B, n, H, Da], state [B, H, Da, Db], w [n, H] or
    [B, n, H] -> [B, n, H, Db], in the state's dtype."""
    out = torch.einsum("bnhd,bhde->bnhe", a.to(state.dtype), state)
    return out if weights is None else out * weights[..., None]


def _blocked(passes: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For pieces with `passes` [B, N] (a state crosses piece p iff passes[:, p]): (between
    [B, N, N], initial [B, N]) booleans. Forward: between[c, x] = every piece strictly between x
    and c passes; initial[c] = pieces 0..c-1 pass. Reverse: between[c, x] for x > c, initial[c]
    = pieces c+1..N-1 pass (the initial state sits after the last piece)."""
    count = passes.shape[-1]
    stops = torch.nn.functional.pad((~passes).to(torch.int64).cumsum(-1), (1, 0))  # stops before p
    idx = torch.arange(count, device=passes.device)
    if reverse:  # pieces c+1 .. x-1, and c+1 .. N-1
        between = stops[:, idx][:, None, :] - stops[:, idx + 1][:, :, None] == 0
        initial = stops[:, count:] - stops[:, idx + 1] == 0
    else:        # pieces x+1 .. c-1, and 0 .. c-1
        between = stops[:, idx][:, :, None] - stops[:, idx + 1][:, None, :] == 0
        initial = stops[:, idx] == 0
    return between, initial


def scan_weights(count: int, step: int, log_decay: torch.Tensor, reverse: bool,
                 passes: torch.Tensor | None = None) -> torch.Tensor:
    """[H, count, count] weights of an exclusive decayed scan over `count` pieces of `step`
    tokens: w[c, c'] = lambda^(step (c - 1 - c')) for c' < c (reverse: lambda^(step (c' - 1 - c))
    for c' > c), else 0. With documents, passes [B, count] (bool): [B, H, count, count], times
    [every piece between c' and c passes]."""
    idx = torch.arange(count, device=log_decay.device)
    gap = idx[:, None] - idx[None, :] - 1
    if reverse:
        gap = gap.T
    keep = gap >= 0
    distance = step * gap.clamp(min=0).to(log_decay.dtype)
    weights = torch.exp(-log_decay[:, None, None] * distance) * keep
    if passes is None:
        return weights
    between, _ = _blocked(passes, reverse)
    return weights[None] * between[:, None]


def scan_states(pieces: torch.Tensor, log_decay: torch.Tensor, step: int, reverse: bool = False,
                initial: torch.Tensor | None = None, passes: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Exclusive decayed scan over pieces of `step` tokens: pieces [B, H, N, Dk, Dv] -> the
    state entering each piece, [B, H, N, Dk, Dv].

    Forward: x_c = sum_{c' < c} lambda^(step (c-1-c')) m_c' + lambda^(step c) initial, with
    `initial` the state at the start of piece 0. Reverse: x_c = sum_{c' > c}
    lambda^(step (c'-1-c)) m_c' + lambda^(step (N-1-c)) initial, `initial` at the end of the last
    piece (the gradient flowing back into it). Documents: passes [B, N] bool (or [1, N]); a term
    counts only if every piece it crosses on its way to c passes (the chain is cut at a piece
    that holds a document start). Direct weights, O(N^2): for small N only.
    """
    count = pieces.shape[2]
    s = log_decay.to(pieces.dtype)
    weights = scan_weights(count, step, s, reverse, passes)
    equation = "hcx,bhxde->bhcde" if passes is None else "bhcx,bhxde->bhcde"
    out = torch.einsum(equation, weights, pieces)
    if initial is not None:
        idx = torch.arange(count, device=pieces.device)
        hops = count - 1 - idx if reverse else idx
        carry = torch.exp(-s[:, None] * step * hops.to(pieces.dtype))[None]  # [1, H, N]
        if passes is not None:
            carry = carry * _blocked(passes, reverse)[1][:, None]
        out = out + carry[..., None, None] * initial[:, :, None]
    return out


def relative_documents(doc_ids: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Global document ids of the tokens of pieces [B, n] and of the token just before each
    piece [B] -> the `docs` convention of this module: ids relative to the document open at
    the piece's start (0 = continues it)."""
    return doc_ids - before[:, None]


def reversed_documents(docs: torch.Tensor) -> torch.Tensor:
    """`docs` [B, n] of a chunk -> those of the reversed chunk, with no state entering it: ids
    non-decreasing in reversed order, equal exactly where the originals are."""
    return (docs[:, -1:] - docs).flip(1)


def document_masks(docs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last), each [B, n, 1] in `dtype`: token l continues the entering state's document
    (may use it / feed its gradient), token l belongs to the chunk's last document (feeds the
    leaving state)."""
    first = (docs == 0).to(dtype)[..., None]
    last = (docs == docs[:, -1:]).to(dtype)[..., None]
    return first, last


def diagonal_fwd(q, k, v, scale: float) -> torch.Tensor:
    """The i == j term, scale * (q_i . k_i) v_i, counted by both directions of a bidirectional
    pass (subtracted once)."""
    acc = accumulator_dtype(q.dtype)
    return scale * (q.to(acc) * k.to(acc)).sum(-1, keepdim=True) * v.to(acc)


def diagonal_bwd(do, q, k, v, scale: float):
    acc = accumulator_dtype(q.dtype)
    q, k, v, do = (t.to(acc) for t in (q, k, v, do))
    do_v = scale * (do * v).sum(-1, keepdim=True)
    return do_v * k, do_v * q, scale * (q * k).sum(-1, keepdim=True) * do


class LinearKernel:
    """A single-device linear-attention kernel. Subclasses implement causal `fwd` / `bwd` with
    an optional initial state in and the final state out, and optionally documents (`docs`
    [B, n] int, the convention of the module docstring; None: one document); the zero-state
    chunk computation LASP-2 needs (causal or bidirectional) is derived here once for every
    kernel."""

    name = "linear"

    def fwd(self, q, k, v, log_decay, scale: float, initial_state=None, final_state: bool = False,
            docs=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o, F): o [B, n, H, Dv] (accumulator dtype), F the state at the end (or None); with
        docs, F is the state of the chunk's last document."""
        raise NotImplementedError

    def bwd(self, do, q, k, v, log_decay, scale: float, initial_state=None, dfinal_state=None,
            dinitial_state: bool = False, docs=None):
        """(dq, dk, dv, dS): gradients of <o, do> + <F, dfinal_state>; dS for the initial state
        (or None)."""
        raise NotImplementedError

    def _exchange_weights(self, log_decay, n: int, docs):
        """(from_start, to_end) of a chunk of n tokens, [n, H] (with documents [B, n, H]:
        times first / last)."""
        from_start, to_end = chunk_weights(log_decay, n)
        if docs is None:
            return from_start, to_end
        first, last = document_masks(docs, from_start.dtype)
        return from_start[None] * first, to_end[None] * last

    def fwd_exchanged(self, q, k, v, log_decay, scale: float, post, docs=None):
        """(o, S) of a causal chunk whose initial state S comes from an exchange (LASP-2's
        all-gather): `post(M)`, M [B, H, Dk, Dv] the chunk's own final state (no state in),
        starts the exchange and returns a handle whose `wait()` gives S.

        This default suits any kernel: M = outer_sum, then the zero-state pass while the
        exchange travels, then S's share added, o += scale (Q * lambda^l * first) S — one more
        product over the chunk. Kernels that can fold S into their own block scan override it."""
        acc = accumulator_dtype(q.dtype)
        from_start, to_end = self._exchange_weights(log_decay.to(acc), q.shape[1], docs)
        pending = post(outer_sum(k, v, to_end))
        o = self.intra_fwd(q, k, v, log_decay, scale, True, docs=docs)
        initial = pending.wait()
        o += times_state(q, initial, from_start * scale)
        return o, initial

    def bwd_exchanged(self, do, q, k, v, log_decay, scale: float, initial_state, post, docs=None):
        """(dq, dk, dv) of `fwd_exchanged` with its initial state S: `post(D)`, D the chunk's
        own initial-state gradient (no gradient at its end), starts the exchange whose `wait()`
        gives dF, the gradient of the chunk's final state. Default: D = scale (Q lambda^l
        first)^T dO, the zero-state backward while it travels, then the shares of S and dF."""
        acc = accumulator_dtype(q.dtype)
        from_start, to_end = self._exchange_weights(log_decay.to(acc), q.shape[1], docs)
        pending = post(scale * outer_sum(q, do, from_start))
        dq, dk, dv = self.intra_bwd(do, q, k, v, log_decay, scale, True, docs=docs)
        dq += times_state(do, initial_state.transpose(-1, -2), from_start * scale)
        dfinal = pending.wait()
        dk += times_state(v, dfinal.transpose(-1, -2), to_end)
        dv += times_state(k, dfinal, to_end)
        return dq, dk, dv

    def intra_fwd(self, q, k, v, log_decay, scale: float, causal: bool, docs=None) -> torch.Tensor:
        """Linear attention of the chunk alone (no state in), within documents when `docs` is
        given: causal, or bidirectional as a forward pass plus a pass over the reversed chunk
        (its documents reversed), minus the doubly counted diagonal."""
        o, _ = self.fwd(q, k, v, log_decay, scale, docs=docs)
        if causal:
            return o
        docs_rev = None if docs is None else reversed_documents(docs)
        o_rev, _ = self.fwd(q.flip(1), k.flip(1), v.flip(1), log_decay, scale, docs=docs_rev)
        return o + o_rev.flip(1) - diagonal_fwd(q, k, v, scale)

    def intra_bwd(self, do, q, k, v, log_decay, scale: float, causal: bool, docs=None):
        dq, dk, dv, _ = self.bwd(do, q, k, v, log_decay, scale, docs=docs)
        if causal:
            return dq, dk, dv
        docs_rev = None if docs is None else reversed_documents(docs)
        reverse = self.bwd(do.flip(1), q.flip(1), k.flip(1), v.flip(1), log_decay, scale,
                           docs=docs_rev)
        diagonal = diagonal_bwd(do, q, k, v, scale)
        return tuple(g + r.flip(1) - d for g, r, d in zip((dq, dk, dv), reverse[:3], diagonal))
