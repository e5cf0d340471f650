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
    """sum_l w_l a_l^T b_l per (batch, head): a [B, n, H, Da], b [B, n, H, Db], w [n, H]
    -> [B, H, Da, Db], in the accumulator dtype."""
    acc = accumulator_dtype(a.dtype)
    a = a.to(acc) if weights is None else a.to(acc) * weights[None, :, :, None]
    return torch.einsum("bnhd,bnhe->bhde", a, b.to(acc))


def times_state(a: torch.Tensor, state: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """w_l * a_l @ state per (batch, head): a [B, n, H, Da], state [B, H, Da, Db], w [n, H]
    -> [B, n, H, Db], in the state's dtype."""
    out = torch.einsum("bnhd,bhde->bnhe", a.to(state.dtype), state)
    return out if weights is None else out * weights[None, :, :, None]


def scan_weights(count: int, step: int, log_decay: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[H, count, count] weights of an exclusive decayed scan over `count` pieces of `step`
    tokens: w[c, c'] = lambda^(step (c - 1 - c')) for c' < c (reverse: lambda^(step (c' - 1 - c))
    for c' > c), else 0."""
    idx = torch.arange(count, device=log_decay.device)
    gap = idx[:, None] - idx[None, :] - 1
    if reverse:
        gap = gap.T
    keep = gap >= 0
    return torch.exp(-log_decay[:, None, None] * step * gap.clamp(min=0).to(log_decay.dtype)) * keep


def scan_states(pieces: torch.Tensor, log_decay: torch.Tensor, step: int, reverse: bool = False,
                initial: torch.Tensor | None = None) -> torch.Tensor:
    """Exclusive decayed scan over pieces of `step` tokens: pieces [B, H, N, Dk, Dv] -> the
    state entering each piece, [B, H, N, Dk, Dv].

    Forward: x_c = sum_{c' < c} lambda^(step (c-1-c')) m_c' + lambda^(step c) initial, with
    `initial` the state at the start of piece 0. Reverse: x_c = sum_{c' > c}
    lambda^(step (c'-1-c)) m_c' + lambda^(step (N-1-c)) initial, `initial` at the end of the last
    piece (the gradient flowing back into it). Direct weights, O(N^2): for small N only.
    """
    count = pieces.shape[2]
    weights = scan_weights(count, step, log_decay.to(pieces.dtype), reverse)
    out = torch.einsum("hcx,bhxde->bhcde", weights, pieces)
    if initial is not None:
        idx = torch.arange(count, device=pieces.device)
        hops = count - 1 - idx if reverse else idx
        carry = torch.exp(-log_decay.to(pieces.dtype)[:, None] * step * hops.to(pieces.dtype))
        out = out + carry[None, :, :, None, None] * initial[:, :, None]
    return out


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
    an optional initial state in and the final state out; the zero-state chunk computation LASP-2
    needs (causal or bidirectional) is derived here once for every kernel."""

    name = "linear"

    def fwd(self, q, k, v, log_decay, scale: float, initial_state=None, final_state: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o, F): o [B, n, H, Dv] (accumulator dtype), F the state at the end (or None)."""
        raise NotImplementedError

    def bwd(self, do, q, k, v, log_decay, scale: float, initial_state=None, dfinal_state=None,
            dinitial_state: bool = False):
        """(dq, dk, dv, dS): gradients of <o, do> + <F, dfinal_state>; dS for the initial state
        (or None)."""
        raise NotImplementedError

    def intra_fwd(self, q, k, v, log_decay, scale: float, causal: bool) -> torch.Tensor:
        """Linear attention of the chunk alone (no state in): causal, or bidirectional as a
        forward pass plus a pass over the reversed chunk, minus the doubly counted diagonal."""
        o, _ = self.fwd(q, k, v, log_decay, scale)
        if causal:
            return o
        o_rev, _ = self.fwd(q.flip(1), k.flip(1), v.flip(1), log_decay, scale)
        return o + o_rev.flip(1) - diagonal_fwd(q, k, v, scale)

    def intra_bwd(self, do, q, k, v, log_decay, scale: float, causal: bool):
        dq, dk, dv, _ = self.bwd(do, q, k, v, log_decay, scale)
        if causal:
            return dq, dk, dv
        reverse = self.bwd(do.flip(1), q.flip(1), k.flip(1), v.flip(1), log_decay, scale)
        diagonal = diagonal_bwd(do, q, k, v, scale)
        return tuple(g + r.flip(1) - d for g, r, d in zip((dq, dk, dv), reverse[:3], diagonal))
