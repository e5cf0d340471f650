"""Sequence-parallel attention, side by side: seqpar backends vs the peers, same shapes, one run.

    python -m benchmarks.attention                       # P in {2, 4}, S in {4K, 8K, 16K}
    python -m benchmarks.attention --worlds 4 --seqs 16384 --repeats 3
    python -m benchmarks.attention --methods "seqpar ring (zigzag)" "torch ring (allgather)"

For every (P, S): forward + backward of causal attention (B=1, H=8, D=64, fp32 by default) on
P CPU ranks launched with torchrun's machinery (`torch.distributed.launcher.elastic_launch`),
each rank with cores // P threads (and OMP_NUM_THREADS set like torchrun), for every method of
`METHODS` (see `--list`):

* every seqpar backend, with the layouts worth comparing (`SEQPAR_RUNS`; usp runs U=2 x R=P/2
  when P is even, else U=1);
* seqpar's LASP-2 linear attention on the same shapes (not softmax attention: timed and
  counted, its output not compared; see `benchmarks.linear_scaling` for its own sweep);
* PyTorch's ring attention (`_templated_ring_attention` + its backward, with the CPU flash op
  and head-tail load balancing, both of its K/V rotation methods: all-gather and all-to-all);
* DeepSpeed-Ulysses (`deepspeed.sequence.layer.DistributedAttention` after
  `deepspeed.init_distributed(dist_backend="gloo")`, contiguous shards, the same CPU flash
  kernel through scaled_dot_product_attention), when deepspeed is installed
  (`pip install -e ".[deepspeed]"`; without it the run says so and leaves the row out);

and the single-process fused kernel on the whole sequence with all cores. Repeats go
round-robin over the methods. Reported per row: median fwd+bwd time over `--repeats` (slowest
rank), efficiency = single-process time / parallel time, the ratios to PyTorch's ring
(all-gather rotation, its default) and to DeepSpeed-Ulysses, bytes sent per rank, peak memory
per rank, the communication left exposed (seqpar's backends: seconds blocked on communication
in one extra step, slowest rank; `seqpar.comm_stats(time_waits=True)`), and the max difference
of the gathered output from the fused single-process kernel's output on the whole sequence (a
check that every method computes causal attention, against a computation none of them is). Methods that cannot split the heads over P ranks are left out at that P. Writes JSON
and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.common import (header_text, launch, machine, mib, peak_memory, start_rank, table,
                               timed, write_results)


@dataclass(frozen=True)
class Inputs:
    """This rank's view of one problem: the full tensors (same on every rank) and the config."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    world: int
    config: dict


@dataclass(frozen=True)
class StepResult:
    """What one forward + backward of a method returns: the local output (bshd), the bytes this
    rank sent, and -- for seqpar's backends, when asked -- the seconds it spent blocked on
    communication (`seqpar.comm_stats(time_waits=True)`: communication left exposed)."""

    out: torch.Tensor
    sent_bytes: int
    exposed_s: float | None = None


@dataclass(frozen=True)
class Method:
    """A way to compute the attention. `prepare(inputs)` shards what it needs and returns a
    step(time_waits=False) doing one forward + backward and returning a `StepResult`. `layout`
    says how the local output is sharded (to gather and compare). `fits(world, config)`: can it
    run these heads on this many ranks. `default`: part of the default `--methods`."""

    name: str
    layout: str
    prepare: Callable[[Inputs], Callable[..., StepResult]]
    comparable: bool = True  # computes softmax attention (its output is checked against others)
    fits: Callable[[int, dict], bool] = lambda world, config: True
    default: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


# ---------------------------------------------------------------- seqpar

# (backend, layout) pairs benchmarked by default; a new backend adds its rows here.
SEQPAR_RUNS = [("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"),
               ("tokenring", "contiguous"), ("tokenring", "zigzag"), ("tokenring", "striped"),
               ("ulysses", "contiguous"), ("ulysses", "zigzag"), ("usp", "zigzag"),
               ("allgather", "zigzag"), ("allgather", "striped")]


