"""GPU kernel benchmark: seqpar's Triton flash and S2 kernels vs PyTorch SDPA (flash backend).

    python -m benchmarks.kernels            # on a CUDA machine; one call, well under 8 minutes
    python -m benchmarks.kernels --smoke    # tiny shapes on CPU under the Triton interpreter
                                            # (checks the script, measures nothing meaningful)

Three tables, bf16, causal, B=1, H=16 (B*H*S fixed work per row as S grows):

1. dense: Triton flash vs torch SDPA (FLASH_ATTENTION backend), forward and forward+backward
   TFLOP/s for S in {4K, 8K, 16K, 32K, 64K}, D in {64, 128}. Causal FLOPs:
   forward 2 * 2 * B * H * S^2 * D / 2, backward 2.5x forward.
2. sparse: S2 (vert_stride 8, local 4 blocks of 64) vs dense Triton, S in {8K .. 64K}; speed-up
   and the fraction of block pairs kept.
3. end to end through seqpar.attention on one GPU (ring and ulysses backends, one rank: the
   API, dispatch and Triton path without communication).
4. masks: Triton flash fwd+bwd, causal, with a sliding window W = S/16 and with packed documents
   (fixed-seed log-normal lengths, median S/32, at most S/4) against dense causal at the same S:
   visible (query, key) pairs and time per visible pair relative to dense causal (work the mask
   removes should not be done: target <= 1.3x).

Targets (benchmark, not test): Triton flash >= 0.9x SDPA flash throughput; S2 >= 4x faster than
dense at S = 32K. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from benchmarks.common import header_text, machine, table, write_json


def _time(fn, device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up (CUDA events on GPU)."""
    fn()
    if device.type != "cuda":
        import time
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def causal_flops(batch, heads, seq, dim, backward: bool) -> float:
    forward = 2 * 2 * batch * heads * seq * seq * dim / 2
    return forward * (3.5 if backward else 1.0)


def dense_rows(device, dtype, seqs, dims, heads, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seqpar.kernels.flash import TOP_LEFT_CAUSAL, flash_bwd, flash_fwd

    rows = []
    for dim in dims:
        for seq in seqs:
            q, k, v, do = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(4))
            scale = dim ** -0.5
            o, lse = flash_fwd(q, k, v, scale, TOP_LEFT_CAUSAL)
            delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
            t_fwd = _time(lambda: flash_fwd(q, k, v, scale, TOP_LEFT_CAUSAL), device, repeats)
            t_both = _time(lambda: (flash_fwd(q, k, v, scale, TOP_LEFT_CAUSAL),
                                    flash_bwd(do, q, k, v, lse, delta, scale, TOP_LEFT_CAUSAL)),
                           device, repeats)
            qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
            backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
            with sdpa_kernel(backend):
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                s_fwd = _time(lambda: sdpa().detach(), device, repeats)
                s_both = _time(lambda: sdpa().backward(do.transpose(1, 2)), device, repeats)
            f, fb = causal_flops(1, heads, seq, dim, False), causal_flops(1, heads, seq, dim, True)
            rows.append({"D": dim, "S": seq, "triton_fwd_tflops": f / t_fwd / 1e12,
                         "sdpa_fwd_tflops": f / s_fwd / 1e12,
                         "triton_fwdbwd_tflops": fb / t_both / 1e12,
                         "sdpa_fwdbwd_tflops": fb / s_both / 1e12,
                         "fwd_ratio": s_fwd / t_fwd, "fwdbwd_ratio": s_both / t_both})
            print(f"  dense D={dim} S={seq}: fwd {rows[-1]['fwd_ratio']:.2f}x sdpa", file=sys.stderr, flush=True)
    return rows


