"""LASP-2 to a million tokens: linear attention forward + backward on P CPU ranks as S grows.

    python -m benchmarks.linear_scaling                          # 4 ranks, S = 64K .. 1,048,576
    python -m benchmarks.linear_scaling --world 2 --seqs 2048 8192 --repeats 1   # a toy run

For every S: causal linear attention with per-head decay (B=1, H=4, Dk=Dv=64, fp32 by default)
through `seqpar.linear_attention`, on P CPU ranks launched with torchrun's machinery
(`benchmarks.common.launch`: each rank cores // P threads, at least 1, OMP_NUM_THREADS set).
Each rank draws its own shard of q, k, v, dO, so the full sequence never exists anywhere, as in
training. One warm-up at the smallest S; then per S the median over `--repeats` of the fwd+bwd
time of the slowest rank. Reported per S:

* time, and per-token time = time / S with its ratio to the smallest S's
  (target: <= 1.1 at 1M — the cost per token does not grow with the sequence);
* bytes LASP-2 sends per rank, forward + backward (`seqpar.comm_stats`, ops "lasp2.*"; the
  few hundred bytes of the argument check are left out; target: the same at every S — LASP-2
  moves only d x e states);
* peak memory per rank: the resident-set high-water mark over drawing the shard and running
  fwd+bwd (`benchmarks.common.peak_memory`), and that peak per local token (target: constant,
  i.e. memory linear in S/P).

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


def _worker(config: dict) -> list[dict]:
    import seqpar
    from tqdm import tqdm

    rank, world, device, dtype = start_rank(config)
    decay = head_decays(config["heads"])

    def run(seq: int, seed: int) -> tuple[float, int, int]:
        """(fwd+bwd seconds, bytes sent, peak bytes) of one step on a fresh shard."""
        local = seq // world
        with peak_memory(device) as peak:
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
            del q, k, v, do
        return seconds, stats.sent("lasp2."), peak.bytes

    run(config["seqs"][0], seed=0)  # warm-up: first-call costs, gloo buffers
    rows = []
    sweep = tqdm(config["seqs"], desc=f"LASP-2 sweep, P={world}", unit="S", disable=rank != 0,
                 file=sys.stderr)
    for seq in sweep:
        sweep.set_postfix(S=seq)
        results = [run(seq, seed=seq + r) for r in range(config["repeats"])]
        slowest = torch.tensor([r[0] for r in results], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        totals = torch.tensor([float(max(r[1] for r in results)), float(max(r[2] for r in results))],
                              dtype=torch.float64)
        dist.all_reduce(totals, op=dist.ReduceOp.MAX)
        rows.append({"P": world, "S": seq, "seconds": statistics.median(slowest.tolist()),
                     "times": slowest.tolist(), "sent_bytes": int(totals[0].item()),
                     "peak_bytes": int(totals[1].item())})
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
              "repeats": args.repeats, "threads": threads}
    rows = launch(args.world, _worker, config)
    first = rows[0]["seconds"] / rows[0]["S"]
    for row in rows:
        row["us_per_token"] = row["seconds"] / row["S"] * 1e6
        row["per_token_vs_first"] = row["seconds"] / row["S"] / first
        row["sent_mib"], row["peak_mib"] = mib(row["sent_bytes"]), mib(row["peak_bytes"])
        row["peak_bytes_per_local_token"] = row["peak_bytes"] / (row["S"] / row["P"])
    title = (f"causal linear attention (LASP-2) fwd+bwd, B=1, H={args.heads}, Dk={args.key_dim}, "
             f"Dv={args.value_dim}, per-head decay, {args.dtype}, {args.layout}; P={args.world} "
             f"ranks x {threads} thread(s) on {cores} cores; median of {args.repeats}")
    print(f"# {title}")
    print(table(rows, [("P", "P", "d"), ("S", "S", "d"), ("seconds", "fwd+bwd s", ".2f"),
                       ("us_per_token", "us/token", ".2f"),
                       ("per_token_vs_first", f"per-token / S={rows[0]['S']}", ".2f"),
                       ("sent_bytes", "sent bytes/rank", "d"), ("peak_mib", "peak MiB/rank", ".0f"),
                       ("peak_bytes_per_local_token", "peak B/local token", ".0f")]))
    sent = {r["sent_bytes"] for r in rows}
    per_token_memory = [r["peak_bytes_per_local_token"] for r in rows]
    print(f"# per-token time at S={rows[-1]['S']}: {rows[-1]['per_token_vs_first']:.2f} x that at "
          f"S={rows[0]['S']} (target <= 1.1); bytes per rank the same at every S: "
          f"{'yes' if len(sent) == 1 else 'NO'} ({', '.join(str(s) for s in sorted(sent))}); "
          f"peak bytes per local token from {min(per_token_memory):.0f} to {max(per_token_memory):.0f}")
    path = write_json("linear_scaling", {"machine": info, "args": vars(args), "rows": rows}, args.out)
    plot(rows, title, path.with_suffix(".png"))
    print(f"# wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
