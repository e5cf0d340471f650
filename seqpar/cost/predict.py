"""Predictions per backend, the legality rules, backend="auto"'s choice and its explanation.

`predict(backend, problem, profile)` runs the backend's schedule (`model.py`) forward and
backward and adds the peak memory per rank (`memory_bytes`). `choose` returns the predicted
fastest legal backend of `AUTO_CANDIDATES` -- the exact softmax backends; never "s2", whose
sparsity changes the result -- and `explain` prints the table behind the choice.

Legal: ulysses needs Hq % P == 0; usp needs a mesh (problem.ulysses) with Hq % U == 0; every
backend must fit the profile's device memory (the all-gather backends keep P times the K/V).

Memory per rank (bytes, the larger of the forward and backward peaks), with q = o = N Hq D b,
kv = 2 N Hkv D b, accumulators in a: inputs, output and lse kept for backward, then what each
backend adds -- ring: two K/V receive buffers, fp32 dK/dV travelling in two buffers plus the
local one; tokenring: two visiting query sets (backward: with dO, lse, delta), partials and
fp32 dq/dk/dv; ulysses/usp: head-sharded copies of q, k, v, o kept for backward and one
tensor in flight in an all-to-all, plus the ring's buffers on the group's tokens (usp);
allgather: the gathered K/V (P kv) kept, and the fp32 dK/dV of the whole sequence backward;
lasp2: P gathered states and the kernel's block buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import Profile
from .model import PASSES, Pass
from .traffic import Problem, kv_split, lasp2_state_bytes

AUTO_CANDIDATES = ("ring", "tokenring", "ulysses", "usp", "allgather")


@dataclass(frozen=True)
class Prediction:
    backend: str
    fwd: Pass
    bwd: Pass
    memory_bytes: float
    legal: bool = True
    reason: str = ""  # why the backend cannot run this problem (empty when legal)

    @property
    def seconds(self) -> float:
        return self.fwd.seconds + self.bwd.seconds

    @property
    def exposed(self) -> float:
        return self.fwd.exposed + self.bwd.exposed


def memory_bytes(backend: str, p: Problem) -> float:
    """Peak bytes per rank of one layer's attention, forward + backward (module docstring)."""
    b, a, tokens, d = p.itemsize, p.acc_itemsize, p.tokens, p.head_dim
    q = tokens * p.heads_q * d * b
    kv = 2 * tokens * p.heads_kv * d * b
    acc_q, acc_kv = q // b * a, kv // b * a
    kept = 2 * q + kv + tokens * p.heads_q * a  # q, o, k, v, lse
    grads = q + kv + q  # dq, dk, dv out and dO in
    if backend == "ring":
        return kept + max(2 * kv + acc_q, grads + 2 * kv + acc_q + 3 * acc_kv)
    if backend == "tokenring":
        travelling = 2 * q + 2 * tokens * p.heads_q * a
        return kept + max(2 * q + 2 * (q + tokens * p.heads_q * a) + acc_q,
                          grads + 2 * travelling + acc_q + acc_kv + acc_q)
    if backend in ("ulysses", "usp"):
        u = p.world if backend == "ulysses" else (p.ulysses or 1)
        n, _ = kv_split(p.heads_q, p.heads_kv, u)
        kv_h = 2 * tokens * n * u * d * b
        head_sharded = 2 * q + kv_h  # q_h, o_h, k_h, v_h: the same tokens x heads as local
        ring = 0 if backend == "ulysses" or u == p.world else 2 * kv_h + 3 * kv_h // b * a
        return kept + head_sharded + max(q, kv_h) + max(acc_q, grads + acc_q + ring)
    if backend == "allgather":
        return kept + p.world * kv + max(acc_q, grads + p.world * acc_kv)
    if backend == "lasp2":
        states = p.world * (2 if p.layout == "zigzag" else 1) * lasp2_state_bytes(p)
        return kept + states + max(acc_q, grads + 2 * acc_q)
    if backend == "ring_linear":
        return kept + max(2 * kv + acc_q, grads + 2 * kv + acc_q + 3 * acc_kv)
    raise ValueError(f"memory_bytes: unknown backend {backend!r}")


def _structure(backend: str, p: Problem) -> str:
    """Why `backend` cannot split this problem at all, or ""."""
    if backend == "ulysses" and p.heads_q % p.world:
        return f"needs query heads % P == 0, got {p.heads_q} heads on {p.world} ranks"
    if backend == "usp":
        if p.ulysses is None:
            return "needs group=seqpar.SPMesh(group, ulysses=U)"
        if p.heads_q % p.ulysses:
            return f"needs query heads % U == 0, got {p.heads_q} heads and U={p.ulysses}"
    return ""


def _memory_problem(backend: str, p: Problem, hw: Profile | None) -> str:
    if hw is None or memory_bytes(backend, p) <= hw.memory_bytes:
        return ""
    return (f"needs {memory_bytes(backend, p) / 2**30:.1f} GiB per rank, more than the "
            f"{hw.memory_bytes / 2**30:.0f} GiB of {hw.name}")


