"""The main job (`make demo`): ring attention over a 16K-token causal sequence on 4 CPU ranks.

Launched by torchrun's own machinery:

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m benchmarks.demo

For each layout: shard q, k, v with seqpar.shard, run seqpar.attention(backend="ring")
forward + backward, gather output and gradients, and compare them with the single-process
fused kernel on the full sequence. Prints one row per layout: max error, fwd+bwd time,
bytes sent per rank, peak memory per rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import seqpar
from benchmarks.common import header_text, machine, mib, peak_memory, table, timed
from seqpar.layout import LAYOUTS


def single_process(q, k, v, do, causal):
    """Output and gradients of the fused CPU kernel on the whole sequence (the reference)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        enable_gqa=True).transpose(1, 2)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backend", default="ring")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    device = torch.device("cpu")

    gen = torch.Generator().manual_seed(0)
    shape = (1, args.seq, args.heads, args.dim)
    q, k, v, do = (torch.randn(shape, generator=gen) for _ in range(4))

    reference = None
    if rank == 0:
        torch.set_num_threads(cores)  # the others wait in the barrier below
        reference = single_process(q, k, v, do, causal=True)
        torch.set_num_threads(max(1, cores // world))
    dist.barrier()

    # Warm up once at full size: first-call costs (thread pools, gloo's buffers for this
    # message size) are not the algorithm's, and would inflate the first row's time and memory.
    warm = [seqpar.shard(t, layout="zigzag").requires_grad_() for t in (q, k, v)]
    seqpar.attention(*warm, backend=args.backend).backward(seqpar.shard(do, layout="zigzag"))
    del warm

    rows = []
    for layout in LAYOUTS:
        q_l, k_l, v_l = (seqpar.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
        do_l = seqpar.shard(do, layout=layout)
        dist.barrier()
        with seqpar.comm_stats() as stats, peak_memory(device) as peak:
            def step():
                o_l = seqpar.attention(q_l, k_l, v_l, backend=args.backend, causal=True, layout=layout)
                o_l.backward(do_l)
                return o_l
            outputs = []
            seconds = timed(lambda: outputs.append(step()), device)
        results = [seqpar.gather(t.detach(), layout=layout)
                   for t in (outputs[0], q_l.grad, k_l.grad, v_l.grad)]
        per_rank = torch.tensor([seconds, float(stats.sent()), float(peak.bytes)], dtype=torch.float64)
        dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
        if rank == 0:
            error = max((a - b).abs().max().item() for a, b in zip(results, reference))
            rows.append({"backend": args.backend, "layout": layout, "P": world, "S": args.seq,
                         "error": error, "ms": per_rank[0].item() * 1e3,
                         "sent": mib(int(per_rank[1].item())), "peak": mib(int(per_rank[2].item()))})
    if rank == 0:
        print(header_text(machine()))
        print(f"# ring attention fwd+bwd, causal, B=1, H={args.heads}, D={args.dim}, fp32, "
              f"{world} ranks x {max(1, cores // world)} thread(s); error = max |seqpar - "
              f"single-process fused kernel| over o, dq, dk, dv")
        print(table(rows, [("backend", "backend", "s"), ("layout", "layout", "s"), ("P", "P", "d"),
                           ("S", "S", "d"), ("error", "max error", ".2e"),
                           ("ms", "fwd+bwd ms", ".0f"), ("sent", "sent MiB/rank", ".1f"),
                           ("peak", "peak MiB/rank", ".1f")]))
        worst = max(r["error"] for r in rows)
        print(f"# all fp32 errors <= 1e-5: {'yes' if worst <= 1e-5 else 'NO'} (worst {worst:.2e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
