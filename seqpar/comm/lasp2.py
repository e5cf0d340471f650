"""LASP-2: sequence-parallel linear attention with one all-gather of memory states per pass.

The global sequence is N logical chunks of C tokens; rank r holds some of them in local order
(contiguous: chunk r, N = P; zigzag: chunks r and 2P-1-r, N = 2P). Per head lambda = exp(-s),
local index l in [0, C), q pre-multiplied by `scale` below. For every local chunk c:

    M_c = (K_c * lambda^(C-l))^T V_c                          d x e, fp32: the ONE all-gather
    S_c = sum_{c' < c} lambda^(C(c-1-c')) M_c'                 exclusive prefix in chunk order
    O_c = [(Q_c K_c^T) * Lambda] V_c + (Q_c * lambda^l) S_c    intra (local kernel) + inter

The intra-chunk term needs no remote data, so the all-gather of M is posted first
(async_op=True) and travels while the local kernel runs. Causal: the kernel runs the exchange
itself (`LinearKernel.fwd_exchanged` / `bwd_exchanged`, called with `_exchange`): it posts its
own M_c (D_c backward), and the chunked CPU kernel folds the S_c (G_c) that arrive into its block
scan, so a rank does no product over its chunk beyond what one process does on those tokens. Backward mirrors it:

    D_c  = (Q_c * lambda^l)^T dO_c                             the ONE all-gather (backward)
    G_c  = sum_{c' > c} lambda^(C(c'-1-c)) D_c'                exclusive suffix in chunk order
    dQ_c = intra + (dO_c S_c^T) * lambda^l
    dK_c = intra + (V_c G_c^T) * lambda^(C-l)
    dV_c = intra + (K_c * lambda^(C-l)) G_c

with the intra-chunk backward overlapping the all-gather of D. (The reference formulas with
Lambda are DESIGN §4; `kernels/linear_state.py` has the state algebra, every decay exponent
<= 0.)

Non-causal, with decay (lambda^|i-j|): a prefix state as above and a suffix state
U_c = sum_{c' > c} lambda^(C(c'-1-c)) M'_c', M'_c = (K_c * lambda^(l+1))^T V_c, entering as
(Q_c * lambda^(C-1-l)) U_c; M and M' ride in the same all-gather (and D, D' backward); the
intra term is the bidirectional local pass. Non-causal without decay: every query sees the
whole sequence, o_i = q_i sum_all K^T V, so one all-reduce of K^T V forward (and of Q^T dO
backward) is all the communication and there is no intra-chunk pass at all.

Documents (packed sequence, B = 1, global boundaries cu_seqlens identical on every rank): the
state chain is cut at every document start, so nothing flows from one document into the next.
Per chunk c (positions cC .. cC + C - 1) and global document ids doc(p), let
docs_c[l] = doc(cC + l) - doc(cC - 1) (0: the token continues the document open at the chunk
start; `kernels/linear_state.py` conventions) and

    first_c[l] = [docs_c[l] == 0]           the query may use the prefix S_c
    last_c[l]  = [docs_c[l] == docs_c[C-1]]  the key belongs to the chunk's last document
    passes_c   = [docs_c[C-1] == 0]          no document starts inside chunk c

Then M_c = (K_c * lambda^(C-l) * last_c)^T V_c is the state of chunk c's LAST document segment,
decayed to the chunk end, and the scan multiplies in the passes flags of the chunks it crosses,

    S_c  = sum_{c' < c} lambda^(C(c-1-c')) [passes_c'' for all c' < c'' < c] M_c'
    O_c  = [(Q_c K_c^T) * Lambda * Same_c] V_c + (Q_c * lambda^l * first_c) S_c

so S_c is the state of the document of token cC - 1, and only the queries of that document
(the chunk's FIRST segment; none if a document starts at cC) use it. Backward mirrors it:
D_c = (Q_c * lambda^l * first_c)^T dO_c, G_c the reverse scan with the same flags, and
dK_c, dV_c take G_c through lambda^(C-l) * last_c. Non-causal: the suffix direction is the same
on the reversed sequence (docs'_c[l'] = doc((c+1)C) - doc(cC + C-1-l'); its M' is the chunk's
FIRST segment, its U reaches the LAST segment), and the intra pass is the bidirectional one with
the document mask. Every rank knows cu_seqlens, so the flags need no communication: the
all-gathered tensors are exactly those of the dense case (one all-gather each way). Non-causal
without decay takes the decayed path with lambda = 1 (a per-document K^T V cannot come from one
all-reduced sum), so it sends the non-causal-with-decay bytes below.

Traffic per rank, state bytes X = B * H * Dk * Dv * 4 (8 for fp64 inputs), n_loc local chunks
(1 contiguous, 2 zigzag), forward and backward alike — independent of the sequence length:
    causal                   (P - 1) * n_loc * X           all-gather
    non-causal, decay        (P - 1) * n_loc * 2 X         all-gather
    non-causal, documents    (P - 1) * n_loc * 2 X         all-gather (decay or not)
    non-causal, no decay     2 (P - 1) * ceil(X / P)       all-reduce

Shapes: q/k [B, S_loc, H, Dk], v [B, S_loc, H, Dv], log_decay [H]; o [B, S_loc, H, Dv].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.linear_state import (LinearKernel, chunk_weights, document_masks, outer_sum,
                                    relative_documents, scan_states, times_state)
from ..kernels.mask import Runs
from ..kernels.plan import accumulator_dtype
from .primitives import CommStats, GroupInfo, Traffic, start_all_gather, start_all_reduce


@dataclass(frozen=True)
class Lasp2Documents:
    """The document structure LASP-2 needs, per direction (prefix; suffix for non-causal):
    docs [n_loc, C] of each local chunk in that direction's token order (relative ids,
    `linear_state` conventions), and passes [N] (bool) of every logical chunk in chunk order."""

    docs: tuple[torch.Tensor, ...]
    passes: tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, chunk_len: int, n_chunks: int,
              local_chunks: tuple[int, ...], device: torch.device) -> "Lasp2Documents":
        """O(local tokens + chunks) work: document ids only of this rank's tokens and of the
        tokens at the chunk edges (never of the whole sequence)."""
        bounds = cu_seqlens.to("cpu", torch.int64)

        def doc(positions: torch.Tensor) -> torch.Tensor:  # -1 before the sequence, n_docs after
            return torch.searchsorted(bounds, positions, right=True) - 1

        edges = torch.arange(n_chunks + 1) * chunk_len
        before, at = doc(edges - 1), doc(edges)  # the tokens just before / at each chunk edge
        local = torch.tensor(local_chunks)
        ids = doc(edges[local][:, None] + torch.arange(chunk_len)[None, :])  # [n_loc, C]
        prefix = relative_documents(ids, before[local])                # vs token cC - 1
        suffix = relative_documents(-ids.flip(1), -at[local + 1])      # vs token (c+1)C
        passes = (before[1:] == before[:-1], at[:-1] == at[1:])        # [N] each, chunk order
        return cls(tuple(d.to(device) for d in (prefix, suffix)),
                   tuple(f.to(device) for f in passes))


@dataclass(frozen=True)
class Lasp2Plan:
    """Everything a LASP-2 call needs besides its inputs; lives on ctx between forward and
    backward (tensors only in `documents`: small, derived from cu_seqlens).

    local_chunks: logical chunk ids this rank holds, in local order. gathered_index[c]: where
    chunk c sits in the all-gathered (rank, local chunk) list.
    """

    info: GroupInfo
    chunk_len: int
    local_chunks: tuple[int, ...]
    gathered_index: tuple[int, ...]
    causal: bool
    decayed: bool
    scale: float
    kernel: LinearKernel
    recorders: tuple[CommStats, ...]
    documents: Lasp2Documents | None = None

    @classmethod
    def build(cls, info: GroupInfo, all_runs: tuple[Runs, ...], causal: bool, decayed: bool,
              scale: float, kernel: LinearKernel, recorders: tuple[CommStats, ...],
              cu_seqlens: torch.Tensor | None = None, device: torch.device | None = None
              ) -> "Lasp2Plan":
        """cu_seqlens: global document boundaries (validated by the caller), or None; the
        document tensors are put on `device`."""
        chunk_len = all_runs[0][0].length
        if any(run.length != chunk_len or run.stride != 1 for runs in all_runs for run in runs):
            raise ValueError("LASP-2 needs every rank to hold whole chunks of equal length "
                             "(layout 'contiguous' or 'zigzag')")
        ids = [run.start // chunk_len for runs in all_runs for run in runs]
        gathered_index = tuple(sorted(range(len(ids)), key=ids.__getitem__))
        local = tuple(run.start // chunk_len for run in all_runs[info.rank])
        documents = None if cu_seqlens is None else Lasp2Documents.build(
            cu_seqlens, chunk_len, len(ids), local, device or torch.device("cpu"))
        return cls(info, chunk_len, local, gathered_index, causal, decayed, scale, kernel,
                   recorders, documents)

    @property
    def summed(self) -> bool:
        """Non-causal without decay or documents: one all-reduced K^T V serves every query."""
        return not self.causal and not self.decayed and self.documents is None

    @property
    def intra_docs(self) -> torch.Tensor | None:
        """The local chunks' documents for the kernel's intra pass (prefix direction)."""
        return None if self.documents is None else self.documents.docs[0]

    @property
    def directions(self) -> int:
        """States per chunk: the prefix, and for non-causal attention also the suffix."""
        return 1 if self.causal else 2


def _chunks(t: torch.Tensor, plan: Lasp2Plan) -> torch.Tensor:
    """[B, S_loc, H, D] -> [B * n_loc, C, H, D]: each local chunk its own batch entry."""
    return t.reshape(t.shape[0] * len(plan.local_chunks), plan.chunk_len, *t.shape[2:])


def _weights(log_decay: torch.Tensor, plan: Lasp2Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(from_start, to_end) per direction, [C, H]; the suffix direction is the prefix one
    reversed. With documents, [n_loc, C, H]: times first / last of each local chunk (in the
    direction's token order, then back in local order)."""
    from_start, to_end = chunk_weights(log_decay, plan.chunk_len)
    if plan.documents is None:
        return [(from_start, to_end), (from_start.flip(0), to_end.flip(0))][:plan.directions]
    weights = []
    for docs in plan.documents.docs[:plan.directions]:
        first, last = document_masks(docs, from_start.dtype)  # [n_loc, C, 1]
        weights.append((from_start[None] * first, to_end[None] * last))
    if plan.directions == 2:
        weights[1] = tuple(w.flip(1) for w in weights[1])
    return weights