def sparse_rows(device, dtype, seqs, heads, dim, repeats, block_size, local_blocks, vert_stride):
    from seqpar.kernels.flash import TOP_LEFT_CAUSAL, SparseBlocks, flash_bwd, flash_fwd
    from seqpar.kernels.s2 import BlockLists, S2Pattern, block_mask, dense_fraction

    pattern = S2Pattern(block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride)
    rows = []
    for seq in seqs:
        q, k, v, do = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(4))
        scale = dim ** -0.5
        mask = block_mask(pattern, seq // block_size, list(range(heads)), heads)
        lists = BlockLists.from_mask(mask, device)
        sparse = SparseBlocks(block_size, lists.row_ptr, lists.col_idx, lists.col_ptr, lists.row_idx)
        o, lse = flash_fwd(q, k, v, scale, TOP_LEFT_CAUSAL, sparse)
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        timings = {}
        for name, blocks in (("dense", None), ("s2", sparse)):
            timings[name] = _time(lambda: (flash_fwd(q, k, v, scale, TOP_LEFT_CAUSAL, blocks),
                                           flash_bwd(do, q, k, v, lse, delta, scale, TOP_LEFT_CAUSAL, blocks)),
                                  device, repeats)
        rows.append({"S": seq, "dense_ms": timings["dense"] * 1e3, "s2_ms": timings["s2"] * 1e3,
                     "speedup": timings["dense"] / timings["s2"], "kept": dense_fraction(mask)})
        print(f"  s2 S={seq}: {rows[-1]['speedup']:.2f}x", file=sys.stderr, flush=True)
    return rows


def packed_documents(seq: int, seed: int = 0) -> torch.Tensor:
    """cu_seqlens of documents with log-normal lengths (median seq/32, at most seq/4) packed
    into seq tokens, the last one cut to fit."""
    g = torch.Generator().manual_seed(seed)
    bounds, total = [0], 0
    while total < seq:
        draw = torch.empty(1).log_normal_(mean=float(torch.log(torch.tensor(seq / 32.0))), std=1.0,
                                          generator=g).item()
        total = min(seq, total + max(1, min(seq // 4, round(draw))))
        bounds.append(total)
    return torch.tensor(bounds)


def mask_rows(device, dtype, seqs, heads, dim, repeats):
    from seqpar.kernels.flash import TOP_LEFT_CAUSAL, MaskMode, MaskSpec, flash_bwd, flash_fwd

    rows = []
    for seq in seqs:
        q, k, v, do = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(4))
        scale = dim ** -0.5
        window = max(1, seq // 16)
        cu = packed_documents(seq)
        lengths = (cu[1:] - cu[:-1]).tolist()
        cases = [("dense causal", TOP_LEFT_CAUSAL, seq * (seq + 1) // 2),
                 (f"window {window}", MaskSpec(MaskMode.ARITHMETIC, window=window),
                  sum(min(i + 1, window) for i in range(seq))),
                 (f"{len(lengths)} documents", MaskSpec(MaskMode.ARITHMETIC, cu_seqlens=cu.to(device)),
                  sum(n * (n + 1) // 2 for n in lengths))]
        for name, spec, pairs in cases:
            o, lse = flash_fwd(q, k, v, scale, spec)
            delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
            seconds = _time(lambda: (flash_fwd(q, k, v, scale, spec),
                                     flash_bwd(do, q, k, v, lse, delta, scale, spec)), device, repeats)
            rows.append({"S": seq, "mask": name, "pairs": pairs, "fwdbwd_ms": seconds * 1e3,
                         "ns_per_pair": seconds / (pairs * heads) * 1e9})
        dense = rows[-3]["ns_per_pair"]
        for row in rows[-3:]:
            row["per_pair_vs_dense"] = row["ns_per_pair"] / dense
        print(f"  masks S={seq}: " + ", ".join(f"{r['mask']} {r['per_pair_vs_dense']:.2f}x"
                                                for r in rows[-2:]), file=sys.stderr, flush=True)
    return rows


def end_to_end_rows(device, dtype, seq, heads, dim, repeats, pattern_args):
    import seqpar

    rows = []
    q, k, v, do = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(4))
    for backend in ("ring", "ulysses", "s2"):
        if backend not in seqpar.BACKENDS:
            continue
        extra = {"s2": seqpar.S2Pattern(**pattern_args)} if backend == "s2" else {}

        def step():
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
            seqpar.attention(ql, kl, vl, backend=backend, causal=True, **extra).backward(do)
        seconds = _time(step, device, repeats)
        rows.append({"backend": backend, "S": seq, "fwdbwd_ms": seconds * 1e3,
                     "tflops": causal_flops(1, heads, seq, dim, True) / seconds / 1e12})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = torch.device("cpu"), torch.float32
        seqs, sparse_seqs, dims, heads, repeats = [64], [64], [16], 2, 1
        sparse_cfg = dict(block_size=16, local_blocks=2, vert_stride=2)
        e2e_seq = 64
        mask_seqs = [64]
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks.kernels needs a CUDA GPU (use --smoke to check the script on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        seqs, sparse_seqs, dims, heads, repeats = [4096, 8192, 16384, 32768, 65536], \
            [8192, 16384, 32768, 65536], [64, 128], 16, args.repeats
        sparse_cfg = dict(block_size=64, local_blocks=4, vert_stride=8)
        e2e_seq = 16384
        mask_seqs = [16384, 65536]
    info = machine()
    print(header_text(info), flush=True)
    dense = dense_rows(device, dtype, seqs, dims, heads, repeats)
    sparse = sparse_rows(device, dtype, sparse_seqs, heads, dims[0], repeats, **sparse_cfg)
    e2e = end_to_end_rows(device, dtype, e2e_seq, heads, dims[0], repeats, sparse_cfg)
    masks = mask_rows(device, dtype, mask_seqs, heads, dims[0], repeats)
    print(f"# dense causal attention, {str(dtype).removeprefix('torch.')}, B=1, H={heads}: TFLOP/s")
    print(table(dense, [("D", "D", "d"), ("S", "S", "d"),
                        ("triton_fwd_tflops", "triton fwd", ".1f"), ("sdpa_fwd_tflops", "sdpa fwd", ".1f"),
                        ("fwd_ratio", "triton/sdpa fwd", ".2f"),
                        ("triton_fwdbwd_tflops", "triton fwd+bwd", ".1f"),
                        ("sdpa_fwdbwd_tflops", "sdpa fwd+bwd", ".1f"),
                        ("fwdbwd_ratio", "triton/sdpa fwd+bwd", ".2f")]))
    print(f"# S2 {sparse_cfg} vs dense Triton, fwd+bwd, D={dims[0]}")
    print(table(sparse, [("S", "S", "d"), ("dense_ms", "dense ms", ".2f"), ("s2_ms", "s2 ms", ".2f"),
                         ("speedup", "speed-up", ".2f"), ("kept", "block pairs kept", ".1%")]))
    print("# end to end through seqpar.attention, one rank")
    print(table(e2e, [("backend", "backend", "s"), ("S", "S", "d"), ("fwdbwd_ms", "fwd+bwd ms", ".2f"),
                      ("tflops", "TFLOP/s", ".1f")]))
    print(f"# masks, causal, fwd+bwd, D={dims[0]}: time per visible pair vs dense causal")
    print(table(masks, [("S", "S", "d"), ("mask", "mask", "s"), ("pairs", "visible pairs", "d"),
                        ("fwdbwd_ms", "fwd+bwd ms", ".2f"), ("ns_per_pair", "ns / pair / head", ".4f"),
                        ("per_pair_vs_dense", "per pair vs dense", ".2f")]))
    path = write_json("kernels", {"machine": info, "smoke": args.smoke, "dense": dense,
                                  "sparse": sparse, "end_to_end": e2e, "masks": masks}, args.out)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
