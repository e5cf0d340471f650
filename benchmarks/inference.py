"""Long-context inference over the sharded KV cache: prefill, partial prefill, decode.

    python -m benchmarks.inference                   # 4 ranks vs 1 process, S = 16K .. 128K
    python -m benchmarks.inference --world 2 --prefill-seqs 512 --context 1024 \\
        --decode-seqs 512 1024 --repeats 1 --decode-steps 2          # a toy run

Everything runs twice with the same code: on 1 process (all cores) and on P CPU ranks
(cores // P threads each, at least 1; launched like the other benchmarks), fp32, one layer:

* prefill (`seqpar.inference.prefill`, backend ring, zigzag) of S = --prefill-seqs tokens,
  B = 1, --prefill-heads query and K/V heads, D = 64: time of the slowest rank (median of
  --repeats) and the efficiency t_1 / (P * t_P);
* partial prefill (`seqpar.inference.partial_prefill`) of T = 1%, 10%, 50% of a cached context
  of S = --context tokens (rounded to the layout's unit), Hq = --heads, Hkv = --kv-heads:
  pass-KV, pass-Q and the cost model's pick (`mode="auto"`, the CPU profile) timed apart, bytes
  per rank (max over ranks), and whether the pick was the measured faster mode;
* decode (`seqpar.inference.decode`, one token per step) against a cache of S = --decode-seqs
  tokens (filled with random K/V: the context's values do not change the cost): the median
  per-token latency over --decode-steps steps, one process vs P ranks, and the bytes one step
  sends per rank (the all-gather of the partials; the argument check's all-reduce listed
  apart).

Prints three tables, writes JSON and a PNG (prefill efficiency, partial-prefill times, decode
latency) under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist

from benchmarks.common import (header_text, launch, machine, start_rank, table, timed,
                               write_results)

K = 1024
SHARES = (0.01, 0.10, 0.50)
MODES = ("pass-kv", "pass-q", "auto")
PARTS = ("prefill", "partial", "decode")


def _slowest(seconds: list[float]) -> tuple[float, list[float]]:
    """Median over repeats of the slowest rank's time (and the per-repeat maxima)."""
    t = torch.tensor(seconds, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()), t.tolist()


def _max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _unit(world: int, layout: str) -> int:
    return world * (2 if layout == "zigzag" else 1)


def _filled_cache(seq: int, heads_kv: int, dim: int, dtype, seed: int, layout: str):
    """A cache holding `seq` random tokens, sharded as a prefill would leave it."""
    import seqpar
    from seqpar import inference

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed * world + rank)
    local = seq // world
    k, v = (torch.randn(1, local, heads_kv, dim, generator=gen).to(dtype) for _ in range(2))
    cache = inference.ShardedKVCache(None, layout)
    cache.append_sharded(0, k, v, seqpar.positions(seq, layout=layout))
    return cache