def _incoming(gathered: torch.Tensor, log_decay: torch.Tensor, plan: Lasp2Plan, reverse: bool,
              direction: int) -> torch.Tensor:
    """Gathered per-chunk states [P, B, n_loc, H, d, e] -> the state entering each local chunk
    from the others, [B * n_loc, H, d, e]: an exclusive scan in logical chunk order (reverse:
    from the later chunks), cut at the chunks of `direction` that do not pass a state."""
    in_order = gathered.permute(1, 3, 0, 2, 4, 5).flatten(2, 3)  # [B, H, P * n_loc, d, e]
    index = torch.tensor(plan.gathered_index, device=gathered.device)
    passes = None if plan.documents is None else plan.documents.passes[direction][None]
    scanned = scan_states(in_order.index_select(2, index), log_decay, plan.chunk_len, reverse,
                          passes=passes)
    mine = scanned[:, :, list(plan.local_chunks)]  # [B, H, n_loc, d, e]
    return mine.transpose(1, 2).flatten(0, 1)


class _Arriving:
    """A posted all-gather of per-chunk states whose `wait()` gives the state (or state
    gradient) reaching each local chunk from the others."""

    def __init__(self, pending, finish):
        self.pending, self.finish = pending, finish

    def wait(self) -> torch.Tensor:
        return self.finish(self.pending.wait())


