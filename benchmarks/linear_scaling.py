"""LASP-2 to a million tokens: linear attention forward + backward on P CPU ranks as S grows.

    python -m benchmarks.linear_scaling                          # 4 ranks, S = 64K .. 1,048,576
    python -m benchmarks.linear_scaling --world 2 --seqs 2048 8192 --repeats 1   # a toy run

For every S: causal linear attention with per-head decay (B=1, H=4, Dk=Dv=64, fp32 by default)
through `seqpar.linear_attention`, on P CPU ranks launched with torchrun's machinery
(`benchmarks.common.launch`: each rank max(1, cores // P) threads, OMP_NUM_THREADS set; 4 ranks
on 2 cores: 1 thread each). Each rank draws its own shard of q, k, v, dO, so the full sequence
never exists anywhere, as in training. One warm-up at the smallest S; then per S the median over
`--repeats` of the fwd+bwd time of the slowest rank. Side by side, in the same run:

* the one-process baseline: the same problem (the whole S) through `seqpar.linear_attention`
  with no process group, in ONE launched process holding every core (threads = cores), for
  S <= `--baseline-max-seq` (its buffers are P times a rank's);
* the machine's fp32 matmul rate: a 2048 x 2048 x 2048 product with every core in this
  process, best of 5, before and after the sweeps (the larger is the reference).

Reported per S:

* time, and per-token time = time / S with its ratio to the smallest S's
  (target: <= 1.1 at 1M — the cost per token does not grow with the sequence);
* FLOP rate: the chunked algorithm's FLOPs over the time, and its share of the matmul rate.
  FLOPs (`flops`), per token and head with the kernel's block T (`kernel_block`, 64) —
      forward   2 T (Dk + Dv) + 4 Dk Dv    (Q K^T and (.) V inside blocks; K^T V states, Q S)
      backward  twice the forward           (dO V^T, dP K, dP^T Q, P^T dO; Q^T dO, dO S^T,
                                            V G^T, K G)
  i.e. 3 (2 T (Dk + Dv) + 4 Dk Dv) per token and head (= `seqpar.cost.model.linear_chunk_flops`
  x 3). What the kernel recomputes in backward (the scores and the block states, 2 T Dk + 2 Dk Dv
  more) and the scans over states are NOT counted: the rate is of the work the algorithm needs.
  For P ranks the rate is the total over the wall time of the slowest rank;
* efficiency = (one-process time) / (P-rank time): the share of the one-process speed that P
  ranks keep while they split the same cores (here 4 ranks x 1 thread vs 1 process x 2
  threads; 1.0 = nothing lost to sharding, communication or oversubscription);
* bytes LASP-2 sends per rank, forward + backward (`seqpar.comm_stats`, ops "lasp2.*"; the
  few hundred bytes of the argument check are left out; target: the same at every S — LASP-2
  moves only d x e states);
* peak memory per rank: the resident-set high-water mark over drawing the shard and running
  fwd+bwd (`benchmarks.common.peak_memory`), and that peak per local token (target: constant,
  i.e. memory linear in S/P). It is taken in one extra run per S AFTER every timed run:
  `peak_memory` lowers glibc's mmap threshold for good (so the resident set follows freed
  buffers), which makes every later allocation of a temporary a fresh mmap with page faults —
  timings taken under it were up to 2x slow (3.81 s instead of 1.4-1.9 s at S = 64K).

A tqdm bar (rank 0) tracks the sweep. Prints a table, writes JSON and a PNG (per-token time,
bytes per rank, peak memory per rank vs S) under benchmarks/results/. Size of the default
largest run: 262,144 tokens per rank; each of q, k, v, dO, o, dq, dk, dv is 256 MiB, and the
peak is about 11 such buffers (~3 GiB) per rank, ~12 GiB for the 4 ranks.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist

from benchmarks.common import (header_text, launch, machine, mib, peak_memory, start_rank, table,
                               timed, write_json)

DEFAULT_SEQS = [65536 * 2 ** i for i in range(5)]  # 64K .. 1,048,576


def head_decays(heads: int) -> torch.Tensor:
    """Per-head log-decays s_h = 2^(-8 (h + 1) / H): a geometric spread from about one-token to
    sequence-long memories, as in Lightning Attention / TransNormerLLM."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def kernel_block() -> int:
    """T of the CPU kernel these runs use (`seqpar.kernels.ChunkedLinearKernel`'s default)."""
    from seqpar.kernels import ChunkedLinearKernel
    return ChunkedLinearKernel().block