def _prefill_rows(config, world, dtype) -> list[dict]:
    from seqpar import inference

    rank, heads, dim, layout = dist.get_rank(), config["prefill_heads"], config["dim"], "zigzag"
    rows = []
    for seq in config["prefill_seqs"]:
        gen = torch.Generator().manual_seed(seq + rank)
        q, k, v = (torch.randn(1, seq // world, heads, dim, generator=gen).to(dtype)
                   for _ in range(3))
        times = []
        for _ in range(config["repeats"]):
            cache = inference.ShardedKVCache(None, layout)
            dist.barrier()
            times.append(timed(lambda: inference.prefill(q, k, v, cache, 0, backend="ring"),
                               torch.device("cpu")))
        seconds, per_repeat = _slowest(times)
        rows.append({"part": "prefill", "P": world, "S": seq, "seconds": seconds,
                     "times": per_repeat})
    return rows


def _partial_rows(config, world, dtype) -> list[dict]:
    import seqpar
    from seqpar import inference
    from seqpar.cost import profile_for
    from seqpar.cost import partial_prefill as model

    rank, layout, dim = dist.get_rank(), "zigzag", config["dim"]
    unit = _unit(world, layout)
    context = config["context"] // unit * unit
    rows = []
    cases = [(kv_heads, share) for kv_heads in config["partial_kv_heads"] for share in SHARES]
    for kv_heads, share in cases if world > 1 else ():  # one process: nothing to choose
        new = max(unit, round(share * context / unit) * unit)
        gen = torch.Generator().manual_seed(int(share * 1000) + rank)
        q = torch.randn(1, new // world, config["heads"], dim, generator=gen).to(dtype)
        k, v = (torch.randn(1, new // world, kv_heads, dim, generator=gen).to(dtype)
                for _ in range(2))
        p = model.PartialPrefill(batch=1, context=context, new=new, heads_q=config["heads"],
                                 heads_kv=kv_heads, head_dim=dim, world=world,
                                 itemsize=q.element_size(), acc_itemsize=4, layout=layout)
        pick, predicted = model.choose(p, profile_for(q.device))
        for mode in MODES:
            times, sent = [], 0
            for repeat in range(config["repeats"]):
                cache = _filled_cache(context, kv_heads, dim, dtype, repeat, layout)
                dist.barrier()
                with seqpar.comm_stats() as stats:
                    times.append(timed(lambda: inference.partial_prefill(
                        q, k, v, cache, 0, mode=mode), torch.device("cpu")))
                sent = max(sent, stats.sent() - stats.sent("agree"))
            seconds, per_repeat = _slowest(times)
            rows.append({"part": "partial", "P": world, "S": context, "T": new, "share": share,
                         "Hkv": kv_heads, "mode": mode, "seconds": seconds, "times": per_repeat,
                         "sent_bytes": _max_over_ranks(sent),
                         "pick": pick, "predicted_kv": predicted["pass-kv"],
                         "predicted_q": predicted["pass-q"]})
    return rows


def _decode_rows(config, world, dtype) -> list[dict]:
    import seqpar
    from seqpar import inference

    layout, dim = "zigzag", config["dim"]
    unit = _unit(world, layout)
    rows = []
    for seq in config["decode_seqs"]:
        seq = seq // unit * unit
        cache = _filled_cache(seq, config["kv_heads"], dim, dtype, 7, layout)
        gen = torch.Generator().manual_seed(seq)  # the new tokens: the same on every rank
        steps = config["decode_steps"]
        q = torch.randn(1, steps + 1, config["heads"], dim, generator=gen).to(dtype)
        k, v = (torch.randn(1, steps + 1, config["kv_heads"], dim, generator=gen).to(dtype)
                for _ in range(2))
        inference.decode(q[:, :1], k[:, :1], v[:, :1], cache, 0)  # warm-up
        times = []
        for t in range(1, steps + 1):
            dist.barrier()
            with seqpar.comm_stats() as stats:
                times.append(timed(lambda: inference.decode(
                    q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, 0), torch.device("cpu")))
        seconds, _ = _slowest(times)
        rows.append({"part": "decode", "P": world, "S": seq, "seconds": seconds,
                     "sent_bytes": _max_over_ranks(stats.sent("decode")),
                     "check_bytes": _max_over_ranks(stats.sent("agree"))})
    return rows


def _worker(config: dict) -> list[dict]:
    from tqdm import tqdm

    rank, world, _, dtype = start_rank(config)
    parts = [(name, run) for name, run in (("prefill", _prefill_rows),
                                           ("partial", _partial_rows), ("decode", _decode_rows))
             if name in config["parts"]]
    rows = []
    for name, run in tqdm(parts, desc=f"inference P={world}", disable=rank != 0,
                          file=sys.stderr):
        rows += run(config, world, dtype)
    dist.destroy_process_group()
    return rows


def summarize(single: list[dict], sharded: list[dict]) -> dict[str, list[dict]]:
    """The three tables' rows from the 1-process and the P-rank runs."""
    world = sharded[0]["P"]
    base = {(r["part"], r["S"]): r for r in single}
    prefill = []
    for r in (r for r in sharded if r["part"] == "prefill"):
        t1 = base[("prefill", r["S"])]["seconds"]
        prefill.append({"S": r["S"], "t1": t1, "tP": r["seconds"], "speedup": t1 / r["seconds"],
                        "efficiency": t1 / (world * r["seconds"])})
    partial = []
    cases = sorted({(r["Hkv"], r["share"]) for r in sharded if r["part"] == "partial"},
                   key=lambda c: (-c[0], c[1]))
    for kv_heads, share in cases:
        runs = {r["mode"]: r for r in sharded if r["part"] == "partial"
                and (r["Hkv"], r["share"]) == (kv_heads, share)}
        kv, q, auto = runs["pass-kv"], runs["pass-q"], runs["auto"]
        faster = "pass-kv" if kv["seconds"] <= q["seconds"] else "pass-q"
        gap = abs(kv["seconds"] - q["seconds"]) / min(kv["seconds"], q["seconds"])
        partial.append({"S": kv["S"], "T": kv["T"], "share": share, "Hkv": kv_heads,
                        "kv_s": kv["seconds"],
                        "q_s": q["seconds"], "auto_s": auto["seconds"], "pick": kv["pick"],
                        "faster": faster, "gap": gap, "right": kv["pick"] == faster,
                        "kv_mib": kv["sent_bytes"] / 2**20, "q_mib": q["sent_bytes"] / 2**20,
                        "pred_kv": kv["predicted_kv"], "pred_q": kv["predicted_q"]})
    decode = []
    for r in (r for r in sharded if r["part"] == "decode"):
        t1 = min((s for s in single if s["part"] == "decode"),
                 key=lambda s: abs(s["S"] - r["S"]))["seconds"]
        decode.append({"S": r["S"], "t1_ms": 1e3 * t1, "tP_ms": 1e3 * r["seconds"],
                       "ratio": r["seconds"] / t1, "bytes": r["sent_bytes"],
                       "check_bytes": r["check_bytes"]})
    return {"prefill": prefill, "partial": partial, "decode": decode}


def plot(rows: dict, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    pre = rows["prefill"]
    axes[0].plot([r["S"] for r in pre], [r["efficiency"] for r in pre], marker="o")
    axes[0].set_ylabel("prefill efficiency t1 / (P tP)")
    axes[0].set_ylim(bottom=0)
    part = rows["partial"]
    xs = range(len(part))
    for offset, (key, label) in enumerate((("kv_s", "pass-KV"), ("q_s", "pass-Q"),
                                           ("auto_s", "model's pick"))):
        axes[1].bar([x + 0.27 * (offset - 1) for x in xs], [r[key] for r in part], width=0.27,
                    label=label)
    axes[1].set_xticks(list(xs), [f"Hkv={r['Hkv']}\nT={r['share']:.0%} S" for r in part])
    axes[1].set_ylabel("partial prefill seconds")
    axes[1].legend()
    dec = rows["decode"]
    axes[2].plot([r["S"] for r in dec], [r["t1_ms"] for r in dec], marker="o", label="1 process")
    axes[2].plot([r["S"] for r in dec], [r["tP_ms"] for r in dec], marker="o", label="P ranks")
    axes[2].set_ylabel("decode ms / token")
    axes[2].legend()
    for ax, part in ((axes[0], pre), (axes[2], dec)):
        if part:  # a part that was not run (--parts) leaves its panel empty
            ax.set_xscale("log", base=2)
        ax.set_xlabel("context S")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PREFILL_COLUMNS = [("S", "S", "d"), ("t1", "1 process s", ".3f"), ("tP", "P ranks s", ".3f"),
                   ("speedup", "speed-up", ".2f"), ("efficiency", "efficiency", ".0%")]
PARTIAL_COLUMNS = [("Hkv", "Hkv", "d"), ("S", "S", "d"), ("T", "T", "d"), ("kv_s", "pass-KV s", ".3f"),
                   ("q_s", "pass-Q s", ".3f"), ("auto_s", "auto s", ".3f"), ("pick", "pick", "s"),
                   ("faster", "measured faster", "s"), ("gap", "gap", ".0%"),
                   ("kv_mib", "pass-KV MiB/rank", ".2f"), ("q_mib", "pass-Q MiB/rank", ".2f")]
DECODE_COLUMNS = [("S", "S", "d"), ("t1_ms", "1 process ms", ".2f"), ("tP_ms", "P ranks ms", ".2f"),
                  ("ratio", "P / 1", ".2f"), ("bytes", "bytes/step/rank", "d"),
                  ("check_bytes", "check bytes", "d")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--prefill-seqs", type=int, nargs="+",
                        default=[16 * K, 32 * K, 64 * K, 128 * K])
    parser.add_argument("--prefill-heads", type=int, default=1)
    parser.add_argument("--context", type=int, default=32 * K)
    parser.add_argument("--decode-seqs", type=int, nargs="+",
                        default=[16 * K, 32 * K, 64 * K, 128 * K])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="K/V heads of decode")
    parser.add_argument("--partial-kv-heads", type=int, nargs="+", default=[8, 2],
                        help="K/V heads of the partial prefill cases (MHA and GQA by default)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    unit = _unit(args.world, "zigzag")
    bad = [s for s in args.prefill_seqs if s % unit]
    if bad:
        parser.error(f"--prefill-seqs {bad} are not divisible by {unit} (2 x {args.world} ranks)")
    if any(args.heads % h for h in [args.kv_heads] + args.partial_kv_heads):
        parser.error(f"--heads {args.heads} must be a multiple of every K/V head count")

    info = machine()
    cores = info["cores"] or 1
    print(header_text(info), flush=True)
    config = {"prefill_seqs": sorted(args.prefill_seqs), "prefill_heads": args.prefill_heads,
              "context": args.context, "decode_seqs": sorted(args.decode_seqs),
              "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
              "partial_kv_heads": args.partial_kv_heads, "parts": args.parts,
              "repeats": args.repeats, "decode_steps": args.decode_steps, "dtype": "float32"}
    single = launch(1, _worker, {**config, "threads": cores})
    sharded = launch(args.world, _worker, {**config, "threads": max(1, cores // args.world)})
    summary = summarize(single, sharded)
    print(f"# prefill (ring, zigzag, causal), B=1, H={args.prefill_heads}, D={args.dim}, fp32; "
          f"1 process x {cores} threads vs P={args.world} ranks x "
          f"{max(1, cores // args.world)}; median of {args.repeats}")
    print(table(summary["prefill"], PREFILL_COLUMNS))
    print(f"# partial prefill: T new tokens against S cached, Hq={args.heads}, D={args.dim}, "
          f"P={args.world}; pick = the cost model's (CPU profile); gap = |pass-KV - pass-Q| / "
          f"the faster")
    print(table(summary["partial"], PARTIAL_COLUMNS))
    clear = [r for r in summary["partial"] if r["gap"] >= 0.15]
    right = sum(r["right"] for r in clear)
    print(f"# the pick was the measured faster mode in {right} of {len(clear)} cases that "
          f"differ by >= 15% ({sum(r['right'] for r in summary['partial'])} of "
          f"{len(summary['partial'])} in all)")
    print(f"# decode, one token per step, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}: "
          f"median of {args.decode_steps} steps")
    print(table(summary["decode"], DECODE_COLUMNS))
    sizes = {r["bytes"] for r in summary["decode"]}
    print(f"# decode bytes per step and rank the same at every S: "
          f"{'yes' if len(sizes) == 1 else 'NO'} ({', '.join(str(s) for s in sorted(sizes))})")
    write_results("inference", {"machine": info, "args": vars(args), "rows": summary,
                                "single": single, "sharded": sharded}, args.out, plot)


if __name__ == "__main__":
    main()
