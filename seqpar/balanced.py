"""layout="balanced": equal causal work on every rank for packed documents, without padding.

Zigzag balances *dense* causal attention: chunk c of 2P equal chunks holds queries that see
about (c + 1/2) C keys each, and pairing chunk r with chunk 2P-1-r evens the sums. Packed
documents break that: a query sees only the earlier tokens of its own document, so a chunk's
work depends on where the documents start, not on its index (a log-normal draw of ~1K-token
documents at S = 32K, P = 4 leaves zigzag's busiest rank 1.43x the mean; contiguous 1.39x).
Peers re-balance by zigzagging every document separately, which needs every document padded to
a multiple of 2P.

This layout cuts the sequence into K P equal chunks (K = `CHUNKS_PER_RANK`, C = S / (K P)
tokens each) and deals them to ranks by their work under the documents:

    work(t) = t - start(doc(t)) + 1            keys query t sees (causal, its own document)
    work(c) = sum of work(t) over the tokens t of chunk c

Greedy longest-processing-time first: chunks in decreasing work (ties: lower index first), each
to the rank with the least work so far among those holding fewer than K chunks (ties: lower
rank). Every rank gets exactly K chunks (S / P tokens, as every layout), its chunks in
increasing global order, adjacent ones fused into one run. The greedy bound: the busiest rank
exceeds the mean by at most the largest chunk's work, max work(c) <= C (C + 1) / 2 + C * (its
document's earlier tokens); with K = 4 the draw above is within 1.00-1.03 of the mean (zigzag:
1.33-1.51 over four seeds). Without documents the one-document rule gives a zigzag-like
assignment (chunk work grows linearly), balanced as well.

The assignment is a function of (S, P, cu_seqlens) only, computed the same way on every rank;
`seqpar.shard` / `gather` / `positions` / `attention` all need the same cu_seqlens for it (a
balanced call without cu_seqlens is refused, so a forgotten argument cannot silently pair other
tokens). Windows gain nothing from it (a window's work is already even, and its neighbours are
no longer on the neighbouring ranks): use zigzag or contiguous there.
"""

from __future__ import annotations

import functools

from .kernels.mask import Run, Runs

CHUNKS_PER_RANK = 4


def chunk_work(seq_len: int, chunks: int, documents: tuple[int, ...]) -> list[int]:
    """Causal work (visible (query, key) pairs) of each of `chunks` equal chunks of the
    sequence under the documents `documents` (global boundaries 0 = c_0 < ... < c_n = S)."""
    size = seq_len // chunks
    work = [0] * chunks
    for doc_start, doc_end in zip(documents[:-1], documents[1:]):
        # the tokens [doc_start, doc_end) see 1, 2, ... keys; split them at chunk boundaries
        t = doc_start
        while t < doc_end:
            chunk = t // size
            end = min(doc_end, (chunk + 1) * size)
            first, last = t - doc_start + 1, end - doc_start  # keys seen by t and by end - 1
            work[chunk] += (first + last) * (end - t) // 2
            t = end
    return work


@functools.lru_cache(maxsize=128)
def balanced_runs(seq_len: int, world: int, documents: tuple[int, ...]) -> tuple[Runs, ...]:
    """The runs of every rank of the balanced layout (module docstring), indexed by rank."""
    chunks = CHUNKS_PER_RANK * world
    size = seq_len // chunks
    work = chunk_work(seq_len, chunks, documents)
    load, held = [0] * world, [[] for _ in range(world)]
    for chunk in sorted(range(chunks), key=lambda c: (-work[c], c)):
        rank = min((r for r in range(world) if len(held[r]) < CHUNKS_PER_RANK),
                   key=lambda r: (load[r], r))
        load[rank] += work[chunk]
        held[rank].append(chunk)
    layout = []
    for chunks_of_rank in held:
        runs: list[Run] = []
        for chunk in sorted(chunks_of_rank):
            if runs and runs[-1].start + runs[-1].length == chunk * size:
                runs[-1] = Run(runs[-1].start, runs[-1].length + size)
            else:
                runs.append(Run(chunk * size, size))
        layout.append(tuple(runs))
    return tuple(layout)


__all__ = ["CHUNKS_PER_RANK", "balanced_runs", "chunk_work"]
