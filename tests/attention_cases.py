"""One softmax-attention correctness case, run on every rank of a world, for any backend.

Every rank builds the same global q, k, v, dO (and dLSE) from a seed, computes the float64
reference (output, lse, and all gradients by autograd) on the full sequence, shards inputs
with seqpar's own `shard`, runs the backend forward + backward, and compares *its own* output,
lse, dq, dk and dv with the matching slice of the reference.

Tolerances (relative to max(1, max |reference|)):
* float64 inputs: 1e-10 — the algorithm must be exact up to double rounding;
* float32 inputs: 1e-5  — single-precision rounding of sums over a few hundred terms;
* bf16/fp16 inputs: 2 x the error of the same-precision single-device computation of the full
  sequence (the fused kernel on one process), plus a quarter rounding unit (eps/4) of the
  magnitude so a lucky near-zero single-device error cannot make the bound flaky: per-block
  partial outputs are rounded to the input precision before the fp32 merge, so the error may
  reach a small multiple of one rounding, never more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.primitives import resolve_group
from seqpar.cost import Problem
from seqpar.kernels import attention_reference, use_kernel
from seqpar.kernels.torch_cpu import flash_fwd
from seqpar.layout import LAYOUTS
from tests.checks import assert_close, magnitude, max_error, s2_rule_token_mask

EXACT_REL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class AttnCase:
    backend: str = "ring"
    layout: str = "zigzag"
    causal: bool = True
    heads_q: int = 4
    heads_kv: int = 4
    head_dim: int = 16
    seq_local: int = 16
    batch: int = 1
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    lse_grad: bool = True
    output_grad: bool = True  # False: only lse is used downstream (backward gets dO = None)
    kernel: str | None = None  # force a local kernel ("flash" / "chunked" / "triton")
    s2: seqpar.S2Pattern | None = None  # backend "s2": the pattern (the reference masks with it)
    seed: int = 0
    docs: str | None = None  # packed documents: a `document_bounds` pattern name
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False  # a random [Hq] sink logit per head (its gradient is checked too)

    @property
    def masked(self) -> bool:
        return (self.docs is not None or self.window is not None or self.softcap is not None
                or self.sinks)

    def __str__(self) -> str:
        return (f"{self.backend}/{self.layout}/{'causal' if self.causal else 'full'}/"
                f"H{self.heads_q}:{self.heads_kv}/D{self.head_dim}/S_loc{self.seq_local}/"
                f"B{self.batch}/{str(self.dtype).removeprefix('torch.')}"
                + ("" if self.output_grad else "/lse-only")
                + (f"/{self.kernel}" if self.kernel else "")
                + ("" if self.s2 is None else
                   f"/s2:b{self.s2.block_size}l{self.s2.local_blocks}v{self.s2.vert_stride}"
                   f"{'het' if self.s2.heterogeneous else 'hom'}+{self.s2.head_offset}")
                + (f"/docs:{self.docs}" if self.docs else "")
                + (f"/W{self.window}" if self.window is not None else "")
                + (f"/cap{self.softcap}" if self.softcap is not None else "")
                + ("/sinks" if self.sinks else ""))


def document_bounds(pattern: str | None, seq_len: int) -> torch.Tensor | None:
    """Global document boundaries for a named pattern (no padding anywhere):
    "mixed"  lengths 1, 3, 1, 7, 2, 11, 5, ... cycling (the last one cut at S): documents of
             length 1, and documents crossing shard boundaries at odd places;
    "span"   [0, 1, 2, S - 1, S]: two 1-token documents, one spanning every rank, one more 1-token;
    "random" seeded lengths in [1, S // 3]."""
    if pattern is None:
        return None
    if "," in pattern:  # explicit boundaries, e.g. "0,6,20,32"
        return torch.tensor([int(b) for b in pattern.split(",")], dtype=torch.int64)
    if pattern == "span":
        bounds = [0, 1, 2, seq_len - 1, seq_len] if seq_len > 3 else [0, seq_len]
    else:
        if pattern == "mixed":
            lengths = [1, 3, 1, 7, 2, 11, 5]
        else:
            g = torch.Generator().manual_seed(seq_len)
            lengths = torch.randint(1, max(2, seq_len // 3), (seq_len,), generator=g).tolist()
        bounds, i = [0], 0
        while bounds[-1] < seq_len:
            bounds.append(min(seq_len, bounds[-1] + lengths[i % len(lengths)]))
            i += 1
    return torch.tensor(bounds, dtype=torch.int64)


def global_inputs(case: AttnCase, world: int):
    gen = torch.Generator().manual_seed(case.seed)
    seq = case.seq_local * world
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    q = randn(case.batch, seq, case.heads_q, case.head_dim)
    k = randn(case.batch, seq, case.heads_kv, case.head_dim)
    v = randn(case.batch, seq, case.heads_kv, case.head_dim)
    do = randn(case.batch, seq, case.heads_q, case.head_dim)
    if not case.output_grad:
        do = torch.zeros_like(do)
    dlse = randn(case.batch, case.heads_q, seq) if case.lse_grad else torch.zeros(case.batch, case.heads_q, seq, dtype=torch.float64)
    return q, k, v, do, dlse


def global_sinks(case: AttnCase) -> torch.Tensor | None:
    """[Hq] sink logits around the size of a typical score (so they change every result)."""
    if not case.sinks:
        return None
    gen = torch.Generator().manual_seed(case.seed + 100)
    return torch.randn(case.heads_q, generator=gen, dtype=torch.float64)


def mask_options(case: AttnCase, seq_len: int) -> dict:
    """The reference's / seqpar.attention's mask keyword arguments of `case` (without sinks)."""
    return {"cu_seqlens": document_bounds(case.docs, seq_len), "window": case.window,
            "softcap": case.softcap}


def reference(q, k, v, do, dlse, causal, scale, mask=None, sinks=None, **masks):
    """fp64 output, lse and input gradients of loss = <o, dO> + <lse, dLSE> (finite lse only);
    with `sinks`, their gradient too (a sixth result)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    inputs = (q, k, v)
    if sinks is not None:
        sinks = sinks.detach().clone().requires_grad_()
        inputs += (sinks,)
    o, lse = attention_reference(q, k, v, causal=causal, scale=scale, mask=mask, sinks=sinks,
                                 **masks)
    loss = (o * do).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    grads = torch.autograd.grad(loss, inputs)
    return (o.detach(), lse.detach()) + tuple(grads)


def masked_single_device_errors(q, k, v, do, dlse, case: AttnCase, sinks, ref) -> dict[str, float]:
    """Errors of seqpar's own CPU kernel path in `case.dtype` on the whole masked sequence in
    one process (the plan of one rank holding everything; sinks applied after): the
    same-precision single-device computation a masked low-precision case is bounded by."""
    from seqpar.kernels import KERNELS
    from seqpar.kernels.mask import MaskRule, Run, plan_blocks
    from seqpar.kernels.sinks import sinks_bwd, sinks_fwd
    seq = q.shape[1]
    opts = mask_options(case, seq)
    docs = opts["cu_seqlens"]
    rule = MaskRule(case.causal, case.window, None if docs is None else tuple(docs.tolist()),
                    case.softcap)
    blocks = plan_blocks((Run(0, seq),), (Run(0, seq),), rule)
    scale = case.scale if case.scale is not None else q.shape[-1] ** -0.5
    qx, kx, vx, dox = (t.to(case.dtype) for t in (q, k, v, do))
    kernel = KERNELS["flash"]
    o_inner, lse_inner = kernel.fwd(qx, kx, vx, blocks, scale)
    o_inner = o_inner.to(case.dtype)
    o, lse = o_inner, lse_inner
    dlse_x = torch.where(torch.isfinite(ref[1]), dlse, 0).float()
    do_in, dlse_in, extra = dox, dlse_x, ()
    if sinks is not None:
        sinks_x = sinks.to(case.dtype)
        o, lse = sinks_fwd(o_inner, lse_inner, sinks_x)
        do_in, dlse_in, dsinks = sinks_bwd(dox, dlse_x, o, lse_inner, sinks_x)
        extra = (dsinks,)
    dq, dk, dv = kernel.bwd(do_in, qx, kx, vx, o_inner, lse_inner, dlse_in, blocks, scale)
    names = ("o", "lse", "dq", "dk", "dv", "dsinks")
    return {n: max_error(a, b) for n, a, b in zip(names, (o, lse, dq, dk, dv) + extra, ref)}


def single_device_errors(q, k, v, do, dlse, causal, scale, dtype, ref) -> dict[str, float]:
    """Errors of the fused single-process kernel in `dtype` on the full sequence."""
    qx, kx, vx = (t.to(dtype).requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        qx.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2), is_causal=causal,
        scale=scale, enable_gqa=True).transpose(1, 2)
    _, lse = flash_fwd(qx.detach(), kx.detach(), vx.detach(), causal,
                       scale if scale is not None else q.shape[-1] ** -0.5)
    dq, dk, dv = torch.autograd.grad((o.double() * do).sum(), (qx, kx, vx))
    # The lse-gradient term is exact in fp64 and linear: add it in fp64 so only the kernel's
    # own rounding is measured.
    if dlse.abs().sum() > 0:
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        _, lse_ref = attention_reference(qr, kr, vr, causal=causal, scale=scale)
        extra_q, extra_k = torch.autograd.grad(
            (torch.where(torch.isfinite(lse_ref), lse_ref, 0) * dlse).sum(), (qr, kr))
        dq, dk = dq.double() + extra_q, dk.double() + extra_k  # lse does not depend on v
    names = ("o", "lse", "dq", "dk", "dv")
    return {n: max_error(a, b) for n, a, b in zip(names, (o, lse, dq, dk, dv), ref)}


def compare_results(names, actual, expected, dtype: torch.dtype, context: str,
                    single_device: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Assert each result against its reference with the tolerance of `dtype` (module
    docstring); `single_device()` gives the same-precision single-device errors, asked for
    only for bf16/fp16. Returns the errors."""
    errors = {}
    if dtype in EXACT_REL:
        for name, a, e in zip(names, actual, expected):
            errors[name] = assert_close(name, a, e, EXACT_REL[dtype], context)
        return errors
    single = single_device()
    for name, a, e in zip(names, actual, expected):
        err = max_error(a, e)
        bound = 2 * single[name] + magnitude(e) * torch.finfo(dtype).eps / 4
        if not err <= bound:
            raise AssertionError(f"{context} {name}: error {err:.3e} > 2 x single-device "
                                 f"error {single[name]:.3e} + magnitude * eps / 4")
        errors[name] = err
    return errors


_SAME = object()


def run_case(case: AttnCase, group=None, reference_scale=_SAME,
             reference_masks: dict | None = None) -> dict[str, float]:
    """Run on every rank; assert this rank's results; return its errors (for reporting).

    `group`: None, a ProcessGroup, or a seqpar.SPMesh (passed to seqpar.attention as is).

    `reference_scale` (default: the case's scale) and `reference_masks` (mask keyword
    arguments that replace the case's in the reference only) let a test feed the comparison a
    wrong reference on purpose, to show it fails.
    """
    # `group` may be a seqpar.SPMesh (backend "usp", or several sequence-parallel groups side
    # by side): seqpar's functions take it as is and shard over its sequence-parallel group.
    info = resolve_group(group)
    world, rank = info.world, info.rank
    q, k, v, do, dlse = global_inputs(case, world)
    mask = (None if case.s2 is None else
            s2_rule_token_mask(case.s2, q.shape[1], case.heads_q, case.heads_kv))
    sinks = global_sinks(case)
    masks = mask_options(case, q.shape[1])
    ref = reference(q, k, v, do, dlse, case.causal,
                    case.scale if reference_scale is _SAME else reference_scale, mask, sinks,
                    **{**masks, **(reference_masks or {})})

    def local(t, dim=1):
        return seqpar.shard(t, group, dim=dim, layout=case.layout,
                            cu_seqlens=masks["cu_seqlens"])

    q_l, k_l, v_l = (local(t).to(case.dtype).requires_grad_() for t in (q, k, v))
    options = {"s2": case.s2} if case.s2 is not None else {}
    if case.masked:
        options.update({name: value for name, value in masks.items() if value is not None})
    sinks_l = None
    if sinks is not None:
        sinks_l = sinks.to(case.dtype).requires_grad_()
        options["sinks"] = sinks_l
    with seqpar.comm_stats() as stats, (use_kernel(case.kernel) if case.kernel
                                        else contextlib.nullcontext()):
        o, lse = seqpar.attention(q_l, k_l, v_l, group, backend=case.backend, causal=case.causal,
                                  scale=case.scale, layout=case.layout, return_lse=True, **options)
        loss = (torch.where(torch.isfinite(lse), lse, 0).double() * local(dlse, dim=2)).sum()
        if case.output_grad:
            loss = loss + (o.double() * local(do)).sum()
        loss.backward()

    assert o.dtype == case.dtype and q_l.grad.dtype == case.dtype and k_l.grad.dtype == case.dtype
    assert lse.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    expected = [local(ref[0]), local(ref[1], dim=2)] + [local(g) for g in ref[2:5]]
    actual = [o, lse, q_l.grad, k_l.grad, v_l.grad]
    names = ("o", "lse", "dq", "dk", "dv")
    if sinks_l is not None:
        # Each rank holds its tokens' share of dsinks; their sum is the reference's gradient.
        total = sinks_l.grad.detach().double().clone()
        if world > 1:
            torch.distributed.all_reduce(total, group=info.group)
        expected.append(ref[5])
        actual.append(total)
        names += ("dsinks",)
    if mask is not None and case.dtype not in EXACT_REL:
        raise ValueError("low-precision S2 cases have no single-device fused kernel to compare "
                         "with; run them in fp32 or fp64")
    if case.masked:
        single = lambda: masked_single_device_errors(q, k, v, do, dlse, case, sinks, ref)  # noqa: E731
    else:
        single = lambda: single_device_errors(q, k, v, do, dlse, case.causal, case.scale,  # noqa: E731
                                              case.dtype, ref)
    errors = compare_results(names, actual, expected, case.dtype, f"rank {rank}/{world} {case}:",
                             single)
    for direction in ("fwd", "bwd"):
        op = stats.ops.get(f"{case.backend}.{direction}")
        errors[f"bytes_{direction}"] = stats.sent(f"{case.backend}.{direction}")
        errors[f"messages_{direction}"] = op.messages if op else 0
    return errors


# ---------------------------------------------------------------- cases every backend runs

def run_case_and_count(case: AttnCase, traffic: Callable[[AttnCase, int], tuple[int, int]]
                       ) -> dict[str, float]:
    """`run_case`, then assert the bytes this rank sent forward and backward equal the
    backend's documented formula `traffic(case, P)`."""
    errors = run_case(case)
    fwd, bwd = traffic(case, dist.get_world_size() if dist.is_initialized() else 1)
    assert errors["bytes_fwd"] == fwd, (errors["bytes_fwd"], fwd)
    assert errors["bytes_bwd"] == bwd, (errors["bytes_bwd"], bwd)
    return errors


def itemsizes(dtype: torch.dtype) -> tuple[int, int]:
    """(bytes per element of the inputs, of the accumulators: fp32, or fp64 for fp64)."""
    return torch.empty(0, dtype=dtype).element_size(), (8 if dtype == torch.float64 else 4)


def problem_of(case: AttnCase, world: int, **changes) -> Problem:
    """The cost model's view of `case` on `world` ranks (its traffic formulas are the ones the
    byte counts are asserted against)."""
    b, a = itemsizes(case.dtype)
    return Problem(batch=case.batch, seq_len=case.seq_local * world, heads_q=case.heads_q,
                   heads_kv=case.heads_kv, head_dim=case.head_dim, world=world, itemsize=b,
                   acc_itemsize=a, causal=case.causal, layout=case.layout, **changes)


# Odd but legal shapes every softmax backend runs.
ODD_SHAPES = (
    AttnCase(layout="zigzag", head_dim=40, seq_local=2, heads_q=8, heads_kv=2),   # 1-token chunks
    AttnCase(layout="striped", head_dim=40, seq_local=1, heads_q=3, heads_kv=1),  # 1 token per rank
    AttnCase(layout="contiguous", head_dim=40, seq_local=7, batch=3, scale=0.05),
    AttnCase(layout="zigzag", head_dim=24, seq_local=600, heads_q=2, heads_kv=1, causal=True),
    AttnCase(layout="striped", seq_local=9, causal=False, kernel="chunked", heads_q=8, heads_kv=2),
    AttnCase(layout="zigzag", seq_local=14, kernel="chunked", heads_q=8, heads_kv=2),
)


def odd_shapes(backend: str, heads_multiple: int = 1, extra: tuple[AttnCase, ...] = ()
               ) -> list[AttnCase]:
    """Odd but legal shapes: one-token zigzag chunks, one token per rank, D=40, B=3 with an
    explicit scale, a long local sequence, the chunked kernel (explicit masks), plus a
    backend's `extra` cases. Query heads are rounded up to a multiple of `heads_multiple`
    (head-sharded backends need Hq % P == 0)."""
    def fit(case: AttnCase) -> AttnCase:
        unit = math.lcm(heads_multiple, case.heads_kv)
        return dataclasses.replace(case, backend=backend,
                                   heads_q=-(-case.heads_q // unit) * unit)
    return [fit(case) for case in ODD_SHAPES + tuple(extra)]


def low_precision_case(backend: str, layout: str, dtype: torch.dtype) -> AttnCase:
    return AttnCase(backend=backend, layout=layout, dtype=dtype, heads_q=8, heads_kv=2,
                    seq_local=32, head_dim=32)


def check_lse_only_gradient(backend: str, layout: str) -> None:
    """Only lse used downstream: backward still runs (do is None inside; collectives run on
    every rank all the same) and dq, dk are exact (dv is zero: lse does not depend on v)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    _, lse_ref = attention_reference(qr, kr, v, causal=True)
    dq_ref, dk_ref = torch.autograd.grad(lse_ref.sum(), (qr, kr))
    q_l, k_l, v_l = (seqpar.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
    _, lse = seqpar.attention(q_l, k_l, v_l, backend=backend, layout=layout, return_lse=True)
    lse.sum().backward()
    assert_close("dq", q_l.grad, seqpar.shard(dq_ref, layout=layout), 1e-10)
    assert_close("dk", k_l.grad, seqpar.shard(dk_ref, layout=layout), 1e-10)
    assert v_l.grad is None or not v_l.grad.any()


# ---------------------------------------------------------------- the grids every backend runs
# Each grid is a list of pytest params (world, case) for `@pytest.mark.parametrize("world,case", ...)`.

def fp32_grid(backend: str, worlds=(1, 2, 3, 4)) -> list:
    """P x layout x causal / not x (MHA 4:4, GQA 8:2) in fp32; the lse gradient on for half."""
    return [pytest.param(world, AttnCase(backend=backend, layout=layout, causal=causal,
                                         heads_q=hq, heads_kv=hkv, seq_local=12, head_dim=16,
                                         lse_grad=(world + len(layout)) % 2 == 0),
                         id=f"{world}-{layout}-{'causal' if causal else 'full'}-{name}")
            for world in worlds for layout in LAYOUTS for causal in (True, False)
            for name, (hq, hkv) in (("mha", (4, 4)), ("gqa8:2", (8, 2)))]


def low_precision_grid(backend: str, worlds=(2, 4)) -> list:
    """bf16 and fp16, every layout, GQA 8:2."""
    return [pytest.param(world, low_precision_case(backend, layout, dtype),
                         id=f"{world}-{layout}-{name}")
            for world in worlds for layout in LAYOUTS
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))]


def odd_shape_grid(backend: str, worlds=(2, 4), extra: tuple[AttnCase, ...] = (),
                   heads_multiple: int = 1) -> list:
    """`odd_shapes` (and a backend's `extra` cases) on each world size."""
    return [pytest.param(world, case, id=f"{world}-{case}") for world in worlds
            for case in odd_shapes(backend, heads_multiple, extra)]
