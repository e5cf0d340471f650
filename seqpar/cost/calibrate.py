"""Measure this machine for the cost model: `calibrate(group)` returns a `Profile`.

Collective over the group; every rank measures at the same time, the way a backend runs, and
each number is the best over repeats of the slowest rank (the machine's own speed: other work
on a shared machine only ever adds time):

* attention kernel: the local kernel (`kernels.dispatch.select_kernel`) forward and backward on
  full blocks of two sizes per head dim, every rank at once (ranks sharing CPU cores slow each
  other down; the backends run them all at once too); FLOP/s from the two points, and the
  per-call overhead from a block too small to compute anything. Causal blocks of the same
  sizes give the tile the kernel's causal masking skips at (`TILES`: the best fit of the
  causal / full time ratios);
* memory bandwidth: a large copy (bytes read + written per second);
* links: point-to-point exchanges of a small and a large message, every rank sending to the
  next rank of its node at once (a ring step inside a node), and one rank per node sending to
  the next node (one flow on a network link; the model shares it among concurrent flows);
  latency = time of the small one, bandwidth from the difference; exchanges (and collectives)
  are timed as chains of `CHAIN` back to back, the way a pipeline's steps follow each other;
* collectives over the group (all-to-all, all-gather, reduce-scatter): latency and bandwidth
  fitted to the model's formulas (`model.all_to_all_seconds`, `ring_collective_seconds`);
* overlap: a kernel alone, an exchange alone, and the two together:
  overlap = (kernel + exchange - together) / min(kernel, exchange);
* linear-attention kernel (chunked, causal, with decay) FLOP/s, and a large matmul's FLOP/s;
* call overhead per backend: `seqpar.attention` forward, and forward + backward, on a problem
  too small for compute or bytes to matter, less what the model above already predicts for it
  (argument checks and their agreement all-reduce, Python, autograd: what decides short
  sequences on CPU).

Nodes are told apart by host name and network namespace (two "nodes" on one machine are two
namespaces), so ranks_per_node is what the job really has.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..comm.primitives import GroupInfo, all_gather_single, reduce_scatter_single, resolve_group
from ..kernels.dispatch import select_kernel, select_linear_kernel
from ..kernels.mask import MaskKind, SubBlock
from .hardware import Link, Profile
from .model import (BWD_FLOPS_PER_PAIR, FWD_FLOPS_PER_PAIR, causal_block_products,
                    linear_chunk_flops)
from .predict import predict
from .traffic import Problem

CHAIN = 4  # exchanges and collectives are timed as chains of this many, one after another
# (query rows, keys) tiles a causal kernel might skip at; calibration keeps the one whose
# predicted causal / full time ratios best match the measured ones.
TILES = ((1, 1), (32, 64), (64, 128), (64, 256), (128, 256), (256, 512), (64, 512), (128, 128))


def _node_key() -> int:
    """Host name and network namespace, hashed to an int64."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    digest = hashlib.sha256(f"{socket.gethostname()}:{namespace}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _nodes(info: GroupInfo, device: torch.device) -> list[int]:
    """Node index of every rank of the group (in order of first appearance)."""
    key = torch.tensor([_node_key()], dtype=torch.int64, device=device)
    keys = [torch.zeros_like(key) for _ in range(info.world)]
    dist.all_gather(keys, key, group=info.group)
    order: dict[int, int] = {}
    return [order.setdefault(int(k.item()), len(order)) for k in keys]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of fn() on `device` (CUDA: synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _slowest_best(fn: Callable[[], None], info: GroupInfo, repeats: int,
                  device: torch.device) -> float:
    """Best over `repeats` (after one warm-up) of the slowest rank's time of fn()."""
    times = []
    for attempt in range(repeats + 1):
        if info.world > 1:
            dist.barrier(group=info.group)
        seconds = timed(fn, device)
        if attempt:
            times.append(seconds)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    if info.world > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=info.group)
    return min(slowest.tolist())


def _fit(sizes: tuple[float, float], seconds: tuple[float, float]) -> tuple[float, float]:
    """(fixed seconds, units per second) of the line through two (size, time) points; a
    non-increasing pair (noise) falls back to no fixed cost."""
    (s0, s1), (t0, t1) = sizes, seconds
    if t1 > t0 and s1 > s0:
        rate = (s1 - s0) / (t1 - t0)
        return max(0.0, t0 - s0 / rate), rate
    return 0.0, s1 / t1


