"""Scaling sweep: every seqpar backend (usp at every U x R) and the peers, over S and P.

    python -m benchmarks.scaling                          # P in {2, 4}, S in {4K, 8K, 16K}
    python -m benchmarks.scaling --worlds 2 4 8 --seqs 8192 16384 32768 --repeats 3
    python -m benchmarks.scaling --worlds 2 --seqs 512 --repeats 1 --no-model   # a toy run

For every P, the P CPU ranks (launched like `benchmarks.attention`: torchrun's machinery,
cores // P threads each) first calibrate the cost model on themselves (`seqpar.cost.calibrate`;
--no-model skips it), then run `benchmarks.attention.measure_world` over every S: causal
fwd+bwd (B=1, H=8, D=64, fp32 by default) of each method that can split the heads over P:

* seqpar ring, tokenring, ulysses, allgather (zigzag), usp with every Ulysses degree U of
  `attention.USP_DEGREES` dividing P (U x R, R = P / U; Ulysses inside groups of U consecutive
  ranks), LASP-2 linear attention on the same shapes (timed, not compared; its efficiency is
  against the softmax single-process time);
* the peers: PyTorch's ring (all-gather rotation) and DeepSpeed-Ulysses (when installed).
  DeepSpeed-Ulysses runs in processes of its own: once `deepspeed.init_distributed` has run,
  every other method in the same processes was measured slower (seqpar ring at P=2, S=512 on
  the 2-core VM: 89 ms next to it, 60 ms without), so its max-|o| check compares it to itself.

Reported per (P, S, method): fwd+bwd time (median over --repeats, slowest rank), efficiency
(single-process time with all cores / parallel time, as in `benchmarks.attention`), peak memory
per rank, bytes sent per rank, and the communication left EXPOSED after overlap.

Exposed communication is measured, not inferred: in one extra step per method every rank
records the seconds it spends blocked on communication -- each wait on a posted exchange or
collective (a transfer that did not finish behind the computation posted beside it) and the
whole of every synchronous collective (nothing overlaps those) -- through
`seqpar.comm_stats(time_waits=True)`, and the slowest rank's total is reported. It includes
time waiting for a slower peer to send (imbalance shows up as exposed time, as it costs the
same). The peers' internals are not instrumented: their exposed time is left blank.

With the model on, every seqpar softmax row also gets the model's prediction from the profile
calibrated on the same ranks, and the run reports the model's agreement: of the pairs of
seqpar backends at one (P, S) whose measured times clearly differ (every repeat in the same
order, medians >= 15% apart), how many the model orders the same way.

A tqdm bar (rank 0) tracks each P. Writes, named by machine and date under benchmarks/results/
(or --out): scaling-<host>-<stamp>.json (machine header, arguments, rows, profiles), .csv,
.md (summary with the machine header), and PNGs .time.png (time vs S), .efficiency.png
(efficiency vs P), .memory.png (peak memory vs S), .bytes.png (bytes per rank vs S).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
import torch.distributed as dist

from benchmarks import attention
from benchmarks.common import (header_text, launch, machine, markdown_table, mib, results_stem,
                               save_figure, start_rank, table, write_csv)

SEQPAR_BACKENDS = ("ring", "tokenring", "ulysses", "allgather")
PEERS = (attention.BASELINE_PEER, attention.ULYSSES_PEER)
LASP2 = "seqpar lasp2 linear (zigzag)"
CLEARLY = 1.15  # medians this far apart, and every repeat in the same order: a clear pair


def method_specs() -> dict[str, tuple[str, int | None]]:
    """Method name -> (seqpar backend, usp degree or None) for the seqpar softmax rows."""
    specs = {attention.seqpar_method(b, "zigzag").name: (b, None) for b in SEQPAR_BACKENDS}
    for degree in attention.USP_DEGREES:
        specs[attention.seqpar_method("usp", "zigzag", ulysses=degree).name] = ("usp", degree)
    return specs


def default_methods() -> list[str]:
    return list(method_specs()) + [LASP2] + [p for p in PEERS if p in attention.METHODS]


def _worker(config: dict) -> dict:
    from tqdm import tqdm

    import seqpar.cost

    rank, world, device, dtype = start_rank(config)
    profile = None
    if config["model"]:
        profile = seqpar.cost.calibrate(head_dims=(config["dim"],), dtype=dtype,
                                        repeats=config["repeats"]).to_json()
    fitting = [m for m in config["methods"] if attention.METHODS[m].fits(world, config)]
    bar = tqdm(total=len(config["seqs"]) * len(fitting), desc=f"scaling P={world}", unit="run",
               disable=rank != 0, file=sys.stderr)

    def progress(line: str) -> None:
        bar.update(1)
        bar.set_postfix_str(line)
    rows = attention.measure_world(config, rank, world, device, dtype, progress)
    bar.close()
    dist.destroy_process_group()
    return {"rows": rows, "profile": profile}


def predict_rows(rows: list[dict], profiles: dict[int, dict], config: dict) -> None:
    """Add the model's fwd+bwd prediction (profile calibrated at that P) to seqpar rows."""
    from seqpar.cost import Problem, Profile, predict

    specs = method_specs()
    itemsize = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    for row in rows:
        profile = profiles.get(row["P"])
        if row["method"] not in specs or profile is None:
            continue
        backend, degree = specs[row["method"]]
        problem = Problem(batch=1, seq_len=row["S"], heads_q=config["heads"],
                          heads_kv=config["kv_heads"], head_dim=config["dim"], world=row["P"],
                          itemsize=itemsize, acc_itemsize=4, causal=True, layout="zigzag",
                          ulysses=degree if backend == "usp" else None)
        prediction = predict(backend, problem, Profile.from_json(profile))
        row["predicted_s"] = prediction.seconds
        row["predicted_exposed_s"] = prediction.exposed