def flops(seq: int, heads: int, key_dim: int, value_dim: int, block: int) -> float:
    """The chunked algorithm's FLOPs for causal fwd + bwd over `seq` tokens (module docstring):
    3 x (2 T (Dk + Dv) + 4 Dk Dv) per token and head."""
    return 3.0 * seq * heads * (2 * block * (key_dim + value_dim) + 4 * key_dim * value_dim)


def matmul_rate(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of one size^3 matrix product with `threads` threads, best of `repeats`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b, torch.device("cpu")) for _ in range(repeats))
    torch.set_num_threads(previous)
    return 2.0 * size ** 3 / best


def _worker(config: dict) -> list[dict]:
    import seqpar
    from tqdm import tqdm

    rank, world, device, dtype = start_rank(config)
    decay = head_decays(config["heads"])

    def run(seq: int, seed: int) -> tuple[float, int]:
        """(fwd+bwd seconds, bytes sent) of one step on a fresh shard."""
        local = seq // world
        gen = torch.Generator().manual_seed(seed * world + rank)
        q, k, v, do = (torch.randn(1, local, config["heads"], dim, generator=gen).to(dtype)
                       for dim in (config["key_dim"], config["key_dim"], config["value_dim"],
                                   config["value_dim"]))
        for t in (q, k, v):
            t.requires_grad_()
        dist.barrier()
        with seqpar.comm_stats() as stats:
            seconds = timed(lambda: seqpar.linear_attention(
                q, k, v, decay=decay, layout=config["layout"]).backward(do), device)
        return seconds, stats.sent("lasp2.")

    def peak(seq: int) -> int:
        with peak_memory(device) as measured:
            run(seq, seed=seq)
        return measured.bytes

    run(config["seqs"][0], seed=0)  # warm-up: first-call costs, gloo buffers
    rows = []
    sweep = tqdm(config["seqs"], desc=f"LASP-2 sweep, P={world}", unit="S", disable=rank != 0,
                 file=sys.stderr)
    for seq in sweep:
        sweep.set_postfix(S=seq)
        results = [run(seq, seed=seq + r) for r in range(config["repeats"])]
        slowest = torch.tensor([r[0] for r in results], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        sent = torch.tensor([float(max(r[1] for r in results))], dtype=torch.float64)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        rows.append({"P": world, "S": seq, "seconds": statistics.median(slowest.tolist()),
                     "times": slowest.tolist(), "sent_bytes": int(sent.item())})
    if config["peaks"]:  # after every timed run: peak_memory changes malloc for good
        for row in rows:
            measured = torch.tensor([float(peak(row["S"]))], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
            row["peak_bytes"] = int(measured.item())
    dist.destroy_process_group()
    return rows


def plot(rows: list[dict], title: str, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    seqs = [r["S"] for r in rows]
    panels = [("us_per_token", "fwd+bwd time per token (us)"),
              ("sent_mib", "bytes sent per rank (MiB)"),
              ("peak_mib", "peak memory per rank (MiB)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(seqs, [r[key] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--seqs", type=int, nargs="+", default=DEFAULT_SEQS)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-max-seq", type=int, default=262144,
                        help="run the one-process baseline for S up to this (0: never)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    unit = args.world * (2 if args.layout == "zigzag" else 1)
    bad = [s for s in args.seqs if s % unit]
    if bad:
        parser.error(f"--seqs {bad} are not divisible by {unit} (P={args.world}, layout={args.layout})")

    info = machine()
    cores = info["cores"] or 1
    threads = max(1, cores // args.world)
    print(header_text(info), flush=True)
    config = {"seqs": sorted(args.seqs), "heads": args.heads, "key_dim": args.key_dim,
              "value_dim": args.value_dim, "layout": args.layout, "dtype": args.dtype,
              "repeats": args.repeats, "threads": threads, "peaks": True}
    rates = [matmul_rate(cores)]
    rows = launch(args.world, _worker, config)
    baseline_seqs = [s for s in config["seqs"] if s <= args.baseline_max_seq]
    baseline = {}
    if baseline_seqs and args.world > 1:
        one = launch(1, _worker, {**config, "seqs": baseline_seqs, "threads": cores,
                                  "peaks": False})
        baseline = {r["S"]: r["seconds"] for r in one}
    elif args.world == 1:
        baseline = {r["S"]: r["seconds"] for r in rows}
    rates.append(matmul_rate(cores))
    rate = max(rates)
    first = rows[0]["seconds"] / rows[0]["S"]
    block = kernel_block()
    for row in rows:
        work = flops(row["S"], args.heads, args.key_dim, args.value_dim, block)
        row["flops"] = work
        row["us_per_token"] = row["seconds"] / row["S"] * 1e6
        row["per_token_vs_first"] = row["seconds"] / row["S"] / first
        row["gflops"] = work / row["seconds"] / 1e9
        row["matmul_share"] = work / row["seconds"] / rate
        one = baseline.get(row["S"])
        row["one_process_seconds"] = one
        row["one_process_gflops"] = None if one is None else work / one / 1e9
        row["one_process_matmul_share"] = None if one is None else work / one / rate
        row["efficiency"] = None if one is None else one / row["seconds"]
        row["sent_mib"], row["peak_mib"] = mib(row["sent_bytes"]), mib(row["peak_bytes"])
        row["peak_bytes_per_local_token"] = row["peak_bytes"] / (row["S"] / row["P"])
    title = (f"causal linear attention (LASP-2) fwd+bwd, B=1, H={args.heads}, Dk={args.key_dim}, "
             f"Dv={args.value_dim}, per-head decay, {args.dtype}, {args.layout}; P={args.world} "
             f"ranks x {threads} thread(s) on {cores} cores (one process: {cores} threads); "
             f"median of {args.repeats}; fp32 matmul {rate / 1e9:.1f} GFLOP/s "
             f"({', '.join(f'{r / 1e9:.1f}' for r in rates)})")
    print(f"# {title}")
    print(table(rows, [("P", "P", "d"), ("S", "S", "d"), ("seconds", "fwd+bwd s", ".2f"),
                       ("one_process_seconds", "1 process s", ".2f"),
                       ("efficiency", "efficiency", ".2f"),
                       ("gflops", "GFLOP/s", ".1f"), ("matmul_share", "of matmul", ".0%"),
                       ("one_process_gflops", "1 proc GFLOP/s", ".1f"),
                       ("one_process_matmul_share", "1 proc of matmul", ".0%"),
                       ("us_per_token", "us/token", ".2f"),
                       ("per_token_vs_first", f"per-token / S={rows[0]['S']}", ".2f"),
                       ("sent_bytes", "sent bytes/rank", "d"), ("peak_mib", "peak MiB/rank", ".0f"),
                       ("peak_bytes_per_local_token", "peak B/local token", ".0f")]))
    sent = {r["sent_bytes"] for r in rows}
    per_token_memory = [r["peak_bytes_per_local_token"] for r in rows]
    print(f"# FLOPs: 3 (2 T (Dk + Dv) + 4 Dk Dv) per token and head, T = {block} (fwd + bwd of the "
          f"chunked algorithm, recomputation not counted); efficiency = 1-process time / "
          f"P-rank time, same cores")
    print(f"# per-token time at S={rows[-1]['S']}: {rows[-1]['per_token_vs_first']:.2f} x that at "
          f"S={rows[0]['S']} (target <= 1.1); bytes per rank the same at every S: "
          f"{'yes' if len(sent) == 1 else 'NO'} ({', '.join(str(s) for s in sorted(sent))}); "
          f"peak bytes per local token from {min(per_token_memory):.0f} to {max(per_token_memory):.0f}")
    path = write_json("linear_scaling", {"machine": info, "args": vars(args), "rows": rows,
                                         "matmul_flops": rates}, args.out)
    plot(rows, title, path.with_suffix(".png"))
    print(f"# wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
