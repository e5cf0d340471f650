"""Long-context inference over the sharded KV cache: prefill, partial prefill, decode.

    python -m benchmarks.inference                   # 4 ranks vs 1 process, S = 16K .. 128K
    python -m benchmarks.inference --world 2 --prefill-seqs 512 --contexts 1024 \\
        --decode-seqs 512 1024 --repeats 1 --decode-steps 2          # a toy run

Everything runs twice with the same code: on 1 process (all cores) and on P CPU ranks
(cores // P threads each, at least 1; launched like the other benchmarks), fp32, one layer:

* prefill (`seqpar.inference.prefill`, backend ring, zigzag) of S = --prefill-seqs tokens,
  B = 1, --prefill-heads query and K/V heads, D = 64: time of the slowest rank (median of
  --repeats) and the efficiency t_1 / (P * t_P);
* partial prefill (`seqpar.inference.partial_prefill`) of T = 1%, 10%, 50% of cached contexts
  S = --contexts tokens (rounded to the layout's unit), Hq = --heads, Hkv = --partial-kv-heads:
  pass-KV and pass-Q timed (interleaved, both orders), bytes per rank (max over ranks), and
  the cost model's pick (what `mode="auto"` runs) for the CPU default profile and every
  --profiles JSON (e.g. one `python -m seqpar.cost calibrate --ranks 4` measured): whether it
  was the measured faster mode, counted over the cases that differ by >= 15%;
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
MODES = ("pass-kv", "pass-q")
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

    rank, layout, dim = dist.get_rank(), "zigzag", config["dim"]
    unit = _unit(world, layout)
    rows = []
    cases = [(context // unit * unit, kv_heads, share) for context in config["contexts"]
             for kv_heads in config["partial_kv_heads"] for share in SHARES]
    for context, kv_heads, share in cases if world > 1 else ():  # one process: no choice
        new = max(unit, round(share * context / unit) * unit)
        gen = torch.Generator().manual_seed(int(share * 1000) + rank)
        q = torch.randn(1, new // world, config["heads"], dim, generator=gen).to(dtype)
        k, v = (torch.randn(1, new // world, kv_heads, dim, generator=gen).to(dtype)
                for _ in range(2))
        times = {mode: [] for mode in MODES}
        sent = dict.fromkeys(MODES, 0)
        for repeat in range(config["repeats"]):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:  # interleaved, both orders
                cache = _filled_cache(context, kv_heads, dim, dtype, repeat, layout)
                dist.barrier()
                with seqpar.comm_stats() as stats:
                    times[mode].append(timed(lambda: inference.partial_prefill(
                        q, k, v, cache, 0, mode=mode), torch.device("cpu")))
                sent[mode] = max(sent[mode], stats.sent() - stats.sent("agree"))
        for mode in MODES:
            seconds, per_repeat = _slowest(times[mode])
            rows.append({"part": "partial", "P": world, "S": context, "T": new, "share": share,
                         "Hkv": kv_heads, "Hq": config["heads"], "D": dim, "mode": mode,
                         "seconds": seconds, "times": per_repeat,
                         "sent_bytes": _max_over_ranks(sent[mode])})
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
        # the memory floor: every rank reads its K and V shard once, all at the same time
        keys, values = cache.keys(0), cache.values(0)
        reads = []
        for _ in range(5):
            dist.barrier()
            reads.append(timed(lambda: (keys.sum(), values.sum()), torch.device("cpu")))
        read_seconds, _ = _slowest(reads)
        rows.append({"part": "decode", "P": world, "S": seq, "seconds": seconds,
                     "read_seconds": min(read_seconds, min(reads)) if world == 1 else
                     read_seconds,
                     "cache_bytes": 2 * seq * config["kv_heads"] * dim * q.element_size(),
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


def best_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per measurement: the round with the least time (a shared machine only ever
    adds time), the times of every round kept."""
    best: dict[tuple, dict] = {}
    for rows in rounds:
        for r in rows:
            key = (r["part"], r["P"], r["S"], r.get("T"), r.get("Hkv"), r.get("mode"))
            kept = best.get(key)
            seen = (kept["round_seconds"] if kept else []) + [r["seconds"]]
            if kept is None or r["seconds"] < kept["seconds"]:
                best[key] = dict(r)
            best[key]["round_seconds"] = seen
    return list(best.values())