def _exchange(info: GroupInfo, dest: list[int | None], nbytes: int, device: torch.device
              ) -> Callable[[], list]:
    """A function posting one exchange (returns its works): every rank r with dest[r] sends
    `nbytes` to it, every rank receives what is sent to it."""
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    sources = [r for r in range(info.world) if dest[r] == info.rank]
    receive = [torch.empty_like(send) for _ in sources]

    def post() -> list:
        ops = [dist.P2POp(dist.irecv, buf, info.global_rank(src), info.group)
               for buf, src in zip(receive, sources)]
        if dest[info.rank] is not None:
            ops.append(dist.P2POp(dist.isend, send, info.global_rank(dest[info.rank]), info.group))
        return dist.batch_isend_irecv(ops) if ops else []
    return post


def _finish(works: list) -> None:
    for work in works:
        work.wait()


def _chain(step: Callable[[], None], length: int) -> Callable[[], None]:
    """`length` steps back to back, as a pipeline runs them (the timer divides by it)."""
    def run() -> None:
        for _ in range(length):
            step()
    return run


def _link(info: GroupInfo, dest: list[int | None], sizes: tuple[int, int], repeats: int,
          device: torch.device) -> Link:
    seconds = tuple(_slowest_best(_chain(lambda post=_exchange(info, dest, n, device):
                                         _finish(post()), CHAIN), info, repeats, device) / CHAIN
                    for n in sizes)
    latency, bandwidth = _fit(sizes, seconds)
    return Link(max(latency, seconds[0] - sizes[0] / bandwidth, 1e-7), bandwidth)


def _kernel_rates(info, device, dtype, head_dim: int, heads: int, sizes, repeats):
    """(fwd FLOP/s, bwd FLOP/s, per-call overhead, causal / full forward time at each size) of
    the local kernel on n x n blocks."""
    kernel = select_kernel(device, dtype)
    fwd_times, bwd_times, flops, causal_ratios = [], [], [], []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v, do = (torch.randn(1, n, heads, head_dim, generator=gen, device=device,
                                   dtype=dtype) for _ in range(4))
        block = (SubBlock(0, n, 0, n, MaskKind.FULL),)
        causal = (SubBlock(0, n, 0, n, MaskKind.CAUSAL),)
        o, lse = kernel.fwd(q, k, v, block, head_dim ** -0.5)
        o = o.to(dtype)
        fwd_times.append(_slowest_best(lambda: kernel.fwd(q, k, v, block, head_dim ** -0.5),
                                         info, repeats, device))
        causal_ratios.append(_slowest_best(lambda: kernel.fwd(q, k, v, causal, head_dim ** -0.5),
                                           info, repeats, device) / fwd_times[-1])
        bwd_times.append(_slowest_best(
            lambda: kernel.bwd(do, q, k, v, o, lse, None, block, head_dim ** -0.5),
            info, repeats, device))
        flops.append(n * n * heads * head_dim)
    _, fwd_rate = _fit(tuple(FWD_FLOPS_PER_PAIR * f for f in flops), tuple(fwd_times))
    _, bwd_rate = _fit(tuple(BWD_FLOPS_PER_PAIR * f for f in flops), tuple(bwd_times))
    # the fixed cost of a call: a block so small its flops take no time
    q = torch.randn(1, 16, 1, head_dim, device=device, dtype=dtype)
    tiny = (SubBlock(0, 16, 0, 16, MaskKind.FULL),)
    overhead = _slowest_best(lambda: kernel.fwd(q, q, q, tiny, 0.1), info, repeats, device)
    return fwd_rate, bwd_rate, overhead, causal_ratios


def _fit_tile(sizes, ratios) -> tuple[int, int]:
    """The tile of `TILES` whose causal / full product ratios best match the measured ones."""
    def error(tile):
        return sum(math.log(causal_block_products(n, tile) / (n * n) / ratio) ** 2
                   for n, ratio in zip(sizes, ratios))
    return min(TILES, key=error)