def legality(backend: str, p: Problem, hw: Profile | None = None) -> str:
    """Why `backend` cannot run `p` (within `hw`'s device memory), or "" when it can."""
    if backend not in AUTO_CANDIDATES:
        return f"not an exact softmax backend the cost model chooses from {AUTO_CANDIDATES}"
    return _structure(backend, p) or _memory_problem(backend, p, hw)


def predict(backend: str, p: Problem, hw: Profile) -> Prediction:
    """Predicted forward and backward of `backend` on `p` (linear attention: "lasp2" and the
    model-only "ring_linear"), marked illegal where it cannot run (no times when it cannot
    split the problem at all; times but too much memory otherwise)."""
    if backend not in PASSES:
        raise ValueError(f"predict: unknown backend {backend!r}; choose one of {sorted(PASSES)}")
    structural = _structure(backend, p)
    if structural:
        never = Pass(float("inf"), float("inf"))
        return Prediction(backend, never, never, float("nan"), False, structural)
    fwd, bwd = PASSES[backend](hw, p)
    fwd_overhead, bwd_overhead = hw.overhead_of(backend)
    fwd.seconds += fwd_overhead
    bwd.seconds += bwd_overhead
    too_big = _memory_problem(backend, p, hw)
    return Prediction(backend, fwd, bwd, memory_bytes(backend, p), not too_big, too_big)


def predict_all(p: Problem, hw: Profile, backends=AUTO_CANDIDATES) -> list[Prediction]:
    return [predict(name, p, hw) for name in backends]


def choose(p: Problem, hw: Profile, available=AUTO_CANDIDATES, training: bool = True
           ) -> Prediction:
    """The predicted fastest legal backend among `available` (forward + backward when
    `training`, else forward only); ties go to the earlier in AUTO_CANDIDATES order."""
    options = [pred for pred in predict_all(p, hw, [b for b in AUTO_CANDIDATES if b in available])
               if pred.legal]
    if not options:
        raise ValueError(f"no backend can run this problem on {hw.name}: "
                         + "; ".join(f"{b}: {legality(b, p, hw)}" for b in AUTO_CANDIDATES))
    return min(options, key=lambda pred: pred.seconds if training else pred.fwd.seconds)


def _ms(seconds: float) -> str:
    return "-" if seconds == float("inf") else f"{1e3 * seconds:.3f}"


def explain(p: Problem, hw: Profile, available=AUTO_CANDIDATES, training: bool = True) -> str:
    """A table of every candidate's predicted times, exposed communication, bytes per rank by
    link class and memory, and which one backend="auto" picks and why."""
    chosen = choose(p, hw, available, training)
    lines = [f"# {p.batch}x{p.seq_len} tokens, Hq={p.heads_q} Hkv={p.heads_kv} D={p.head_dim}, "
             f"{'causal' if p.causal else 'full'} {p.layout}, P={p.world}"
             + (f" (mesh U={p.ulysses})" if p.ulysses else "")
             + f", profile {hw.name} ({hw.ranks_per_node} ranks/node)"]
    header = ("backend", "fwd ms", "bwd ms", "total ms", "exposed comm ms", "MiB/rank intra",
              "MiB/rank inter", "GiB/rank mem", "")
    rows = [header]
    for pred in predict_all(p, hw, [b for b in AUTO_CANDIDATES if b in available]):
        sent_intra = (pred.fwd.sent.intra_bytes + pred.bwd.sent.intra_bytes) / 2**20
        sent_inter = (pred.fwd.sent.inter_bytes + pred.bwd.sent.inter_bytes) / 2**20
        note = "<- auto" if pred.backend == chosen.backend else (pred.reason or "")
        rows.append((pred.backend, _ms(pred.fwd.seconds), _ms(pred.bwd.seconds),
                     _ms(pred.seconds), _ms(pred.exposed),
                     "-" if pred.seconds == float("inf") else f"{sent_intra:.1f}",
                     "-" if pred.seconds == float("inf") else f"{sent_inter:.1f}",
                     "-" if pred.memory_bytes != pred.memory_bytes else
                     f"{pred.memory_bytes / 2**30:.2f}", note))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append(f"# auto picks {chosen.backend!r}: predicted fastest legal backend "
                 f"({'forward + backward' if training else 'forward'})")
    return "\n".join(lines)


def problem_of(q, k, world: int, mesh_ulysses: int | None, causal: bool, layout: str,
               return_lse: bool, window: int | None = None,
               documents: tuple[int, ...] | None = None) -> Problem:
    """The Problem of a `seqpar.attention` call on local shards q [B, S_loc, Hq, D] and
    k [B, S_loc, Hkv, D] over `world` ranks (mesh_ulysses: the SPMesh's U, or None); window and
    documents (cu_seqlens as a tuple) as the call passes them."""
    return Problem(batch=q.shape[0], seq_len=q.shape[1] * world, heads_q=q.shape[2],
                   heads_kv=k.shape[2], head_dim=q.shape[3], world=world,
                   itemsize=q.element_size(), acc_itemsize=8 if q.element_size() == 8 else 4,
                   causal=causal, layout=layout, ulysses=mesh_ulysses, return_lse=return_lse,
                   window=window, documents=documents)