def picks(case: dict, profiles: dict) -> dict:
    """Each profile's predicted seconds and pick for one partial-prefill case."""
    from seqpar.cost import partial_prefill as model

    p = model.PartialPrefill(batch=1, context=case["S"], new=case["T"], heads_q=case["Hq"],
                             heads_kv=case["Hkv"], head_dim=case["D"], world=case["P"],
                             itemsize=4, acc_itemsize=4, layout="zigzag")
    out = {}
    for name, profile in profiles.items():
        pick, predicted = model.choose(p, profile)
        out[name] = {"pick": pick, "pred_kv": predicted["pass-kv"],
                     "pred_q": predicted["pass-q"]}
    return out


def summarize(single: list[dict], sharded: list[dict], profiles: dict) -> dict[str, list[dict]]:
    """The three tables' rows from the 1-process and the P-rank runs. The pick of the first
    profile is the one `mode="auto"` makes with it; its time is the measured time of the mode
    it picks (auto runs exactly that code: the model's call takes microseconds)."""
    world = sharded[0]["P"]
    main = next(iter(profiles))
    base = {(r["part"], r["S"]): r for r in single}
    prefill = []
    for r in (r for r in sharded if r["part"] == "prefill"):
        t1 = base[("prefill", r["S"])]["seconds"]
        prefill.append({"S": r["S"], "t1": t1, "tP": r["seconds"], "speedup": t1 / r["seconds"],
                        "efficiency": t1 / (world * r["seconds"])})
    partial = []
    cases = sorted({(r["S"], r["Hkv"], r["share"]) for r in sharded if r["part"] == "partial"},
                   key=lambda c: (c[0], -c[1], c[2]))
    for context, kv_heads, share in cases:
        runs = {r["mode"]: r for r in sharded if r["part"] == "partial"
                and (r["S"], r["Hkv"], r["share"]) == (context, kv_heads, share)}
        kv, q = runs["pass-kv"], runs["pass-q"]
        faster = "pass-kv" if kv["seconds"] <= q["seconds"] else "pass-q"
        gap = abs(kv["seconds"] - q["seconds"]) / min(kv["seconds"], q["seconds"])
        chosen = picks(kv, profiles)
        row = {"S": context, "T": kv["T"], "share": share, "Hkv": kv_heads,
               "kv_s": kv["seconds"], "q_s": q["seconds"], "faster": faster, "gap": gap,
               "kv_mib": kv["sent_bytes"] / 2**20, "q_mib": q["sent_bytes"] / 2**20,
               "profiles": chosen, "pick": chosen[main]["pick"],
               "right": chosen[main]["pick"] == faster,
               "pred_kv": chosen[main]["pred_kv"], "pred_q": chosen[main]["pred_q"]}
        row["auto_s"] = row["kv_s"] if row["pick"] == "pass-kv" else row["q_s"]
        partial.append(row)
    decode = []
    for r in (r for r in sharded if r["part"] == "decode"):
        one = min((s for s in single if s["part"] == "decode"), key=lambda s: abs(s["S"] - r["S"]))
        t1 = one["seconds"]
        decode.append({"S": r["S"], "t1_ms": 1e3 * t1, "tP_ms": 1e3 * r["seconds"],
                       "ratio": r["seconds"] / t1, "bytes": r["sent_bytes"],
                       "check_bytes": r["check_bytes"], "cache_mib": r["cache_bytes"] / 2**20,
                       "bw1": r["cache_bytes"] / t1 / 1e9, "bwP": r["cache_bytes"] / r["seconds"] / 1e9,
                       "read1_ms": 1e3 * one["read_seconds"], "readP_ms": 1e3 * r["read_seconds"]})
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
PARTIAL_COLUMNS = [("S", "S", "d"), ("Hkv", "Hkv", "d"), ("T", "T", "d"),
                   ("kv_s", "pass-KV s", ".3f"), ("q_s", "pass-Q s", ".3f"),
                   ("pred_kv", "model KV s", ".3f"), ("pred_q", "model Q s", ".3f"),
                   ("pick", "pick", "s"),
                   ("faster", "measured faster", "s"), ("gap", "gap", ".0%"),
                   ("kv_mib", "pass-KV MiB/rank", ".2f"), ("q_mib", "pass-Q MiB/rank", ".2f")]