def _collectives(info: GroupInfo, sizes: tuple[int, int], repeats: int, device: torch.device
                 ) -> tuple[tuple[str, Link], ...]:
    """(latency per message, bandwidth over the bytes a rank sends) of each collective, fitted
    to `steps * latency + sent / bandwidth` with steps = P - 1."""
    world, fitted = info.world, []
    for kind in ("all_to_all", "all_gather", "reduce_scatter"):
        seconds, sent = [], []
        for n in sizes:
            shard = torch.empty(n // 4 // world * world, dtype=torch.float32, device=device)
            whole = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
            if kind == "all_to_all":
                out = torch.empty_like(shard)
                call = (lambda o=out, s=shard: dist.all_to_all_single(o, s, group=info.group))
                sent.append(shard.numel() * 4 * (world - 1) / world)
            elif kind == "all_gather":
                call = (lambda w=whole, s=shard:
                        all_gather_single(w, s, group=info.group))
                sent.append(shard.numel() * 4 * (world - 1))
            else:
                call = (lambda w=whole, s=shard: reduce_scatter_single(s, w, group=info.group))
                sent.append(shard.numel() * 4 * (world - 1))
            seconds.append(_slowest_best(_chain(call, CHAIN), info, repeats, device) / CHAIN)
        fixed, bandwidth = _fit(tuple(sent), tuple(seconds))
        fitted.append((kind, Link(max(fixed, 1e-7) / (world - 1), bandwidth)))
    return tuple(fitted)


def _overlap(info: GroupInfo, device: torch.device, dtype: torch.dtype, head_dim: int,
             heads: int, nbytes: int, repeats: int) -> tuple[float, dict]:
    """Share of an exchange that hides behind a kernel running beside it."""
    kernel = select_kernel(device, dtype)
    n = 1024
    q = torch.randn(1, n, heads, head_dim, device=device, dtype=dtype)
    block = (SubBlock(0, n, 0, n, MaskKind.FULL),)
    post = _exchange(info, [(r + 1) % info.world for r in range(info.world)], nbytes, device)

    def both() -> None:
        works = post()  # posted first, like a ring step: the kernel runs while it travels
        kernel.fwd(q, q, q, block, 0.1)
        _finish(works)
    comm = _slowest_best(_chain(lambda: _finish(post()), CHAIN), info, repeats, device) / CHAIN
    together = _slowest_best(_chain(both, CHAIN), info, repeats, device) / CHAIN
    compute = _slowest_best(_chain(lambda: kernel.fwd(q, q, q, block, 0.1), CHAIN), info,
                            repeats, device) / CHAIN
    overlap = (compute + comm - together) / min(compute, comm)
    return min(1.0, max(0.0, overlap)), {"compute_s": compute, "exchange_s": comm,
                                         "together_s": together}


def _linear_rate(info, device, dtype, head_dim: int, heads: int, repeats: int) -> float:
    kernel = select_linear_kernel(device, dtype, head_dim)
    n = 4096
    q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    decay = torch.full((heads,), 0.01, device=device)
    seconds = _slowest_best(lambda: kernel.intra_fwd(q, k, v, decay, 0.1, True), info,
                              repeats, device)
    p = Problem(batch=1, seq_len=n, heads_q=heads, heads_kv=heads, head_dim=head_dim, world=1)
    return heads * linear_chunk_flops(p) / seconds


def _matmul_rate(info, device, dtype, repeats: int) -> float:
    n = 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / _slowest_best(lambda: a @ b, info, repeats, device)


def _device_memory(device: torch.device, ranks_per_node: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / ranks_per_node


def calibrate(group=None, head_dims: tuple[int, ...] = (64,), dtype: torch.dtype = torch.float32,
              heads: int = 4, kernel_sizes: tuple[int, int] = (512, 1024),
              message_sizes: tuple[int, int] = (4096, 4 * 2**20), repeats: int = 3,
              device: torch.device | None = None, name: str | None = None) -> Profile:
    """Measure this machine (collective over `group`); returns a Profile (`Profile.save` it).

    Every rank must call it with the same arguments. On CPU each rank uses the threads it was
    given (torch.set_num_threads), as the backends will."""
    info = resolve_group(group)
    if device is None:
        nccl = info.group is not None and dist.get_backend(info.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    nodes = _nodes(info, device) if info.world > 1 else [0]
    members = [[r for r in range(info.world) if nodes[r] == n] for n in sorted(set(nodes))]
    ranks_per_node = max(len(m) for m in members)
    measured: dict = {"world": info.world, "nodes": len(members), "ranks_per_node": ranks_per_node}

    fwd_rates, bwd_rates, overheads, ratios = [], [], [], []
    for head_dim in head_dims:
        fwd, bwd, overhead, causal_ratios = _kernel_rates(info, device, dtype, head_dim, heads,
                                                          kernel_sizes, repeats)
        fwd_rates.append((head_dim, fwd))
        bwd_rates.append((head_dim, bwd))
        overheads.append(overhead)
        ratios.append(causal_ratios)
    mean_ratios = [statistics.mean(r[i] for r in ratios) for i in range(len(kernel_sizes))]
    measured["causal_over_full"] = mean_ratios
    size = 8 * 2**20
    source, target = torch.randn(size // 4, device=device), torch.empty(size // 4, device=device)
    memory_bandwidth = 2 * size / _slowest_best(lambda: target.copy_(source), info, repeats,
                                                  device)

    def next_of(r: int, ring: list[int]) -> int | None:
        return ring[(ring.index(r) + 1) % len(ring)] if r in ring and len(ring) > 1 else None

    intra = Link(1e-6, memory_bandwidth)  # one rank per node: nothing to measure inside
    if ranks_per_node > 1:  # every rank to the next rank of its node, all at once
        intra = _link(info, [next_of(r, members[nodes[r]]) for r in range(info.world)],
                      message_sizes, repeats, device)
    nic = intra
    if len(members) > 1:  # the first rank of each node to the next node's: one flow per link
        firsts = [m[0] for m in members]
        nic = _link(info, [next_of(r, firsts) for r in range(info.world)], message_sizes,
                    repeats, device)
    collectives = _collectives(info, message_sizes, repeats, device) if info.world > 1 else ()
    overlap = 1.0
    if info.world > 1:
        overlap, measured["overlap"] = _overlap(info, device, dtype, head_dims[0], heads,
                                                message_sizes[1], repeats)
    linear = _linear_rate(info, device, dtype, head_dims[0], heads, repeats)
    measured.update(nodes_of_ranks=nodes, dtype=str(dtype), heads=heads,
                    kernel_sizes=list(kernel_sizes),
                    message_sizes=list(message_sizes))
    profile = Profile(
        name=name or f"measured-{socket.gethostname()}-P{info.world}",
        ranks_per_node=ranks_per_node, intra=intra, nic=nic, nics_per_node=1,
        attention_fwd_flops=tuple(fwd_rates), attention_bwd_flops=tuple(bwd_rates),
        linear_flops=linear, matmul_flops=_matmul_rate(info, device, dtype, repeats),
        memory_bandwidth=memory_bandwidth,
        kernel_overhead=statistics.median(overheads),
        tile=_fit_tile(kernel_sizes, mean_ratios), overlap=overlap,
        memory_bytes=_device_memory(device, ranks_per_node), collectives=collectives,
        source=f"calibrate() on {socket.gethostname()}, {info.world} ranks, {len(members)} node(s)",
        measured=measured)
    return profile.with_(call_overhead=_call_overheads(info, device, dtype, profile, repeats))


# The backends whose call overhead calibration measures (usp needs a mesh, lasp2 other inputs:
# theirs counts as 0).
OVERHEAD_BACKENDS = ("ring", "tokenring", "ulysses", "allgather")
OVERHEAD_REPEATS = 8  # at least; the best of few millisecond-calls is noisy on a shared machine


def _call_overheads(info: GroupInfo, device: torch.device, dtype: torch.dtype, profile: Profile,
                    repeats: int) -> tuple[tuple[str, float, float], ...]:
    """(backend, forward s, backward s) of each backend's host time beyond the model's
    schedule: P heads, 2 tokens per rank, D=8, causal zigzag (every backend runs it)."""
    from ..api import attention  # the api imports the cost model (backend="auto")
    heads, local, dim = info.world, 2, 8
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(1, local, heads, dim, generator=gen, device=device, dtype=dtype)
                   for _ in range(4))
    problem = Problem(batch=1, seq_len=local * info.world, heads_q=heads, heads_kv=heads,
                      head_dim=dim, world=info.world, itemsize=q.element_size(), causal=True,
                      layout="zigzag")
    overheads, repeats = [], max(repeats, OVERHEAD_REPEATS)  # tiny calls: cheap to repeat
    for backend in OVERHEAD_BACKENDS:
        def forward(backend=backend) -> torch.Tensor:
            q_l, k_l, v_l = (t.detach().requires_grad_() for t in (q, k, v))
            return attention(q_l, k_l, v_l, info.group, backend=backend, layout="zigzag")
        fwd = _slowest_best(forward, info, repeats, device)
        both = _slowest_best(lambda: forward().backward(do), info, repeats, device)
        modelled = predict(backend, problem, profile)
        overheads.append((backend, max(0.0, fwd - modelled.fwd.seconds),
                          max(0.0, both - fwd - modelled.bwd.seconds)))
    return tuple(overheads)


def _spawned_rank(rank: int, world: int, folder: str, threads: int, kwargs: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(threads)
    profile = calibrate(**kwargs)
    if rank == 0:
        profile.save(f"{folder}/profile.json")
    dist.destroy_process_group()


def calibrate_cpu_ranks(ranks: int, threads: int = 1, **kwargs) -> Profile:
    """`calibrate` on `ranks` CPU processes spawned here (gloo, `threads` threads each)."""
    with tempfile.TemporaryDirectory(prefix="seqpar-calibrate-") as folder:
        torch.multiprocessing.spawn(_spawned_rank, args=(ranks, folder, threads, kwargs),
                                    nprocs=ranks)
        return Profile.load(f"{folder}/profile.json")