def _exchange(plan: Lasp2Plan, log_decay: torch.Tensor, traffic: Traffic, batch: int,
              reverse: bool):
    """The causal exchange a kernel's `fwd_exchanged` / `bwd_exchanged` calls: post(x), x
    [B * n_loc, H, d, e] (M_c forward, D_c backward), all-gathers x and returns the handle of
    the exclusive scan over the other chunks (prefix forward; suffix backward)."""
    def post(x: torch.Tensor) -> _Arriving:
        pending = start_all_gather(x[None].unflatten(1, (batch, -1)), plan.info, traffic)
        return _Arriving(pending, lambda gathered: _incoming(gathered[:, 0], log_decay, plan,
                                                              reverse=reverse, direction=0))
    return post


def lasp2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
              plan: Lasp2Plan) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(o in the accumulator dtype, the states backward needs)."""
    traffic = Traffic.now("lasp2.fwd", plan.recorders)
    if plan.summed:
        total = start_all_reduce(outer_sum(k, v), plan.info, traffic).wait()
        return plan.scale * times_state(q, total), (total,)
    s = log_decay.to(accumulator_dtype(q.dtype))
    qc, kc, vc = (_chunks(t, plan) for t in (q, k, v))
    if plan.causal:  # the kernel folds the arriving state into its own block scan
        o, state = plan.kernel.fwd_exchanged(
            qc, kc, vc, s, plan.scale, _exchange(plan, s, traffic, q.shape[0], reverse=False),
            docs=plan.intra_docs)
        return o.reshape(*q.shape[:3], v.shape[3]), (state,)
    weights = _weights(s, plan)
    outgoing = torch.stack([outer_sum(kc, vc, to_end) for _, to_end in weights])
    pending = start_all_gather(outgoing.unflatten(1, (q.shape[0], -1)), plan.info, traffic)
    # while states travel:
    o = plan.kernel.intra_fwd(qc, kc, vc, s, plan.scale, plan.causal, docs=plan.intra_docs)
    gathered = pending.wait()
    states = tuple(_incoming(gathered[:, d], s, plan, reverse=d == 1, direction=d)
                   for d in range(plan.directions))
    for (from_start, _), state in zip(weights, states):
        o += times_state(qc, state, from_start * plan.scale)
    return o.reshape(*q.shape[:3], v.shape[3]), states


def lasp2_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              log_decay: torch.Tensor | None, states: tuple[torch.Tensor, ...], plan: Lasp2Plan
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulator dtype. states: what `lasp2_fwd` returned."""
    traffic = Traffic.now("lasp2.bwd", plan.recorders)
    if plan.summed:
        (total,) = states
        pending = start_all_reduce(plan.scale * outer_sum(q, do), plan.info, traffic)
        dq = plan.scale * times_state(do, total.transpose(-1, -2))  # while the sum travels
        grad = pending.wait()
        return dq, times_state(v, grad.transpose(-1, -2)), times_state(k, grad)
    s = log_decay.to(accumulator_dtype(q.dtype))
    qc, kc, vc, doc = (_chunks(t, plan) for t in (q, k, v, do))
    if plan.causal:  # the prefix states flowed forward, so their gradients come from later chunks
        dq, dk, dv = plan.kernel.bwd_exchanged(
            doc, qc, kc, vc, s, plan.scale, states[0],
            _exchange(plan, s, traffic, q.shape[0], reverse=True), docs=plan.intra_docs)
        return tuple(t.reshape(*q.shape[:3], t.shape[-1]) for t in (dq, dk, dv))
    weights = _weights(s, plan)
    outgoing = torch.stack([plan.scale * outer_sum(qc, doc, from_start)
                            for from_start, _ in weights])
    pending = start_all_gather(outgoing.unflatten(1, (q.shape[0], -1)), plan.info, traffic)
    dq, dk, dv = plan.kernel.intra_bwd(doc, qc, kc, vc, s, plan.scale, plan.causal,
                                       docs=plan.intra_docs)
    for (from_start, _), state in zip(weights, states):
        dq += times_state(doc, state.transpose(-1, -2), from_start * plan.scale)
    gathered = pending.wait()
    for d, (_, to_end) in enumerate(weights):
        # The prefix states flowed forward, so their gradients come from later chunks.
        grad = _incoming(gathered[:, d], s, plan, reverse=d == 0, direction=d)
        dk += times_state(vc, grad.transpose(-1, -2), to_end)
        dv += times_state(kc, grad, to_end)
    return tuple(t.reshape(*q.shape[:3], t.shape[-1]) for t in (dq, dk, dv))


class Lasp2Attention(torch.autograd.Function):
    """Autograd wrapper: forward `lasp2_fwd`, backward `lasp2_bwd`; returns o in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, plan: Lasp2Plan):
        o, states = lasp2_fwd(q, k, v, log_decay, plan)
        ctx.save_for_backward(q, k, v, log_decay, *states)
        ctx.plan = plan
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, *states = ctx.saved_tensors
        # Traffic is recorded by the comm_stats blocks active now and those of the forward.
        dq, dk, dv = lasp2_bwd(do, q, k, v, log_decay, tuple(states), ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