def usp_degree(world: int) -> int:
    """The Ulysses degree of the default usp rows: 2 (Ulysses in pairs, ring across them) when
    it divides P, else 1."""
    return 2 if world % 2 == 0 else 1


# Ulysses degrees of the usp rows that name theirs ("seqpar usp U4 (zigzag)": U=4, R=P/4).
USP_DEGREES = (1, 2, 4, 8)


def seqpar_method(backend: str, layout: str, ulysses: int | None = None, label: str = "",
                  comparable: bool = True, **backend_kwargs) -> Method:
    """A seqpar backend; usp with Ulysses degree `ulysses` (None: `usp_degree(P)`). `label`
    tells rows of one backend apart; `comparable=False` for rows that compute other attention."""
    def degree(world: int) -> int:
        return usp_degree(world) if ulysses is None else ulysses

    def prepare(inputs: Inputs):
        import seqpar

        local = [seqpar.shard(t, layout=layout) for t in (inputs.q, inputs.k, inputs.v, inputs.do)]
        # usp needs its mesh, built once (collective: every rank prepares methods in one order)
        group = seqpar.SPMesh(ulysses=degree(inputs.world)) if backend == "usp" else None

        def step(time_waits: bool = False) -> StepResult:
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
            with seqpar.comm_stats(time_waits=time_waits) as stats:
                o = seqpar.attention(q_l, k_l, v_l, group, backend=backend, causal=True,
                                     layout=layout, **backend_kwargs)
                o.backward(local[3])
            return StepResult(o.detach(), stats.sent(), stats.waited() if time_waits else None)
        return step

    def fits(world: int, config: dict) -> bool:
        heads = config["heads"]
        if backend in ("ulysses", "s2"):
            return heads % world == 0
        if backend == "usp":
            return world % degree(world) == 0 and heads % degree(world) == 0
        return True

    name = (f"seqpar {backend}{label} ({layout})" if ulysses is None
            else f"seqpar {backend}{label} U{ulysses} ({layout})")
    return Method(name, layout, prepare, comparable, fits=fits, default=ulysses is None)


for _backend, _layout in SEQPAR_RUNS:
    register(seqpar_method(_backend, _layout))
for _degree in USP_DEGREES:
    register(seqpar_method("usp", "zigzag", ulysses=_degree))

# S2 sparse heads next to dense Ulysses (same all-to-alls): the row pair gives the local compute
# saved by the pattern. Not the same attention, so its output is not compared.
S2_PATTERN = dict(block_size=64, local_blocks=4, vert_stride=8)


def _s2_method() -> Method:
    import seqpar
    return seqpar_method("s2", "zigzag", label=" vs8", comparable=False,
                         s2=seqpar.S2Pattern(**S2_PATTERN))


register(_s2_method())


def lasp2_method(layout: str) -> Method:
    """seqpar.linear_attention (LASP-2) on the same q, k, v: linear attention, not softmax, so
    its output is not compared; its row shows what the same shapes cost without softmax.
    Linear attention has no GQA: K/V heads are repeated to the query heads."""
    def prepare(inputs: Inputs):
        import seqpar

        groups = inputs.q.shape[2] // inputs.k.shape[2]
        k, v = (t.repeat_interleave(groups, dim=2) for t in (inputs.k, inputs.v))
        local = [seqpar.shard(t, layout=layout) for t in (inputs.q, k, v, inputs.do)]

        def step(time_waits: bool = False) -> StepResult:
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
            with seqpar.comm_stats(time_waits=time_waits) as stats:
                o = seqpar.linear_attention(q_l, k_l, v_l, causal=True, layout=layout)
                o.backward(local[3])
            return StepResult(o.detach(), stats.sent(), stats.waited() if time_waits else None)
        return step

    return Method(f"seqpar lasp2 linear ({layout})", layout, prepare, comparable=False)


register(lasp2_method("zigzag"))


# ---------------------------------------------------------------- PyTorch's ring

