"""Masks real models use, measured: packed documents and a sliding window on every backend.

    python -m benchmarks.masks                      # 4 ranks: docs at S=32K, window 2048 at 64K
    python -m benchmarks.masks --world 2 --dense-seq 1024 --docs-seq 2048 \\
        --window-seq 4096 --window 256 --max-doc 512 --median-doc 128 --repeats 1   # a toy run

On P CPU ranks (torchrun's machinery, cores // P threads each), causal fwd+bwd, B=1, H heads
(MHA), head dim D, fp32, three problems on the same ranks in the same run:

* dense   causal attention at S = --dense-seq (16384): the time per (query, key) pair every
          masked run is compared with;
* docs    a packed sequence of S = --docs-seq (32768) tokens whose documents have lengths drawn
          from a fixed-seed log-normal distribution (median --median-doc ~1K, at most --max-doc
          8K; the last one cut to fit), passed as `cu_seqlens`: no padding, documents cross
          rank boundaries anywhere;
* window  a sliding window of W = --window (2048) at S = --window-seq (65536).

Each seqpar backend (ring, tokenring, ulysses, usp with U=2, allgather; zigzag layout, and for
the documents layout="balanced" -- `--docs-layout zigzag` to see what zigzag leaves) runs each
problem; reported per row: fwd+bwd time (median of --repeats rounds, each timing every
method once in turn, of the slowest rank), the number of
visible (query, key) pairs (causal: a document of L tokens has L (L + 1) / 2; a window row i sees
min(i + 1, W) keys), the time per visible pair relative to the same backend's dense causal time
per pair ("pair cost": 1.0 means the mask's work costs what dense work costs, per pair; the
target is <= 1.3), the CPU seconds of all ranks together (every thread of every rank,
gloo's included: with more ranks than cores this, not the wall time, is what the job costs) and
the same ratio per pair on them ("CPU pair cost"), bytes sent per rank (`seqpar.comm_stats`),
peak memory per rank, and the max
difference of the output from a single-process masked SDPA computation of the same
problem (`masked_sdpa`, a check that every method computes the masked attention).

The peer a user would reach for: DeepSpeed-Ulysses (`DistributedAttention`, contiguous shards)
with a masked local SDPA: per document one causal `scaled_dot_product_attention` call (what a
packed-sequence user writes; a dense S x S mask would need S^2 bytes per head), and for the
window, query chunks of W rows against their W + chunk - 1 keys with a banded boolean mask. It
runs in processes of its own (once `deepspeed.init_distributed` has run, other methods in the
same processes were measured slower; see benchmarks.scaling). Its time ratio is reported per
seqpar row ("vs peer" < 1: seqpar is faster).

Writes masks-<host>-<stamp>.json and .png (time per visible pair relative to dense, per backend
and problem) under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.common import (header_text, launch, machine, mib, peak_memory, start_rank, table,
                               timed, write_results)

BACKENDS = ("ring", "tokenring", "ulysses", "usp", "allgather")
LAYOUT = "zigzag"
PEER = "deepspeed ulysses + masked sdpa"


# ---------------------------------------------------------------- the problems

def document_lengths(total: int, median: int, longest: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (median `median`, sigma 1, clipped to [1, longest]) until
    they fill `total` tokens; the last document is cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        draw = math.exp(math.log(median) + torch.randn(1, generator=gen).item())
        lengths.append(max(1, min(longest, round(draw))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def visible_pairs(seq: int, lengths: list[int] | None, window: int | None) -> int:
    """Causal (query, key) pairs the mask leaves visible."""
    if lengths is not None:
        return sum(n * (n + 1) // 2 for n in lengths)
    if window is not None:
        w = min(window, seq)
        return w * (w + 1) // 2 + (seq - w) * w
    return seq * (seq + 1) // 2


def problems(args) -> list[dict]:
    lengths = document_lengths(args.docs_seq, args.median_doc, args.max_doc)
    return [{"problem": "dense", "S": args.dense_seq, "lengths": None, "window": None,
             "layout": LAYOUT},
            {"problem": "docs", "S": args.docs_seq, "lengths": lengths, "window": None,
             "layout": args.docs_layout},
            {"problem": "window", "S": args.window_seq, "lengths": None, "window": args.window,
             "layout": LAYOUT}]


def cu_seqlens_of(lengths: list[int] | None) -> torch.Tensor | None:
    if lengths is None:
        return None
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def inputs(problem: dict, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(problem["S"])
    return tuple(torch.randn(1, problem["S"], heads, dim, generator=gen) for _ in range(4))


# ---------------------------------------------------------------- a masked local SDPA (the peer's)

def masked_sdpa(q, k, v, lengths: list[int] | None, window: int | None):
    """Causal attention of bshd q, k, v over the whole (local) sequence with documents or a
    window, as a user writes it with PyTorch's SDPA: one causal call per document; for a window,
    chunks of W queries against their W + W - 1 keys under a banded mask."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if lengths is not None:
        outs, start = [], 0
        for n in lengths:
            rows = slice(start, start + n)
            outs.append(sdpa(q[:, :, rows], k[:, :, rows], v[:, :, rows], is_causal=True))
            start += n
        return torch.cat(outs, dim=2).transpose(1, 2)
    if window is not None:
        seq, outs = q.shape[2], []
        for i0 in range(0, seq, window):
            i1 = min(seq, i0 + window)
            j0 = max(0, i0 - window + 1)
            qi = torch.arange(i0, i1)[:, None]
            kj = torch.arange(j0, i1)[None, :]
            band = (kj <= qi) & (qi - kj < window)
            outs.append(sdpa(q[:, :, i0:i1], k[:, :, j0:i1], v[:, :, j0:i1], attn_mask=band))
        return torch.cat(outs, dim=2).transpose(1, 2)
    return sdpa(q, k, v, is_causal=True).transpose(1, 2)


