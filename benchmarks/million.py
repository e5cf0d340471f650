"""The million-token step: one full training step (forward, backward, gradient all-reduce, Adam)
of a hybrid LASP-2 / sliding-window model at S = 1,048,576 tokens on 4 CPU ranks.

    python -m benchmarks.long_context --million                 # S = 1,048,576 (the issue's run)
    python -m benchmarks.long_context --million --seq 131072    # the same step, smaller
    python -m benchmarks.million --seq 4096 --vocab 512         # toy size (seconds)

Model (`benchmarks.hybrid_model`): hidden 256, vocab 32000, 4 layers -- 3 LASP-2 linear
attention, 1 sliding-window softmax (window 1024, ring backend) --, 4 heads of 64, 2 K/V heads
in the softmax layer, SwiGLU MLP of 768, RMSNorm, RoPE at global positions, untied lm_head,
fp32 parameters, contiguous layout (with a window and linear attention there is no causal load
imbalance to zigzag away, and the ring moves only the K/V block a window reaches). Memory savers
on: every layer checkpointed, every token-wise part of a layer (norms, projections, feature maps,
RoPE, the SwiGLU MLP) over tiles of --token-tile tokens, lm_head + cross entropy over tiles of
--loss-tile tokens. Before the launch it prints an estimate of the peak per rank
(`estimate`); during the step a progress bar per phase (rank 0, stderr): forward per layer and
the loss head, backward per layer, then the gradient all-reduce and the optimizer; after it the
loss, the time of each phase (slowest rank) and the peak resident memory of every rank (the
resident-set high-water mark of the step, `benchmarks.common.peak_memory`, plus the resident set
at entry, i.e. the whole process), and it writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.common import header_text, launch, machine, peak_memory, results_stem, start_rank

MILLION = 1 << 20
GIB = 2 ** 30


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def parameter_count(cfg) -> int:
    from benchmarks.hybrid_model import HybridLM

    with torch.device("meta"):
        return sum(p.numel() for p in HybridLM(cfg, seed=None).parameters())


def estimate(cfg, seq: int, world: int, token_tile: int, loss_tile: int, itemsize: int = 4,
             runtime_gib: float = 0.3) -> dict:
    """A rough peak per rank, in GiB, of the step (what is held at its worst moment, in the
    backward), with u = [S_loc, h] (one token-wise activation of this rank's tokens):

    * model states then: weights and gradients, 2 x parameters (Adam's two moments appear at
      the optimizer step, after the activations are gone);
    * checkpoints: the embedding output and every layer's output (each the next one's input),
      and the final-normed hidden states the tiled loss keeps: (L + 2) u;
    * the worst of (a) one layer recomputed for its backward: q, k, v, the attention output,
      then their gradients and the incoming one -- about 8 u -- plus one token tile's
      intermediates (the MLP's 3 x [tile, intermediate] and their gradients), and (b) one loss
      tile's graph (logits, log-softmax, its gradient: ~4 x [tile, vocab]);
    * the runtime (python, torch, gloo): ~0.3 GiB.
    The batch (token ids and labels) is 16 bytes a token on every rank. The constants (8 u,
    0.3 GiB) are fitted to the measured steps at S = 16K, 128K and 256K (0.91, 1.13, 1.38 GiB
    per rank, within 0.05 GiB); the measured peak is printed beside it."""
    local = seq // world
    unit = local * cfg.hidden * itemsize
    states = 2 * parameter_count(cfg) * itemsize
    saved = (len(cfg.kinds) + 2) * unit
    layer = 8 * unit + 6 * min(token_tile, local) * cfg.intermediate * itemsize
    loss = 4 * min(loss_tile, local) * cfg.vocab * itemsize
    total = runtime_gib * GIB + states + saved + max(layer, loss) + 16 * seq
    return {"states_gib": states / GIB, "checkpoints_gib": saved / GIB,
            "layer_recompute_gib": layer / GIB, "loss_tile_gib": loss / GIB,
            "peak_gib": total / GIB}


class _Bars:
    """Rank 0's progress bars: one per phase, opened when the phase starts."""

    def __init__(self, rank: int, layers: int):
        from tqdm import tqdm

        self.tqdm, self.on, self.layers = tqdm, rank == 0, layers
        self.bar = None

    def open(self, desc: str, total: int, unit: str):
        self.close()
        self.bar = self.tqdm(total=total, desc=desc, unit=unit, disable=not self.on,
                             file=sys.stderr, dynamic_ncols=True)

    def step(self, note: str):
        if self.bar is not None:
            self.bar.set_postfix_str(note)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _worker(config: dict) -> dict:
    from benchmarks.hybrid_model import HybridConfig, HybridLM, Savers, batch, shard_batch
    from seqpar.integrations import hf

    rank, world, device, dtype = start_rank(config)
    cfg = HybridConfig(**config["model"])
    savers = Savers(checkpoint=True, token_tile=config["token_tile"],
                    loss_tile=config["loss_tile"])
    layout = "contiguous"
    with peak_memory(device) as peak:
        base = _rss_bytes()
        model = HybridLM(cfg, dtype=dtype).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        ids, labels = batch(config["seq"], cfg.vocab)
        ids_local, labels_local = shard_batch(ids, labels, None, layout)
        del ids, labels
        layers = len(cfg.kinds)
        bars = _Bars(rank, layers)
        names = ["embedding"] + [f"layer {i} ({k})" for i, k in enumerate(cfg.kinds)]

        def after(i: int, x: torch.Tensor) -> None:
            bars.step(names[i])
            # gradient of layer i's output arrives when everything after it has run backward
            done = "loss head" if i == layers else names[i + 1]
            x.register_hook(lambda grad: bars.step(done))

        dist.barrier()
        seconds = {}
        start = time.perf_counter()
        bars.open("forward", layers + 2, "part")
        loss = model.loss(ids_local, labels_local, None, layout, savers, after)
        bars.step("loss head")
        seconds["forward"] = time.perf_counter() - start
        mark = time.perf_counter()
        bars.open("backward", layers + 1, "part")
        loss.backward()
        seconds["backward"] = time.perf_counter() - mark
        mark = time.perf_counter()
        bars.open("optimizer", 2, "part")
        hf.sync_grads(model)
        bars.step("gradient all-reduce")
        seconds["sync_grads"] = time.perf_counter() - mark
        mark = time.perf_counter()
        optimizer.step()
        bars.step("Adam")
        seconds["optimizer"] = time.perf_counter() - mark
        seconds["step"] = time.perf_counter() - start
        bars.close()
        finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    peak_bytes = base + peak.bytes
    # every rank's peak, and the slowest rank's phase times
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, torch.tensor([float(peak_bytes)], dtype=torch.float64))
    times = torch.tensor(list(seconds.values()), dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    flags = torch.tensor([float(finite)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    return {"loss": loss.item(), "grads_finite": bool(flags.item()),
            "seconds": dict(zip(seconds, times.tolist())),
            "peak_gib_per_rank": [p.item() / GIB for p in peaks]}


def parser(parents=()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=list(parents))
    p.add_argument("--seq", type=int, default=MILLION, help="tokens in the sequence")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--window", type=int, default=1024, help="softmax layers' sliding window")
    p.add_argument("--token-tile", type=int, default=4096,
                   help="tokens per tile of a layer's token-wise parts (norms, projections, MLP)")
    p.add_argument("--loss-tile", type=int, default=1024, help="tokens per loss tile")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p


def run(args) -> dict:
    from benchmarks.hybrid_model import HybridConfig

    if args.seq % args.world:
        raise SystemExit(f"--seq {args.seq} must be divisible by --world {args.world}")
    model = {"vocab": args.vocab, "hidden": args.hidden, "intermediate": 3 * args.hidden,
             "heads": max(1, args.hidden // 64), "kv_heads": max(1, args.hidden // 128),
             "window": args.window}
    cfg = HybridConfig(**model)
    plan = estimate(cfg, args.seq, args.world, args.token_tile, args.loss_tile)
    info = machine()
    print(header_text(info))
    print(f"# million-token step: S = {args.seq:,} on {args.world} CPU ranks ({args.threads} "
          f"thread(s) each); model {model}, layers {cfg.kinds}, fp32; savers: checkpoint, token "
          f"tile {args.token_tile}, loss tile {args.loss_tile}")
    print(f"# estimate per rank: {plan['peak_gib']:.2f} GiB (weights + gradients "
          f"{plan['states_gib']:.2f}, checkpoints {plan['checkpoints_gib']:.2f}, worst of layer "
          f"recompute {plan['layer_recompute_gib']:.2f} / loss tile {plan['loss_tile_gib']:.2f}); "
          f"{args.world} ranks {args.world * plan['peak_gib']:.1f} GiB")
    config = {"model": model, "seq": args.seq, "threads": args.threads, "dtype": "float32",
              "token_tile": args.token_tile, "loss_tile": args.loss_tile}
    result = launch(args.world, _worker, config)
    peaks = result["peak_gib_per_rank"]
    secs = result["seconds"]
    print(f"loss {result['loss']:.5f} (finite gradients: {result['grads_finite']})")
    print("time (slowest rank): " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    print("peak resident memory per rank (GiB): " + ", ".join(f"{p:.2f}" for p in peaks)
          + f"; total {sum(peaks):.2f} GiB (estimate {plan['peak_gib']:.2f} per rank)")
    payload = {"machine": info, "args": vars(args), "config": config, "layers": cfg.kinds,
               "estimate": plan, **result, "total_peak_gib": sum(peaks),
               "tokens_per_second": args.seq / secs["step"]}
    stem = results_stem("million", args.out)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"# wrote {stem}.json")
    return payload


def main(argv=None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