def clear_pairs(rows: list[dict], problem=lambda r: (r["P"], r["S"])) -> list[tuple[dict, dict]]:
    """Pairs of rows of one problem (default: one (P, S)) with predictions whose measured times
    clearly differ: every repeat in the same order and medians >= CLEARLY apart."""
    pairs = []
    predicted = [r for r in rows if r.get("predicted_s") is not None]
    for _, group in itertools.groupby(sorted(predicted, key=problem), key=problem):
        for a, b in itertools.combinations(list(group), 2):
            unanimous = max(a["times"]) < min(b["times"]) or max(b["times"]) < min(a["times"])
            ta, tb = statistics.median(a["times"]), statistics.median(b["times"])
            if unanimous and max(ta, tb) >= CLEARLY * min(ta, tb):
                pairs.append((a, b))
    return pairs


def in_predicted_order(a: dict, b: dict) -> bool:
    return ((statistics.median(a["times"]) < statistics.median(b["times"]))
            == (a["predicted_s"] < b["predicted_s"]))


def model_agreement(rows: list[dict], problem=lambda r: (r["P"], r["S"])) -> tuple[int, int]:
    """(pairs ordered as predicted, clearly different pairs) over every problem."""
    pairs = clear_pairs(rows, problem)
    return sum(in_predicted_order(a, b) for a, b in pairs), len(pairs)


def _axes(plt, panels: list, title: str):
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    fig.suptitle(title, fontsize=9)
    return fig, axes[0]