DECODE_COLUMNS = [("S", "S", "d"), ("t1_ms", "1 process ms", ".2f"), ("tP_ms", "P ranks ms", ".2f"),
                  ("ratio", "P / 1", ".2f"), ("cache_mib", "K+V MiB read", ".0f"),
                  ("bw1", "1 proc GB/s", ".1f"), ("bwP", "P ranks GB/s", ".1f"),
                  ("read1_ms", "read floor 1 ms", ".2f"), ("readP_ms", "read floor P ms", ".2f"),
                  ("bytes", "bytes/step/rank", "d"), ("check_bytes", "check bytes", "d")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--prefill-seqs", type=int, nargs="+",
                        default=[16 * K, 32 * K, 64 * K, 128 * K])
    parser.add_argument("--prefill-heads", type=int, default=1)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8 * K, 16 * K, 32 * K],
                        help="cached contexts S of the partial prefill cases")
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
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the 1-process and P-rank runs this many times; each "
                             "measurement keeps its best round")
    parser.add_argument("--profiles", nargs="*", default=[],
                        help="profile JSONs (seqpar.cost calibrate) whose pass-KV / pass-Q pick "
                             "is scored too; the first one given is the main pick (else the "
                             "CPU default profile)")
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
              "contexts": args.contexts, "decode_seqs": sorted(args.decode_seqs),
              "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
              "partial_kv_heads": args.partial_kv_heads, "parts": args.parts,
              "repeats": args.repeats, "decode_steps": args.decode_steps, "dtype": "float32"}
    from pathlib import Path

    from seqpar.cost import Profile
    from seqpar.cost.hardware import CPU_DEFAULT
    profiles = {Path(path).stem: Profile.load(path) for path in args.profiles}
    profiles[CPU_DEFAULT.name] = CPU_DEFAULT
    singles, shardeds = [], []
    for _ in range(args.rounds):  # both sides of each comparison in every round, alternating
        singles.append(launch(1, _worker, {**config, "threads": cores}))
        shardeds.append(launch(args.world, _worker,
                               {**config, "threads": max(1, cores // args.world)}))
    single, sharded = best_of_rounds(singles), best_of_rounds(shardeds)
    summary = summarize(single, sharded, profiles)
    print(f"# prefill (ring, zigzag, causal), B=1, H={args.prefill_heads}, D={args.dim}, fp32; "
          f"1 process x {cores} threads vs P={args.world} ranks x "
          f"{max(1, cores // args.world)}; median of {args.repeats}")
    print(table(summary["prefill"], PREFILL_COLUMNS))
    print(f"# partial prefill: T new tokens against S cached, Hq={args.heads}, D={args.dim}, "
          f"P={args.world}; pick = the cost model's (CPU profile); gap = |pass-KV - pass-Q| / "
          f"the faster")
    print(table(summary["partial"], PARTIAL_COLUMNS))
    clear = [r for r in summary["partial"] if r["gap"] >= 0.15]
    for name in profiles:
        right = sum(r["profiles"][name]["pick"] == r["faster"] for r in clear)
        every = sum(r["profiles"][name]["pick"] == r["faster"] for r in summary["partial"])
        print(f"# profile {name}: the pick was the measured faster mode in {right} of "
              f"{len(clear)} cases that differ by >= 15% ({every} of {len(summary['partial'])} "
              f"in all)")
    print(f"# decode, one token per step, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}, "
          f"fp32: median of {args.decode_steps} steps (best of {args.rounds} alternating "
          f"rounds); 1 process x {cores} threads vs P={args.world} ranks x "
          f"{max(1, cores // args.world)}; GB/s = K+V bytes read per step / step time; read "
          f"floor = one sum over the K and V (every rank its shard, all at once)")
    print(table(summary["decode"], DECODE_COLUMNS))
    sizes = {r["bytes"] for r in summary["decode"]}
    print(f"# decode bytes per step and rank the same at every S: "
          f"{'yes' if len(sizes) == 1 else 'NO'} ({', '.join(str(s) for s in sorted(sizes))})")
    write_results("inference", {"machine": info, "args": vars(args), "rows": summary,
                                "single": single, "sharded": sharded,
                                "profiles": {name: p.to_json() for name, p in profiles.items()}},
                  args.out, plot)


if __name__ == "__main__":
    main()