# ---------------------------------------------------------------- one rank

def _measure(step, repeats: int, device) -> tuple[list[float], list[float], object, int]:
    step()  # warm-up
    times, cpus, result, peak_bytes = [], [], None, None
    for _ in range(repeats):
        seconds, cpu, result, peak = _measure_once(step, device)
        times.append(seconds)
        cpus.append(cpu)
        peak_bytes = peak if peak_bytes is None else peak_bytes
    slowest, cpu_total = _across_ranks(times, cpus)
    return slowest, cpu_total, result, peak_bytes


def _measure_once(step, device) -> tuple[float, float, object, int]:
    """One timed call of `step` after a barrier: (seconds on this rank, CPU seconds of this
    process -- every thread, gloo's included --, its result, peak bytes)."""
    dist.barrier()
    with peak_memory(device) as peak:
        holder = {}
        cpu = time.process_time()
        seconds = timed(lambda: holder.__setitem__("r", step()), device)
        cpu = time.process_time() - cpu
    return seconds, cpu, holder["r"], peak.bytes


def _across_ranks(times: list, cpus: list) -> tuple[list, list]:
    """Per round: the slowest rank's time, and the CPU seconds of all ranks together (on a
    saturated machine the job's real cost: 4 ranks on 2 cores share them)."""
    slowest = torch.tensor(times, dtype=torch.float64)
    cpu_total = torch.tensor(cpus, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu_total, op=dist.ReduceOp.SUM)
    return slowest.tolist(), cpu_total.tolist()


def _row(name, problem, times, cpus, sent, peak, diff, world) -> dict:
    totals = torch.tensor([float(sent), float(peak), float(diff)])
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    return {"method": name, "problem": problem["problem"], "S": problem["S"], "P": world,
            "layout": problem["layout"] if name.startswith("seqpar") else "contiguous",
            "window": problem["window"],
            "documents": None if problem["lengths"] is None else len(problem["lengths"]),
            "seconds": statistics.median(times), "times": times,
            "cpu_seconds": statistics.median(cpus), "cpu_times": cpus,
            "sent_bytes": int(totals[0].item()), "peak_bytes": int(totals[1].item()),
            "diff": totals[2].item()}