def torch_ring_step(q, k, v, do, rotation: str):
    """PyTorch's templated ring attention fwd + bwd on bhsd shards in head-tail order."""
    from torch.distributed.tensor.experimental._attention import (_cp_options, _RotateMethod,
                                                                   _templated_ring_attention)
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _templated_ring_attention_backward)

    _cp_options.enable_load_balance = True
    _cp_options.rotate_method = (_RotateMethod.ALL_GATHER if rotation == "allgather"
                                 else _RotateMethod.ALL_TO_ALL)
    group = dist.group.WORLD
    scale = q.shape[-1] ** -0.5
    out, lse = _templated_ring_attention(
        group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v,
        is_causal=True, dropout_p=0.0, scale=scale)[:2]
    grads = _templated_ring_attention_backward(
        group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
        grad_out=do, grad_out_name="grad_out", query=q, key=k, value=v, out=out,
        logsumexp=lse, is_causal=True, dropout_p=0.0, scale=scale)
    return out, grads[:3]


def torch_ring_bytes(world: int, block_elems: int, itemsize: int) -> int:
    """Bytes sent per rank by PyTorch's ring, from its code: K/V rotation (either method moves
    (P-1) K/V blocks) forward and again backward, plus P fp32 dK/dV hops backward."""
    kv = 2 * block_elems * itemsize
    return 2 * (world - 1) * kv + world * 2 * block_elems * 4


def torch_ring_method(rotation: str) -> Method:
    def prepare(inputs: Inputs):
        import seqpar

        # head-tail load balancing is seqpar's zigzag; PyTorch works on bhsd
        local = [seqpar.shard(t, layout="zigzag").transpose(1, 2).contiguous()
                 for t in (inputs.q, inputs.k, inputs.v, inputs.do)]

        def step(time_waits: bool = False) -> StepResult:
            out, _ = torch_ring_step(*local, rotation)
            return StepResult(out.transpose(1, 2), torch_ring_bytes(
                inputs.world, local[1].numel(), local[1].element_size()))
        return step

    return Method(f"torch ring ({rotation})", "zigzag", prepare)


for _rotation in ("allgather", "alltoall"):
    register(torch_ring_method(_rotation))



# ---------------------------------------------------------------- DeepSpeed-Ulysses

