"""Peak memory per GPU of a whole training step (forward, backward, optimizer) of a Llama-like
decoder on a sequence-parallel group, and the longest sequence that fits.

    from seqpar.cost.training_memory import LLAMA3_8B, Savers, step_memory, longest_sequence
    m = step_memory(LLAMA3_8B, seq_len=2**20, world=8, backend="ulysses",
                    savers=Savers(tiled_loss=True, tiled_mlp=True, checkpoint=True))
    m.peak / 2**30, m.parts                                    # GiB, the terms below
    longest_sequence(LLAMA3_8B, 8, "ulysses", savers, memory=80e9)

Notation: N parameters, L layers, hidden h, intermediate I, vocab V, heads Hq / Hkv of dim D,
C = S / P tokens per rank (batch 1), b bytes per weight/activation element (bf16: 2), fp32
losses. Everything is per GPU, in bytes.

Model states (mixed precision + Adam: b weights, b gradients, 12 fp32 master + m + v per
parameter; fp32 or fp64 training: m and v only, 2 b -- written "12" below), sharded by ZeRO over the P ranks (sequence-parallel ranks hold the same model, so
they are the ZeRO group, as in DeepSpeed-Ulysses/ALST):
    stage 0: (2b + 12) N      stage 1: 2b N + 12 N / P      stage 2: b N + (b + 12) N / P
    stage 3: (2b + 12) N / P + two layers' weights gathered (the one computing, the prefetch)
    offload_optimizer: the 12 N (/ P) moves to host memory.

Activations kept from forward to backward, per token of one layer (Llama: RMSNorm, attention,
RMSNorm, gated MLP, residuals):
    plain        b (4 h + 4 I) + attention's kept tensors (q, o, k, v, lse; + the head-sharded
                 copies for ulysses/usp) -- the two norm inputs, the two norm outputs feeding
                 projections, gate, up, silu(gate), silu(gate) * up
    tiled MLP    b 4 h + attention's kept (the MLP keeps only its input; its intermediates live
                 for one tile of T = h tokens: 6 T I b, forward output and backward grads)
    checkpoint   b h (the layer input) for every layer, and ONE layer's plain / tiled set while
                 it is recomputed in the backward; offload: the L b h go to host memory.
Transients: attention's working set of one layer (`predict.memory_bytes` minus what it keeps),
4 C h b of hidden-state gradients and scratch.
Logits: untiled, C V (b + 4) kept (model-dtype logits, fp32 log-softmax) plus C V (4 + 4) in
the loss backward (fp32 gradients); tiled (`hf.lm_loss`), one tile of T V (b + 12).

Peak = states + L * kept + max(logits kept + logits backward, one layer's backward working set),
which is linear in S piecewise, so the longest S is found by bisection.

What it leaves out (why measured peaks differ): the allocator's fragmentation and caching, the
CUDA context and NCCL buffers (~1-3 GB on a GPU), the embedding's and norm's small buffers,
and framework copies (e.g. an fp32 upcast of the hidden states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .predict import memory_bytes
from .traffic import Problem, kv_split


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def params(self) -> int:
        h, d = self.hidden, self.head_dim
        attention = 2 * h * self.heads_q * d + 2 * h * self.heads_kv * d
        layer = attention + 3 * h * self.intermediate + 2 * h
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.layers * layer + embeddings + h

    @property
    def layer_params(self) -> int:
        return (self.params - self.vocab * self.hidden * (1 if self.tied else 2)
                - self.hidden) // self.layers


LLAMA3_8B = ModelShape(layers=32, hidden=4096, heads_q=32, heads_kv=8, head_dim=128,
                       intermediate=14336, vocab=128256)
# The CPU benchmark model (benchmarks.long_context).
LONG_CONTEXT_CPU = ModelShape(layers=4, hidden=512, heads_q=8, heads_kv=2, head_dim=64,
                              intermediate=1536, vocab=32000)


@dataclass(frozen=True)
class Savers:
    tiled_loss: bool = False
    tiled_mlp: bool = False
    checkpoint: bool = False
    offload_checkpoints: bool = False
    loss_tile: int | None = None      # tokens per loss tile; None: 64 MiB of fp32 logits
    mlp_tile: int | None = None       # tokens per MLP tile; None: hidden (ALST's rule)


@dataclass(frozen=True)
class Training:
    itemsize: int = 2                 # b: weights, gradients and activations (bf16)
    zero_stage: int = 3
    offload_optimizer: bool = False


@dataclass(frozen=True)
class StepMemory:
    peak: float
    parts: dict = field(default_factory=dict)


def model_state_bytes(m: ModelShape, world: int, t: Training) -> float:
    """Weights, gradients and Adam states per GPU under ZeRO (module docstring)."""
    n, b = m.params, t.itemsize
    # mixed precision keeps an fp32 master copy beside Adam's m and v; fp32 training does not
    opt = 0 if t.offload_optimizer else (12 if b < 4 else 2 * b)
    if t.zero_stage == 0:
        return (2 * b + opt) * n
    if t.zero_stage == 1:
        return 2 * b * n + opt * n / world
    if t.zero_stage == 2:
        return b * n + (b + opt) * n / world
    if t.zero_stage == 3:
        return (2 * b + opt) * n / world + 2 * b * m.layer_params
    raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {t.zero_stage!r}")


def attention_problem(m: ModelShape, seq_len: int, world: int, t: Training,
                      ulysses: int | None = None) -> Problem:
    return Problem(batch=1, seq_len=seq_len, heads_q=m.heads_q, heads_kv=m.heads_kv,
                   head_dim=m.head_dim, world=world, itemsize=t.itemsize,
                   acc_itemsize=8 if t.itemsize == 8 else 4, ulysses=ulysses)


def attention_kept_bytes(backend: str, p: Problem) -> float:
    """What one layer's attention keeps for its backward (`predict.memory_bytes`' kept terms)."""
    b, tokens, d = p.itemsize, p.tokens, p.head_dim
    q = tokens * p.heads_q * d * b
    kv = 2 * tokens * p.heads_kv * d * b
    kept = 2 * q + kv + tokens * p.heads_q * p.acc_itemsize
    if backend in ("ulysses", "usp"):
        u = p.world if backend == "ulysses" else (p.ulysses or 1)
        n, _ = kv_split(p.heads_q, p.heads_kv, u)
        kept += 2 * q + 2 * tokens * n * u * d * b
    return kept


def _loss_tile(m: ModelShape, s: Savers) -> int:
    return s.loss_tile or max(1, 64 * 2 ** 20 // (4 * m.vocab))


def step_memory(m: ModelShape, seq_len: int, world: int, backend: str, savers: Savers,
                training: Training = Training(), ulysses: int | None = None) -> StepMemory:
    """Peak bytes per GPU of one training step (module docstring), with its parts."""
    t, s = training, savers
    b, h, inter, tokens = t.itemsize, m.hidden, m.intermediate, seq_len // world
    p = attention_problem(m, seq_len, world, t, ulysses)
    att_kept = attention_kept_bytes(backend, p)
    att_work = memory_bytes(backend, p) - att_kept
    mlp_tile = min(tokens, s.mlp_tile or h)
    layer_kept = (b * 4 * h * tokens if s.tiled_mlp else b * (4 * h + 4 * inter) * tokens) \
        + att_kept
    mlp_work = 6 * mlp_tile * inter * b if s.tiled_mlp else 2 * inter * tokens * b
    if s.checkpoint:
        kept_per_layer = 0 if s.offload_checkpoints else b * h * tokens
        recompute = layer_kept
    else:
        kept_per_layer, recompute = layer_kept, 0
    scratch = 4 * tokens * h * b
    layer_backward = recompute + att_work + mlp_work + scratch
    if s.tiled_loss:
        logits = min(tokens, _loss_tile(m, s)) * m.vocab * (b + 12)
    else:
        logits = tokens * m.vocab * (b + 4) + tokens * m.vocab * 8
    states = model_state_bytes(m, world, t)
    activations = m.layers * kept_per_layer
    peak = states + activations + max(logits + scratch, layer_backward)
    return StepMemory(peak, {"model states": states, "kept activations": activations,
                             "logits (loss phase)": logits, "layer backward": layer_backward,
                             "attention working set": att_work, "mlp working set": mlp_work})


def longest_sequence(m: ModelShape, world: int, backend: str, savers: Savers, memory: float,
                     training: Training = Training(), ulysses: int | None = None,
                     granule: int | None = None) -> int:
    """The longest S (a multiple of `granule`, default 2 P -- zigzag) whose step_memory peak
    fits `memory` bytes per GPU; 0 if not even one granule fits."""
    granule = granule or 2 * world

    def fits(units: int) -> bool:
        return step_memory(m, units * granule, world, backend, savers, training,
                           ulysses).peak <= memory

    if not fits(1):
        return 0
    high = 2
    while fits(high):
        high *= 2
        if high > 2 ** 40:
            raise ValueError("longest_sequence: no memory limit reached (a model without "
                             "per-token memory?)")
    low = high // 2  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * granule


# ALST's published figures (Bekman et al. 2025, arXiv:2506.13996): Llama-8B on H100-80GB,
# Ulysses, tiled loss + TiledMLP + activation checkpoints offloaded to CPU, ZeRO-3 (optimizer
# states offloaded to CPU, as we read their setup).
ALST_PUBLISHED = ((8, 3_700_000), (32, 15_000_000))
ALST_SAVERS = Savers(tiled_loss=True, tiled_mlp=True, checkpoint=True, offload_checkpoints=True)
ALST_TRAINING = Training(itemsize=2, zero_stage=3, offload_optimizer=True)


def alst_comparison(memory: float = 80e9, backends=("ulysses", "ring", "tokenring", "allgather",
                                                    "usp")) -> list[dict]:
    """The model's longest S for Llama-3-8B at ALST's settings beside ALST's figures."""
    rows = []
    for world, published in ALST_PUBLISHED:
        for backend in backends:
            ulysses = min(8, world) if backend == "usp" else None
            if backend == "usp" and ulysses == world:
                ulysses = world // 2
            longest = longest_sequence(LLAMA3_8B, world, backend, ALST_SAVERS, memory,
                                       ALST_TRAINING, ulysses, granule=2 * world * 1024)
            parts = step_memory(LLAMA3_8B, longest, world, backend, ALST_SAVERS, ALST_TRAINING,
                                ulysses).parts if longest else {}
            rows.append({"P": world, "backend": backend if backend != "usp" else
                         f"usp{ulysses}", "predicted_tokens": longest,
                         "alst_published": published if backend == "ulysses" else None,
                         "ratio_to_alst": longest / published,
                         **{f"{k} GiB": v / 2 ** 30 for k, v in parts.items()}})
    return rows


def bytes_per_token(m: ModelShape, world: int, backend: str, savers: Savers,
                    training: Training = Training(), ulysses: int | None = None,
                    seq: int | None = None) -> tuple[float, float]:
    """(slope in bytes per global token per GPU, fixed bytes) of the peak around `seq`."""
    seq = seq or 2 ** 16 * world
    step = 2 * world * 1024
    hi = step_memory(m, seq + step, world, backend, savers, training, ulysses).peak
    lo = step_memory(m, seq, world, backend, savers, training, ulysses).peak
    slope = (hi - lo) / step
    return slope, lo - slope * seq


__all__ = ["ModelShape", "Savers", "Training", "StepMemory", "LLAMA3_8B", "LONG_CONTEXT_CPU",
           "model_state_bytes", "attention_kept_bytes", "step_memory", "longest_sequence",
           "alst_comparison", "bytes_per_token", "ALST_PUBLISHED", "ALST_SAVERS",
           "ALST_TRAINING"]