def _seqpar_worker(config: dict) -> list[dict]:
    """Every (problem, backend) is warmed up once, then timed in rounds: round r times each of
    them once, so a slow spell of the machine (other jobs, the OS) falls on every method alike
    instead of on the ones measured while it lasted. Reported: the median over rounds of the
    slowest rank."""
    import seqpar

    rank, world, device, _ = start_rank(config)
    runs = []  # (problem, backend, step, expected local output)
    for problem in config["problems"]:
        q, k, v, do = inputs(problem, config["heads"], config["dim"])
        cu = cu_seqlens_of(problem["lengths"])
        layout = problem["layout"]
        expected = seqpar.shard(masked_sdpa(q, k, v, problem["lengths"], problem["window"]),
                                layout=layout, cu_seqlens=cu)
        local = [seqpar.shard(t, layout=layout, cu_seqlens=cu) for t in (q, k, v, do)]
        del q, k, v, do
        for backend in config["backends"]:
            group = seqpar.SPMesh(ulysses=2) if backend == "usp" else None

            def step(backend=backend, group=group, local=local, cu=cu, layout=layout,
                     window=problem["window"]):
                q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
                with seqpar.comm_stats() as stats:
                    o = seqpar.attention(q_l, k_l, v_l, group, backend=backend, causal=True,
                                         layout=layout, cu_seqlens=cu, window=window)
                    o.backward(local[3])
                return o.detach(), stats.sent()
            step()  # warm-up
            runs.append((problem, backend, step, expected))
    times, cpus = [[] for _ in runs], [[] for _ in runs]
    outcome = [None] * len(runs)
    for _ in range(config["repeats"]):
        for i, (_, _, step, _) in enumerate(runs):
            seconds, cpu, result, peak = _measure_once(step, device)
            times[i].append(seconds)
            cpus[i].append(cpu)
            if outcome[i] is None:
                outcome[i] = (result, peak)
    slowest, cpu_total = _across_ranks(times, cpus)
    rows = []
    for i, (problem, backend, _, expected) in enumerate(runs):
        (out, sent), peak = outcome[i]
        diff = (out - expected).abs().max().item()
        rows.append(_row(f"seqpar {backend}", problem, slowest[i], cpu_total[i], sent, peak,
                         diff, world))
        if rank == 0:
            print(f"  {problem['problem']} S={problem['S']} {backend}: "
                  f"{rows[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    dist.destroy_process_group()
    return rows


def _peer_worker(config: dict) -> list[dict]:
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    import seqpar

    rank, world, device, _ = start_rank(config)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group already running
    rows = []
    for problem in config["problems"]:
        if config["heads"] % world:
            continue
        q, k, v, do = inputs(problem, config["heads"], config["dim"])
        expected = masked_sdpa(q, k, v, problem["lengths"], problem["window"])
        local_attention = (lambda a, b, c, p=problem: masked_sdpa(a, b, c, p["lengths"], p["window"]))
        attention = DistributedAttention(local_attention, dist.group.WORLD, scatter_idx=2,
                                         gather_idx=1)
        local = [seqpar.shard(t, layout="contiguous") for t in (q, k, v, do)]
        elements = (2 * local[0].numel() + 2 * local[1].numel()) * local[0].element_size()

        def step():
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
            o = attention(q_l, k_l, v_l, 0)
            o.backward(local[3])
            # its all-to-alls send the (P-1)/P of q, k, v, o forward and of do, dq, dk, dv back
            return o.detach(), 2 * (world - 1) * elements // world
        times, cpus, (out, sent), peak = _measure(step, config["repeats"], device)
        full = seqpar.gather(out, layout="contiguous")
        rows.append(_row(PEER, problem, times, cpus, sent, peak,
                         (full - expected).abs().max().item(), world))
        if rank == 0:
            print(f"  {problem['problem']} S={problem['S']} peer: {rows[-1]['seconds']:.2f} s",
                  file=sys.stderr, flush=True)
    dist.destroy_process_group()
    return rows


# ---------------------------------------------------------------- report

def add_ratios(rows: list[dict], problems_: list[dict]) -> None:
    """pairs, time per pair, pair cost relative to the same method's dense, ratio to the peer."""
    by_name = {p["problem"]: p for p in problems_}
    for row in rows:
        p = by_name[row["problem"]]
        row["pairs"] = visible_pairs(p["S"], p["lengths"], p["window"])
        row["ns_per_pair"] = 1e9 * row["seconds"] / row["pairs"]
    for row in rows:
        dense = [r for r in rows if r["method"] == row["method"] and r["problem"] == "dense"]
        for cost, measure in (("pair_cost", "seconds"), ("cpu_pair_cost", "cpu_seconds")):
            row[cost] = (row[measure] / row["pairs"] / (dense[0][measure] / dense[0]["pairs"])
                         if dense else None)
        peer = [r for r in rows if r["method"] == PEER and r["problem"] == row["problem"]]
        row["vs_peer"] = row["seconds"] / peer[0]["seconds"] if peer else None
        row["sent_mib"], row["peak_mib"] = mib(row["sent_bytes"]), mib(row["peak_bytes"])


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    methods = sorted({r["method"] for r in rows})
    masked = ("docs", "window")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(masked)
    for n, problem in enumerate(masked):
        values = [next((r["pair_cost"] for r in rows if r["method"] == m and r["problem"] == problem),
                       0) or 0 for m in methods]
        ax.bar([i + n * width for i in range(len(methods))], values, width, label=problem)
    ax.axhline(1.3, color="red", lw=0.8, ls="--", label="target 1.3")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xticks([i + width / 2 for i in range(len(methods))], methods, rotation=20, fontsize=8)
    ax.set_ylabel("time per visible pair / dense causal's")
    ax.set_title("masked attention: cost per visible (query, key) pair")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dense-seq", type=int, default=16384)
    parser.add_argument("--docs-seq", type=int, default=32768)
    parser.add_argument("--median-doc", type=int, default=1024)
    parser.add_argument("--max-doc", type=int, default=8192)
    parser.add_argument("--window-seq", type=int, default=65536)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--docs-layout", default="balanced", choices=("balanced", "zigzag"),
                        help="layout of the packed-documents problem (balanced: equal work per "
                             "rank under the documents; zigzag balances dense causal work only)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    bad = [s for s in (args.dense_seq, args.docs_seq, args.window_seq) if s % (2 * args.world)]
    if bad:
        parser.error(f"sequence lengths {bad} are not divisible by 2 x P (zigzag)")
    info = machine()
    print(header_text(info), flush=True)
    cores = info["cores"] or 1
    todo = problems(args)
    config = {"problems": todo, "heads": args.heads, "dim": args.dim, "dtype": "float32",
              "repeats": args.repeats, "threads": max(1, cores // args.world),
              "backends": args.backends}
    rows = launch(args.world, _seqpar_worker, config)
    if args.peer and importlib.util.find_spec("deepspeed") is not None:
        rows += launch(args.world, _peer_worker, config)
    elif args.peer:
        print("# deepspeed is not installed: no peer row (pip install -e '.[deepspeed]')")
    add_ratios(rows, todo)
    docs = todo[1]["lengths"]
    print(f"# causal fwd+bwd, B=1, H={args.heads}, D={args.dim}, fp32, P={args.world}, "
          f"{LAYOUT} (docs: {args.docs_layout}); docs: {len(docs)} documents, median {int(statistics.median(docs))}, "
          f"max {max(docs)}; window W={args.window}; median of {args.repeats}, slowest rank")
    print(table(rows, [("problem", "problem", "s"), ("S", "S", "d"), ("method", "method", "s"),
                       ("layout", "layout", "s"),
                       ("seconds", "fwd+bwd s", ".3f"), ("pairs", "visible pairs", ".3e"),
                       ("pair_cost", "pair cost vs dense", ".2f"),
                       ("cpu_seconds", "CPU s (all ranks)", ".2f"),
                       ("cpu_pair_cost", "CPU pair cost", ".2f"),
                       ("vs_peer", "time / peer", ".2f"), ("sent_mib", "sent MiB/rank", ".2f"),
                       ("peak_mib", "peak MiB/rank", ".1f"), ("diff", "max |o - sdpa o|", ".1e")]))
    write_results("masks", {"machine": info, "args": vars(args), "rows": rows,
                            "documents": docs}, args.out, plot)
    return rows


if __name__ == "__main__":
    main()