def causal_sdpa(q, k, v):
    """The local attention DeepSpeed runs on its head-sharded [B, S, H/P, D] tensors: PyTorch's
    fused CPU flash kernel (what scaled_dot_product_attention picks here), causal."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def deepspeed_ulysses_bytes(world: int, q_elems: int, kv_elems: int, itemsize: int) -> int:
    """Bytes sent per rank by DeepSpeed's DistributedAttention, from its code: forward
    all-to-alls of q, k, v, o and backward of do, dq, dk, dv, each sending the (P-1)/P of its
    local tensor destined to other ranks."""
    return 2 * (world - 1) * (2 * q_elems + 2 * kv_elems) * itemsize // world


def deepspeed_ulysses_method() -> Method:
    def prepare(inputs: Inputs):
        import deepspeed
        import seqpar
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group already running
        attention = DistributedAttention(causal_sdpa, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        local = [seqpar.shard(t, layout="contiguous")
                 for t in (inputs.q, inputs.k, inputs.v, inputs.do)]

        def step(time_waits: bool = False) -> StepResult:
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in local[:3])
            o = attention(q_l, k_l, v_l, 0)  # batch_dim_idx=0: [B, S/P, H, D] shards
            o.backward(local[3])
            return StepResult(o.detach(), deepspeed_ulysses_bytes(
                inputs.world, local[0].numel(), local[1].numel(), local[1].element_size()))
        return step

    return Method("deepspeed ulysses", "contiguous", prepare,
                  fits=lambda world, config: config["heads"] % world == 0)


DEEPSPEED_AVAILABLE = importlib.util.find_spec("deepspeed") is not None
if DEEPSPEED_AVAILABLE:
    register(deepspeed_ulysses_method())

def default_methods() -> list[str]:
    return [name for name, method in METHODS.items() if method.default]


BASELINE_PEER = "torch ring (allgather)"
ULYSSES_PEER = "deepspeed ulysses"


# ---------------------------------------------------------------- one rank

def measure_world(config: dict, rank: int, world: int, device: torch.device,
                  dtype: torch.dtype, progress: Callable[[str], None] | None = None
                  ) -> list[dict]:
    """Inside a launched rank: every method of config["methods"] that fits P, at every S of
    config["seqs"]; rows as described in the module docstring (rank 0's are complete)."""
    import seqpar

    names = [name for name in config["methods"] if METHODS[name].fits(world, config)]
    rows = []
    for seq in config["seqs"]:
        gen = torch.Generator().manual_seed(seq)
        shapes = [(1, seq, config["heads"], config["dim"]),
                  (1, seq, config["kv_heads"], config["dim"]),
                  (1, seq, config["kv_heads"], config["dim"]),
                  (1, seq, config["heads"], config["dim"])]
        q, k, v, do = (torch.randn(s, generator=gen).to(dtype) for s in shapes)
        inputs = Inputs(q, k, v, do, world, config)
        steps = {}
        for name in names:
            steps[name] = METHODS[name].prepare(inputs)
            steps[name]()  # warm-up (first-call costs, gloo buffers for this size)
        # Repeats go round-robin over the methods, so slow drifts of the machine hit all alike.
        times = {name: [] for name in names}
        results, peaks = {}, {}
        for _ in range(config["repeats"]):
            for name in names:
                dist.barrier()
                with peak_memory(device) as peak:
                    times[name].append(timed(lambda: results.__setitem__(name, steps[name]()),
                                             device))
                peaks.setdefault(name, peak.bytes)  # the first repeat's peak is reported
        # One more step each, timing the waits on communication (on CUDA that synchronises
        # around every wait, so it is kept out of the timed repeats).
        exposed = {}
        for name in names:
            dist.barrier()
            exposed[name] = steps[name](time_waits=True).exposed_s
        # The truth every method's output is compared with: the fused single-process kernel
        # on the whole sequence (not one of the methods measured).
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(t.float().transpose(1, 2) for t in (q, k, v)), 0.0, True)[0].transpose(1, 2)
        for name in names:
            slowest = torch.tensor(times[name])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            result = results[name]
            diff = None
            if METHODS[name].comparable:
                full = seqpar.gather(result.out, layout=METHODS[name].layout)  # global order
                diff = (full.float() - fused).abs().max().item()
            totals = torch.tensor([float(result.sent_bytes), float(peaks[name]),
                                   -1.0 if exposed[name] is None else exposed[name]])
            dist.all_reduce(totals, op=dist.ReduceOp.MAX)
            rows.append({"method": name, "P": world, "S": seq,
                         "seconds": statistics.median(slowest.tolist()), "times": slowest.tolist(),
                         "sent_bytes": int(totals[0].item()), "peak_bytes": int(totals[1].item()),
                         "exposed_s": None if totals[2].item() < 0 else totals[2].item(),
                         "diff": diff})
            if rank == 0 and progress is not None:
                progress(f"P={world} S={seq} {name}: {rows[-1]['seconds'] * 1e3:.0f} ms")
    return rows


def _print_progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _worker(config: dict) -> list[dict]:
    rank, world, device, dtype = start_rank(config)
    rows = measure_world(config, rank, world, device, dtype, _print_progress)
    dist.destroy_process_group()
    return rows


# ---------------------------------------------------------------- single process

