"""Ring vs TokenRing step by step: time per step and bytes per rank, MHA vs GQA.

    python -m benchmarks.tokenring                        # P in {2, 4}, S = 8K, Hkv in {8, 2}
    python -m benchmarks.tokenring --worlds 4 --seqs 16384 --kv-heads 8 2 1 --repeats 3

For every (P, S, Hkv) and both backends (causal, `--layout` zigzag by default, B=1, Hq=8,
D=64, fp32 by default) on P CPU ranks (cores // P threads each, launched like
`benchmarks.attention`):

* forward and backward timed apart (median over `--repeats`, slowest rank), per step (/ P);
* bytes each rank sends forward and backward (max over ranks, from `seqpar.comm_stats`);
* one middle step's communication alone, without compute, through the same `RingExchange`:
  ring sends K+V (Hkv heads) to r + 1; TokenRing posts Q (Hq heads) to r + 1 and a full
  partial (o, lse) to r - 1 in one batch -- the two directions a bidirectional link carries
  at once (median over `--comm-repeats` exchanges).

Prints a table, writes JSON and a PNG under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import header_text, launch, machine, mib, table, write_results

BACKENDS = ("ring", "tokenring")


def _slowest(values: list[float]) -> float:
    """Median over repeats of the slowest rank's time."""
    slowest = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _comm_step(backend: str, q: torch.Tensor, k: torch.Tensor, repeats: int) -> float:
    """Seconds of one middle step's messages alone (no compute)."""
    from seqpar.comm.primitives import DirectMessages, RingExchange, Traffic, resolve_group

    info = resolve_group(None)
    ring = RingExchange(info, Traffic("bench", ()))
    if backend == "ring":
        block, partial = torch.stack([k, k]), None
    else:  # queries forward; a full-row partial (o in the input dtype + fp32 lse) backward
        block = q.contiguous()
        partial = torch.empty(q.numel() * q.element_size() + q[..., 0].numel() * 4,
                              dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):  # the first exchange sets up the buffers
        dist.barrier()
        start = time.perf_counter()
        direct = None if partial is None else DirectMessages(
            send=[partial], to=(info.rank - 1) % info.world,
            receive=[torch.empty_like(partial)], source=(info.rank + 1) % info.world)
        ring.start([block], direct=direct)
        ring.wait()
        times.append(time.perf_counter() - start)
    return _slowest(times[1:])


def _worker(config: dict) -> list[dict]:
    import seqpar

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(config["threads"])
    dtype = getattr(torch, config["dtype"])
    layout, heads, dim = config["layout"], config["heads"], config["dim"]
    rows = []
    for seq in config["seqs"]:
        for kv_heads in config["kv_heads"]:
            gen = torch.Generator().manual_seed(seq)
            q, do = (torch.randn(1, seq, heads, dim, generator=gen).to(dtype) for _ in range(2))
            k, v = (torch.randn(1, seq, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
            local = [seqpar.shard(t, layout=layout) for t in (q, k, v, do)]
            for backend in BACKENDS:
                fwd, bwd, sent = [], [], {}
                for _ in range(config["repeats"] + 1):  # the first run is a warm-up
                    q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
                    dist.barrier()
                    with seqpar.comm_stats() as stats:
                        start = time.perf_counter()
                        o = seqpar.attention(q_l, k_l, v_l, backend=backend, causal=True,
                                             layout=layout)
                        middle = time.perf_counter()
                        o.backward(local[3])
                        end = time.perf_counter()
                    fwd.append(middle - start)
                    bwd.append(end - middle)
                    sent = {phase: stats.sent(f"{backend}.{phase}") for phase in ("fwd", "bwd")}
                totals = torch.tensor([sent["fwd"], sent["bwd"]], dtype=torch.float64)
                dist.all_reduce(totals, op=dist.ReduceOp.MAX)
                row = {"P": world, "S": seq, "Hq": heads, "Hkv": kv_heads, "backend": backend,
                       "layout": layout, "fwd_s": _slowest(fwd[1:]), "bwd_s": _slowest(bwd[1:]),
                       "comm_step_s": _comm_step(backend, local[0], local[1],
                                                 config["comm_repeats"]),
                       "fwd_bytes": int(totals[0].item()), "bwd_bytes": int(totals[1].item())}
                row["fwd_step_ms"] = 1e3 * row["fwd_s"] / world
                row["bwd_step_ms"] = 1e3 * row["bwd_s"] / world
                rows.append(row)
                if rank == 0:
                    print(f"  P={world} S={seq} Hkv={kv_heads} {backend}: fwd "
                          f"{row['fwd_step_ms']:.1f} ms/step, bwd {row['bwd_step_ms']:.1f} ms/step",
                          flush=True)
    dist.destroy_process_group()
    return rows


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"P{r['P']} S{r['S']} Hkv{r['Hkv']}\n{r['backend']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.5 * len(rows)), 5))
    axes[0].bar(labels, [r["fwd_step_ms"] for r in rows], label="forward")
    axes[0].bar(labels, [r["bwd_step_ms"] for r in rows], bottom=[r["fwd_step_ms"] for r in rows],
                label="backward")
    axes[0].set_ylabel("ms per step (fwd + bwd stacked)")
    axes[0].legend()
    axes[1].bar(labels, [1e3 * r["comm_step_s"] for r in rows])
    axes[1].set_ylabel("ms, one step's messages alone")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, labelrotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comm-repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    bad = [h for h in args.kv_heads if args.heads % h]
    if bad:
        parser.error(f"--kv-heads {bad} do not divide --heads {args.heads}")

    info = machine()
    cores = info["cores"] or 1
    print(header_text(info), flush=True)
    rows = []
    for world in args.worlds:
        config = {**vars(args), "threads": max(1, cores // world)}
        rows += launch(world, _worker, config)
    for row in rows:
        ring = next(r for r in rows if r["backend"] == "ring" and
                    all(r[key] == row[key] for key in ("P", "S", "Hkv")))
        row["bytes_vs_ring"] = (row["fwd_bytes"] + row["bwd_bytes"]) / max(
            1, ring["fwd_bytes"] + ring["bwd_bytes"])
        row["step_vs_ring"] = (row["fwd_s"] + row["bwd_s"]) / (ring["fwd_s"] + ring["bwd_s"])
        row["comm_ms"] = 1e3 * row["comm_step_s"]
        row["fwd_mib"], row["bwd_mib"] = mib(row["fwd_bytes"]), mib(row["bwd_bytes"])
    print(f"# causal attention, {args.layout}, B=1, Hq={args.heads}, D={args.dim}, {args.dtype}; "
          f"{cores} cores shared by the P ranks; median of {args.repeats}")
    print(table(rows, [("P", "P", "d"), ("S", "S", "d"), ("Hkv", "Hkv", "d"),
                       ("backend", "backend", "s"), ("fwd_step_ms", "fwd ms/step", ".1f"),
                       ("bwd_step_ms", "bwd ms/step", ".1f"),
                       ("step_vs_ring", "time / ring", ".2f"),
                       ("comm_ms", "one step's messages alone ms", ".2f"),
                       ("fwd_mib", "fwd MiB/rank", ".2f"), ("bwd_mib", "bwd MiB/rank", ".2f"),
                       ("bytes_vs_ring", "bytes / ring", ".2f")]))
    write_results("tokenring", {"machine": info, "args": vars(args), "rows": rows}, args.out, plot)


if __name__ == "__main__":
    main()
