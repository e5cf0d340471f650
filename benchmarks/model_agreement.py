"""Does the cost model order the backends as this machine does? Calibrate, measure, compare.

    python -m benchmarks.model_agreement                  # 2 ranks, the sweep below, 4 repeats
    python -m benchmarks.model_agreement --sweeps 3       # pool three fresh sweeps
    python -m benchmarks.model_agreement --repeats 1 --problems 1   # a toy run

On 2 CPU ranks (one per core of the 2-core VM: four ranks would time-share two cores, a regime
of scheduler waits no alpha-beta model describes), each sweep first calibrates the cost model on
those ranks (`seqpar.cost.calibrate`), then times fwd+bwd of every backend in `BACKENDS` on
every problem of `SWEEP`, repeats going round-robin over the backends (a drift of the shared
machine hits all alike), the slowest rank's time per repeat. The problems are chosen to
separate the backends: big K/V for few tokens (gloo's slow all-gather and reduce-scatter),
striped causal (the kernel's causal tiles favour Ulysses' one long block), GQA 32:1 (TokenRing
sends the 32 query heads), a tiny one (round trips), a compute-bound one.

A pair of backends on one problem is *clear* when every repeat puts them in the same order and
their medians are >= 15% apart (`benchmarks.scaling.CLEARLY`); the model *agrees* on it when
its predictions order them the same way. Reported: every clear pair (measured and predicted
times), the agreement over all sweeps pooled, and predicted vs measured time of every
(problem, backend) as a log-log scatter. This was a unit test until the suite stopped asserting
timing outcomes: it is a property of the machine and the moment, measured here.

Writes model_agreement-<host>-<stamp>.json and .png under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import header_text, launch, machine, results_stem, save_figure, start_rank, table
from benchmarks.scaling import CLEARLY, clear_pairs, in_predicted_order

BACKENDS = ("ring", "tokenring", "ulysses", "allgather")
# (S, Hq, Hkv, D, layout, causal), fp32
SWEEP = ((256, 64, 64, 128, "zigzag", True), (1024, 8, 8, 64, "striped", True),
         (256, 32, 1, 128, "zigzag", False), (128, 4, 4, 32, "zigzag", True),
         (2048, 8, 8, 64, "zigzag", True))
WORLD = 2


def _worker(config: dict) -> dict:
    import torch.distributed as dist

    import seqpar
    from seqpar.cost import calibrate

    rank, world, _, _ = start_rank(config)
    profile = calibrate(head_dims=sorted({p[3] for p in config["problems"]}),
                        repeats=config["calibration_repeats"])
    measured = []
    for seq, heads_q, heads_kv, dim, layout, causal in config["problems"]:
        gen = torch.Generator().manual_seed(seq)
        shapes = ((seq, heads_q), (seq, heads_kv), (seq, heads_kv), (seq, heads_q))
        q, k, v, do = (seqpar.shard(torch.randn(1, s, h, dim, generator=gen), layout=layout)
                       for s, h in shapes)
        times = {name: [] for name in BACKENDS}
        for repeat in range(config["repeats"] + 1):  # the first round warms up
            for name in BACKENDS:
                q_l, k_l, v_l = (t.clone().requires_grad_() for t in (q, k, v))
                dist.barrier()
                start = time.perf_counter()
                seqpar.attention(q_l, k_l, v_l, backend=name, causal=causal,
                                 layout=layout).backward(do)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        slowest = {}
        for name, values in times.items():
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            slowest[name] = tensor.tolist()
        measured.append(slowest)
    dist.destroy_process_group()
    return {"profile": profile.to_json(), "measured": measured, "rank": rank, "world": world}


def rows_of(sweep: int, problems, result: dict) -> list[dict]:
    """One row per (problem, backend): measured times and the calibrated model's prediction."""
    from seqpar.cost import Problem, Profile, predict

    profile = Profile.from_json(result["profile"])
    rows = []
    for index, ((seq, heads_q, heads_kv, dim, layout, causal), times) in enumerate(
            zip(problems, result["measured"])):
        problem = Problem(batch=1, seq_len=seq, heads_q=heads_q, heads_kv=heads_kv,
                          head_dim=dim, world=WORLD, itemsize=4, causal=causal, layout=layout)
        for backend, values in times.items():
            rows.append({"sweep": sweep, "problem": index,
                         "label": f"S={seq} H={heads_q}/{heads_kv} D={dim} {layout}"
                                  f"{'' if causal else ' full'}",
                         "backend": backend, "times": values,
                         "measured_ms": 1e3 * statistics.median(values),
                         "predicted_ms": 1e3 * predict(backend, problem, profile).seconds,
                         "predicted_s": predict(backend, problem, profile).seconds})
    return rows


def plot(rows: list[dict], stem) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    for backend in BACKENDS:
        mine = [r for r in rows if r["backend"] == backend]
        ax.scatter([r["predicted_ms"] for r in mine], [r["measured_ms"] for r in mine],
                   label=backend, s=18)
    low = min(min(r["predicted_ms"], r["measured_ms"]) for r in rows)
    high = max(max(r["predicted_ms"], r["measured_ms"]) for r in rows)
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="predicted fwd+bwd (ms)",
           ylabel="measured fwd+bwd (ms)", title=f"cost model vs measurement, P={WORLD}")
    ax.legend()
    return save_figure(fig, stem, "scatter")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=1, help="fresh sweeps pooled (default 1)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--calibration-repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=len(SWEEP),
                        help="use the first N problems of the sweep")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    info = machine()
    print(header_text(info), flush=True)
    problems = SWEEP[:args.problems]
    config = {"problems": problems, "repeats": args.repeats, "dtype": "float32",
              "calibration_repeats": args.calibration_repeats,
              "threads": max(1, (info["cores"] or 1) // WORLD)}
    rows = []
    for sweep in range(args.sweeps):
        print(f"# sweep {sweep + 1}/{args.sweeps}: calibrating and measuring on {WORLD} ranks",
              file=sys.stderr, flush=True)
        rows += rows_of(sweep, problems, launch(WORLD, _worker, config))
    pairs = clear_pairs(rows, problem=lambda r: (r["sweep"], r["problem"]))
    agreed = sum(in_predicted_order(a, b) for a, b in pairs)
    print(table(rows, [("sweep", "sweep", "d"), ("label", "problem", "s"),
                       ("backend", "backend", "s"), ("measured_ms", "measured ms", ".1f"),
                       ("predicted_ms", "predicted ms", ".1f")]))
    for a, b in pairs:
        print(f"  {a['label']}: {a['backend']} {a['measured_ms']:.0f} ms vs {b['backend']} "
              f"{b['measured_ms']:.0f} ms measured, {a['predicted_ms']:.0f} vs "
              f"{b['predicted_ms']:.0f} predicted{'' if in_predicted_order(a, b) else '  <- order differs'}")
    share = f" ({agreed / len(pairs):.0%})" if pairs else ""
    print(f"# model agreement: {agreed}/{len(pairs)} clearly different pairs (medians >= "
          f"{CLEARLY:.2f}x apart, every repeat agreeing) in the predicted order{share}")
    stem = results_stem("model_agreement", args.out)
    payload = {"machine": info, "args": vars(args), "rows": rows,
               "model_agreement": {"agreed": agreed, "clear": len(pairs)}}
    import json
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    picture = plot(rows, stem)
    print(f"# wrote {stem}.json{' and ' + picture if picture else ''}")
    return payload


if __name__ == "__main__":
    main()
