"""Partial prefill (T new tokens against S cached ones): pass-KV or pass-Q, and which is faster.

Meta's context-parallel inference (Yang et al., 2024) picks per request between passing K/V
(ring) and passing Q (TokenRing) from how much of the context is already cached. Both run the
same products; what differs is what travels (`seqpar/inference/partial_prefill.py`):

* pass-KV: each rank's cached shard (padded to the longest, Lmax = ceil(S / P)) and its T / P
  new tokens' K/V hop around the ring, P - 1 hops: per rank
      (P - 1) * 2 * B * (Lmax + T / P) * Hkv * D * b
* pass-Q: each rank's T / P new queries hop around the ring (P - 1 hops) and every partial
  (o in b, lse in a) goes straight home: per rank
      (P - 1) * B * (T / P) * Hq * D * b  +  (P - 1) * B * (T / P) * Hq * (D * b + a)

So pass-Q moves less when T * Hq * (2 D b + a) < 2 (S + T) * Hkv * D b, i.e. when the new
tokens are a small share of the context -- roughly T / (S + T) < Hkv / Hq for a = b -- and
pass-KV otherwise (and always costs one message per hop instead of two). The model below
prices both schedules with the profile's links, compute rate and overlap (`model.py`'s
alpha-beta + roofline pieces), so the threshold follows the machine rather than a constant.

Compute per step (both modes): rank r's T / P queries against the keys of rank p = the
cached shard (all visible: every cached token precedes every new one) plus the causal
products of the new tokens (`work_matrix` of the layout on T), and pass-Q merges each partial
that arrives (memory-bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hardware import Profile
from .model import (Pass, Placement, attention_seconds, elementwise_seconds, pipelined_pass,
                    steps_of, work_matrix)
from .traffic import Problem, Volume

MODES = ("pass-kv", "pass-q")


@dataclass(frozen=True)
class PartialPrefill:
    """T new tokens (`new`, sharded with `layout`) against `context` cached tokens on P ranks."""

    batch: int
    context: int
    new: int
    heads_q: int
    heads_kv: int
    head_dim: int
    world: int
    itemsize: int = 2
    acc_itemsize: int = 4
    layout: str = "zigzag"
    window: int | None = None  # sliding window W: only W - 1 cached tokens can be seen

    @property
    def context_seen(self) -> int:
        """Cached tokens a new query can see (the window's tail of the context, or all)."""
        return self.context if self.window is None else min(self.context, self.window - 1)

    @property
    def new_local(self) -> int:
        return self.new // self.world

    @property
    def cached_max(self) -> int:
        """Lmax: the longest cached shard (the balance rule keeps them within one token); with a
        window, the longest share of the window's tail (spread over the ranks like the rest)."""
        return -(-self.context_seen // self.world)

    def attention_problem(self) -> Problem:
        """The new tokens' self-attention as a `Problem` (for the model's compute pieces)."""
        return Problem(batch=self.batch, seq_len=self.new, heads_q=self.heads_q,
                       heads_kv=self.heads_kv, head_dim=self.head_dim, world=self.world,
                       itemsize=self.itemsize, acc_itemsize=self.acc_itemsize, causal=True,
                       layout=self.layout)


def pass_kv_bytes(p: PartialPrefill) -> int:
    """One travelling block: K and V of the padded cached shard and the new local tokens."""
    return 2 * p.batch * (p.cached_max + p.new_local) * p.heads_kv * p.head_dim * p.itemsize


def pass_q_bytes(p: PartialPrefill) -> tuple[int, int]:
    """(one query block, one partial (o rows + lse)) of pass-Q."""
    rows = p.batch * p.new_local * p.heads_q
    return rows * p.head_dim * p.itemsize, rows * (p.head_dim * p.itemsize + p.acc_itemsize)


def volume(mode: str, p: PartialPrefill) -> Volume:
    """Bytes and messages one rank sends (module docstring)."""
    hops = p.world - 1
    if mode == "pass-kv":
        return Volume(hops * pass_kv_bytes(p), hops)
    if mode == "pass-q":
        query, partial = pass_q_bytes(p)
        return Volume(hops * (query + partial), 2 * hops)
    raise ValueError(f"volume: unknown mode {mode!r}; choose one of {MODES}")


def predict(mode: str, p: PartialPrefill, hw: Profile) -> Pass:
    """The predicted forward pass of `mode` on the critical rank."""
    if mode not in MODES:
        raise ValueError(f"predict: unknown mode {mode!r}; choose one of {MODES}")
    world, where = p.world, Placement(p.world, hw.ranks_per_node)
    problem = p.attention_problem()
    new_work, new_calls = work_matrix(p.layout, True, world, p.new_local, hw.tile)
    cached = float(p.new_local * p.cached_max)  # FULL block against the cached shard
    step, rank = np.indices((world, world))
    visiting = mode == "pass-q"
    products = steps_of(new_work, visiting) + cached
    calls = steps_of(new_calls, visiting) + 1
    seconds, flops = attention_seconds(hw, problem, products, calls, p.heads_q, p.heads_kv,
                                       p.new_local, p.cached_max + p.new_local, False)
    acc = p.batch * p.new_local * p.head_dim * p.acc_itemsize * p.heads_q
    seconds = seconds + np.where(step > 0, elementwise_seconds(hw, 4 * acc), 0.0)  # merges
    total_flops = float(flops.max(axis=1).sum())
    if world == 1:
        return Pass(float(seconds.sum()), float(seconds.sum()), 0.0, total_flops)
    ahead = np.where(step < world - 1, 1.0, 0.0)
    if mode == "pass-kv":
        flows = [(ahead * pass_kv_bytes(p), (rank + 1) % world)]
        return pipelined_pass(hw, where, seconds, flows, total_flops)
    query, partial = pass_q_bytes(p)
    returning = np.where(step > 1, float(partial), 0.0)  # a partial leaves a step later
    flows = [(ahead * query, (rank + 1) % world), (returning, (rank - step + 1) % world)]
    tail = [(np.full((1, world), float(partial)), (np.arange(world)[None] + 1) % world)]
    return pipelined_pass(hw, where, seconds, flows, total_flops, tail)


def choose(p: PartialPrefill, hw: Profile) -> tuple[str, dict[str, float]]:
    """(the predicted faster mode, predicted seconds per mode); ties go to pass-kv."""
    seconds = {mode: predict(mode, p, hw).seconds for mode in MODES}
    return min(MODES, key=lambda mode: seconds[mode]), seconds


def explain(p: PartialPrefill, hw: Profile) -> str:
    """Both modes' predicted time, exposed communication and bytes, the pick and why."""
    mode, _ = choose(p, hw)
    lines = [f"# partial prefill: T={p.new} new tokens against S={p.context} cached "
             f"(T/(S+T)={p.new / (p.context + p.new):.3f}), B={p.batch} Hq={p.heads_q} "
             f"Hkv={p.heads_kv} D={p.head_dim}, P={p.world}, {p.layout}, profile {hw.name}"]
    for name in MODES:
        pred, vol = predict(name, p, hw), volume(name, p)
        lines.append(f"{name:8s} {1e3 * pred.seconds:10.3f} ms  exposed comm "
                     f"{1e3 * pred.exposed:9.3f} ms  {vol.bytes / 2**20:9.3f} MiB/rank in "
                     f"{vol.messages} messages" + ("  <- pick" if name == mode else ""))
    kv, q = volume("pass-kv", p).bytes, volume("pass-q", p).bytes
    lines.append(f"# {mode} is predicted faster: pass-Q moves {q / max(kv, 1):.2f}x the bytes of "
                 f"pass-KV (queries + partials of T/P new tokens vs K/V of the S/P cached and "
                 f"T/P new ones; pass-Q wins when T/(S+T) is below about Hkv/Hq = "
                 f"{p.heads_kv / p.heads_q:.2f}), at the same compute")
    return "\n".join(lines)