def single_process(seq: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                   repeats: int, threads: int):
    """The fused CPU kernel on the whole sequence (GQA expanded by the kernel itself)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seq)
    q, do = (torch.randn(1, heads, seq, dim, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, seq, dim, generator=gen).to(dtype) for _ in range(2))
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def step():
        out, lse = fwd(q, k, v, 0.0, True)
        bwd(do, q, k, v, out, lse, 0.0, True)

    step()
    with peak_memory(torch.device("cpu")) as peak:
        times = [timed(step, torch.device("cpu")) for _ in range(repeats)]
    return statistics.median(times), peak.bytes


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    worlds = sorted({r["P"] for r in rows if r["P"] > 1})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for method in sorted({r["method"] for r in rows if r["P"] == world}):
            pts = sorted((r["S"], r["efficiency"]) for r in rows if r["P"] == world and r["method"] == method)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
        ax.axhline(100, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("efficiency % (single-process time / parallel time)")
        ax.set_title(f"causal fwd+bwd, P={world}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep and shape options `measure_world` reads (shared with benchmarks.scaling)."""
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: all but the usp rows with a fixed U (see --list)")
    parser.add_argument("--list", action="store_true", help="print the method names and exit")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(METHODS))
        return
    methods = args.methods or default_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; --list shows the known ones")
    kv_heads = args.kv_heads or args.heads

    info = machine()
    cores = info["cores"] or 1
    print(header_text(info), flush=True)
    if not DEEPSPEED_AVAILABLE:
        print("# deepspeed is not installed: no DeepSpeed-Ulysses row "
              "(pip install -e '.[deepspeed]' adds it)", flush=True)
    dtype = getattr(torch, args.dtype)
    baseline = {}
    for seq in args.seqs:
        baseline[seq] = single_process(seq, args.heads, kv_heads, args.dim, dtype, args.repeats, cores)
        print(f"  single process S={seq}: {baseline[seq][0] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    rows = []
    for world in args.worlds:
        config = {"seqs": args.seqs, "heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
                  "dtype": args.dtype, "repeats": args.repeats,
                  "threads": max(1, cores // world), "methods": methods}
        rows += launch(world, _worker, config)
    for seq in args.seqs:
        rows.append({"method": "single process", "P": 1, "S": seq, "seconds": baseline[seq][0],
                     "sent_bytes": 0, "peak_bytes": baseline[seq][1]})
    for row in rows:
        row["efficiency"] = baseline[row["S"]][0] / row["seconds"]
        peer = [r for r in rows if r["P"] == row["P"] and r["S"] == row["S"]
                and r["method"] == BASELINE_PEER]
        row["vs_torch"] = row["seconds"] / peer[0]["seconds"] if peer else None
        ulysses_peer = [r for r in rows if r["P"] == row["P"] and r["S"] == row["S"]
                        and r["method"] == ULYSSES_PEER]
        row["vs_deepspeed"] = (row["seconds"] / ulysses_peer[0]["seconds"] if ulysses_peer
                               else None)
        row["sent_mib"], row["peak_mib"] = mib(row["sent_bytes"]), mib(row["peak_bytes"])
        row["exposed_ms"] = None if row.get("exposed_s") is None else 1e3 * row["exposed_s"]
    rows.sort(key=lambda r: (r["P"], r["S"], r["method"]))
    print(f"# causal attention fwd+bwd, B=1, H={args.heads}, Hkv={kv_heads}, D={args.dim}, "
          f"{args.dtype}; {cores} cores shared by the P ranks (cores // P threads each); "
          f"median of {args.repeats}")
    print(table(rows, [("P", "P", "d"), ("S", "S", "d"), ("method", "method", "s"),
                       ("seconds", "fwd+bwd s", ".3f"), ("efficiency", "efficiency", ".1%"),
                       ("vs_torch", f"time / {BASELINE_PEER}", ".2f"),
                       ("vs_deepspeed", f"time / {ULYSSES_PEER}", ".2f"),
                       ("sent_mib", "sent MiB/rank", ".1f"), ("peak_mib", "peak MiB/rank", ".1f"),
                       ("exposed_ms", "exposed comm ms", ".1f"),
                       ("diff", "max |o - fused o|", ".1e")]))
    write_results("attention", {"machine": info, "args": vars(args), "rows": rows}, args.out, plot)


if __name__ == "__main__":
    main()