def plot(rows: list[dict], stem, title: str) -> list[str]:
    """The four PNGs; returns their names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    parallel = [r for r in rows if r["P"] > 1]
    worlds = sorted({r["P"] for r in parallel})
    seqs = sorted({r["S"] for r in parallel})
    methods = sorted({r["method"] for r in parallel})
    written = []
    for suffix, key, label, across in (
            ("time", "seconds", "fwd+bwd seconds", "S"),
            ("memory", "peak_mib", "peak memory per rank (MiB)", "S"),
            ("bytes", "sent_mib", "sent per rank (MiB)", "S"),
            ("efficiency", "efficiency", "efficiency (single / parallel)", "P")):
        panels = worlds if across == "S" else seqs
        fig, axes = _axes(plt, panels, title)
        for ax, fixed in zip(axes, panels):
            for method in methods:
                points = sorted((r[across], r[key]) for r in parallel if r["method"] == method
                                and r["P" if across == "S" else "S"] == fixed
                                and r.get(key) is not None)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                            label=method)
            ax.set_xscale("log", base=2)
            if key in ("seconds", "sent_mib", "peak_mib"):
                ax.set_yscale("log")
            ax.set_xlabel("sequence length S" if across == "S" else "ranks P")
            ax.set_ylabel(label)
            ax.set_title(f"{'P' if across == 'S' else 'S'}={fixed}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        written.append(save_figure(fig, stem, suffix))
    return written


COLUMNS = [("P", "P", "d"), ("S", "S", "d"), ("method", "method", "s"),
           ("seconds", "fwd+bwd s", ".3f"), ("efficiency", "efficiency", ".1%"),
           ("exposed_ms", "exposed comm ms", ".1f"), ("exposed_share", "exposed", ".0%"),
           ("sent_mib", "sent MiB/rank", ".1f"), ("peak_mib", "peak MiB/rank", ".1f"),
           ("predicted_ms", "model ms", ".0f")]


def summary(info: dict, args, rows: list[dict], agreed: int, clear: int, title: str) -> str:
    lines = [f"# Scaling sweep ({info['date']})", "", header_text(info), "", f"{title}.", "",
             "Exposed comm: seconds the slowest rank spent blocked on communication in one "
             "extra step (`seqpar.comm_stats(time_waits=True)`); blank for the peers "
             "(not instrumented). Model: `seqpar.cost` with a profile calibrated on the same "
             "ranks.", ""]
    for world in sorted({r["P"] for r in rows if r["P"] > 1}):
        mine = [r for r in rows if r["P"] == world]
        lines += [f"## P = {world}", "", markdown_table(mine, COLUMNS), ""]
        for seq in sorted({r["S"] for r in mine}):
            softmax = [r for r in mine if r["S"] == seq and r["method"] != LASP2]
            best = min(softmax, key=lambda r: r["seconds"])
            lines.append(f"- S={seq}: fastest {best['method']} ({best['seconds']:.3f} s, "
                         f"{best['efficiency']:.0%} efficiency)")
        lines.append("")
    if clear:
        lines.append(f"Model agreement: {agreed} of {clear} clearly different pairs of seqpar "
                     f"backends ({agreed / clear:.0%}) are in the predicted order.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    attention.add_problem_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=None, help="default: see the docstring")
    parser.add_argument("--no-model", dest="model", action="store_false",
                        help="skip the calibration and the model's predictions")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    methods = args.methods or default_methods()
    unknown = [m for m in methods if m not in attention.METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; python -m benchmarks.attention --list")
    kv_heads = args.kv_heads or args.heads
    bad = [s for w in args.worlds for s in args.seqs if s % (2 * w)]
    if bad:
        parser.error(f"--seqs {sorted(set(bad))} are not divisible by 2 x P (zigzag)")

    info = machine()
    cores = info["cores"] or 1
    print(header_text(info), flush=True)
    dtype = getattr(torch, args.dtype)
    baseline = {seq: attention.single_process(seq, args.heads, kv_heads, args.dim, dtype,
                                              args.repeats, cores) for seq in args.seqs}
    rows, profiles = [], {}
    together = [m for m in methods if m != attention.ULYSSES_PEER]
    apart = [[m] for m in methods if m == attention.ULYSSES_PEER]
    for world in args.worlds:
        for group, model in ([(together, args.model)] if together else []) + [
                (m, False) for m in apart]:
            config = {"seqs": args.seqs, "heads": args.heads, "kv_heads": kv_heads,
                      "dim": args.dim, "dtype": args.dtype, "repeats": args.repeats,
                      "model": model, "threads": max(1, cores // world), "methods": group}
            result = launch(world, _worker, config)
            rows += result["rows"]
            if result["profile"] is not None:
                profiles[world] = result["profile"]
    for seq in args.seqs:
        rows.append({"method": "single process", "P": 1, "S": seq, "seconds": baseline[seq][0],
                     "sent_bytes": 0, "peak_bytes": baseline[seq][1]})
    predict_rows(rows, profiles, {"heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
                                  "dtype": args.dtype})
    for row in rows:
        row["efficiency"] = baseline[row["S"]][0] / row["seconds"]
        row["sent_mib"], row["peak_mib"] = mib(row["sent_bytes"]), mib(row["peak_bytes"])
        row["exposed_ms"] = None if row.get("exposed_s") is None else 1e3 * row["exposed_s"]
        row["exposed_share"] = (None if row.get("exposed_s") is None
                                else row["exposed_s"] / row["seconds"])
        row["predicted_ms"] = None if row.get("predicted_s") is None else 1e3 * row["predicted_s"]
    rows.sort(key=lambda r: (r["P"], r["S"], r["method"]))
    agreed, clear = model_agreement(rows)
    title = (f"causal attention fwd+bwd, B=1, H={args.heads}, Hkv={kv_heads}, D={args.dim}, "
             f"{args.dtype}; {cores} cores shared by the P ranks (cores // P threads each); "
             f"median of {args.repeats}")
    print(f"# {title}")
    print(table(rows, COLUMNS))
    if clear:
        print(f"# model agreement: {agreed}/{clear} clearly different pairs in the predicted "
              f"order ({agreed / clear:.0%})")
    stem = results_stem("scaling", args.out)
    payload = {"machine": info, "args": vars(args), "rows": rows, "profiles": profiles,
               "model_agreement": {"agreed": agreed, "clear": clear}}
    import json
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    write_csv(stem.with_suffix(".csv"), rows, ["P", "S", "method", "seconds", "efficiency",
                                               "peak_bytes", "sent_bytes", "exposed_s",
                                               "predicted_s", "predicted_exposed_s", "diff"])
    stem.with_suffix(".md").write_text(summary(info, args, rows, agreed, clear, title))
    pictures = plot(rows, stem, title)
    print(f"# wrote {stem}.json, .csv, .md and {', '.join(pictures) or 'no PNGs (matplotlib)'}")


if __name__ == "__main__":
    main()
