"""One linear-attention (LASP-2) correctness case, run on every rank of a world.

Every rank builds the same global q, k, v, dO from a seed, computes the float64 reference
(`kernels/reference.py`: output, and dq, dk, dv by autograd) on the full sequence, shards the
inputs with seqpar's own `shard`, runs `seqpar.linear_attention` forward + backward, and
compares *its own* o, dq, dk and dv with the matching slice of the reference. Also used at
kernel level (single process) by `check_kernel_*`, for the chunked and the Triton kernels.

Tolerances (relative to max(1, max |reference|)), as for softmax attention
(tests/attention_cases.py):
* float64: 1e-10 — the algorithm must be exact up to double rounding;
* float32: 1e-5  — single-precision rounding of sums over a few hundred terms;
* bf16/fp16: 2 x the error of the same-precision single-device computation, plus a quarter
  rounding unit of the magnitude. That computation is the plain reference itself, independent
  of seqpar's kernels: inputs rounded to the dtype, computed in fp32 (the accumulator), results
  rounded to the dtype (`same_precision_reference`). LASP-2 and the kernels round inputs and
  results exactly once too, and accumulate in fp32 in between.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

import seqpar
from seqpar.cost import Problem
from seqpar.cost.traffic import lasp2_state_bytes, lasp2_volume
from seqpar.kernels import ChunkedLinearKernel, linear_attention_reference, use_linear_kernel
from seqpar.kernels.plan import accumulator_dtype
from tests.attention_cases import EXACT_REL, compare_results
from tests.checks import assert_close, max_error

# Per-head log-decays s_h (lambda_h = exp(-s_h)) by name; "zero" is a decay tensor of zeros
# (the decayed code path with lambda = 1), "extreme" mixes no decay with one that underflows.
DECAYS = {
    "none": lambda heads: None,
    "zero": lambda heads: torch.zeros(heads, dtype=torch.float64),
    "mild": lambda heads: torch.linspace(0.02, 0.2, heads, dtype=torch.float64),
    "strong": lambda heads: torch.full((heads,), 0.5, dtype=torch.float64),
    "extreme": lambda heads: torch.tensor([0.0, 50.0] * heads, dtype=torch.float64)[:heads],
}


@dataclass(frozen=True)
class LinearCase:
    layout: str = "contiguous"
    causal: bool = True
    decay: str = "none"
    heads: int = 2
    key_dim: int = 8
    value_dim: int = 12
    seq_local: int = 8
    batch: int = 1
    dtype: torch.dtype = torch.float64
    scale: float | None = None
    kernel: str | None = None  # force a local kernel ("chunked" / "lightning")
    seed: int = 0

    def __str__(self) -> str:
        return (f"lasp2/{self.layout}/{'causal' if self.causal else 'full'}/decay-{self.decay}/"
                f"H{self.heads}/Dk{self.key_dim}/Dv{self.value_dim}/S_loc{self.seq_local}/"
                f"B{self.batch}/{str(self.dtype).removeprefix('torch.')}"
                + (f"/{self.kernel}" if self.kernel else ""))

    def log_decay(self) -> torch.Tensor | None:
        return DECAYS[self.decay](self.heads)


def global_inputs(case: LinearCase, seq: int):
    gen = torch.Generator().manual_seed(case.seed)

    def randn(dim):
        return torch.randn(case.batch, seq, case.heads, dim, generator=gen, dtype=torch.float64)
    return randn(case.key_dim), randn(case.key_dim), randn(case.value_dim), randn(case.value_dim)


def reference(q, k, v, do, decay, causal, scale):
    """fp64 output and input gradients of loss = <o, dO>."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = linear_attention_reference(q, k, v, decay=decay, causal=causal, scale=scale)
    dq, dk, dv = torch.autograd.grad((o * do).sum(), (q, k, v))
    return o.detach(), dq, dk, dv


def same_precision_reference(q, k, v, do, decay, causal, scale, dtype, dfinal=None):
    """The reference on inputs rounded to `dtype`, computed in fp32, results rounded to
    `dtype`: o, (the final state, when dfinal is given), dq, dk, dv of <o, dO> (+ <F, dF>)."""
    q, k, v = (t.to(dtype).float().requires_grad_() for t in (q, k, v))
    decay = None if decay is None else decay.float()
    o = linear_attention_reference(q, k, v, decay=decay, causal=causal, scale=scale)
    loss = (o * do.to(dtype).float()).sum()
    outputs = [o]
    if dfinal is not None:
        final = final_state_reference(k, v, decay)
        loss = loss + (final * dfinal.float()).sum()
        outputs.append(final)
    grads = torch.autograd.grad(loss, (q, k, v))
    return [t.detach().to(dtype) for t in (*outputs, *grads)]


def single_device_errors(q, k, v, do, decay, causal, scale, dtype, ref) -> dict[str, float]:
    """Errors of the same-precision single-device computation over the whole sequence."""
    single = same_precision_reference(q, k, v, do, decay, causal, scale, dtype)
    return {n: max_error(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), single, ref)}


def state_bytes(case: LinearCase) -> int:
    itemsize = 8 if case.dtype == torch.float64 else 4
    return case.batch * case.heads * case.key_dim * case.value_dim * itemsize


def lasp2_bytes(case: LinearCase, world: int) -> int:
    """The documented traffic of one pass (forward and backward alike) per rank
    (`seqpar.cost.traffic.lasp2_volume`; state_bytes is its d x e state)."""
    problem = Problem(batch=case.batch, seq_len=case.seq_local * world, heads_q=case.heads,
                      heads_kv=case.heads, head_dim=case.key_dim, value_dim=case.value_dim,
                      world=world, acc_itemsize=8 if case.dtype == torch.float64 else 4,
                      causal=case.causal, layout=case.layout)
    assert lasp2_state_bytes(problem) == state_bytes(case)
    return lasp2_volume(problem, decayed=case.decay != "none").bytes


_SAME = object()


def run_linear_case(case: LinearCase, group=None, reference_scale=_SAME) -> dict[str, float]:
    """Run on every rank; assert this rank's results; return its errors and bytes sent.

    `reference_scale` (default: the case's scale) lets a test feed the comparison a wrong
    reference on purpose, to show it fails.
    """
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    q, k, v, do = global_inputs(case, case.seq_local * world)
    decay = case.log_decay()
    ref = reference(q, k, v, do, decay, case.causal,
                    case.scale if reference_scale is _SAME else reference_scale)

    def local(t):
        return seqpar.shard(t, group, dim=1, layout=case.layout)

    q_l, k_l, v_l = (local(t).to(case.dtype).requires_grad_() for t in (q, k, v))
    local_decay = None if decay is None else decay.to(torch.float32 if case.dtype != torch.float64
                                                       else torch.float64)
    with seqpar.comm_stats() as stats:
        with use_linear_kernel(case.kernel) if case.kernel else contextlib.nullcontext():
            o = seqpar.linear_attention(q_l, k_l, v_l, group, decay=local_decay, causal=case.causal,
                                        scale=case.scale, layout=case.layout)
        (o.double() * local(do)).sum().backward()

    assert o.dtype == case.dtype and all(t.grad.dtype == case.dtype for t in (q_l, k_l, v_l))
    names = ("o", "dq", "dk", "dv")
    actual = [o, q_l.grad, k_l.grad, v_l.grad]
    expected = [local(t) for t in ref]
    errors = compare_results(names, actual, expected, case.dtype, f"rank {rank}/{world} {case}:",
                             lambda: single_device_errors(q, k, v, do, decay, case.causal,
                                                          case.scale, case.dtype, ref))
    errors["bytes_fwd"] = stats.sent("lasp2.fwd")
    errors["bytes_bwd"] = stats.sent("lasp2.bwd")
    return errors


# ---------------------------------------------------------------- kernel level (one process)

def kernel_by_name(name: str, block: int | None):
    """A local kernel with small blocks, so short sequences cross several (ragged) blocks
    (block None: the kernel's own choice)."""
    if name == "lightning":
        from seqpar.kernels.lightning import LightningKernel  # needs TRITON_INTERPRET=1 on CPU
        return LightningKernel(block=block)
    return ChunkedLinearKernel() if block is None else ChunkedLinearKernel(block=block, span_blocks=2)


class _KernelWithState(torch.autograd.Function):
    """kernel.fwd / kernel.bwd with an initial state in and the final state out, as autograd
    sees them, so a chain of calls can be differentiated end to end."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, kernel, log_decay, scale):
        o, final = kernel.fwd(q, k, v, log_decay, scale, initial_state, final_state=True)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.args = (kernel, log_decay, scale)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, initial_state = ctx.saved_tensors
        kernel, log_decay, scale = ctx.args
        dq, dk, dv, dinitial = kernel.bwd(do, q, k, v, log_decay, scale, initial_state, dfinal,
                                          dinitial_state=initial_state is not None)
        return dq, dk, dv, dinitial, None, None, None


def final_state_reference(k, v, decay):
    """F = sum_j lambda^(S - j) k_j^T v_j over the whole sequence (fp64, dense)."""
    seq, heads = k.shape[1], k.shape[2]
    s = torch.zeros(heads, dtype=k.dtype) if decay is None else decay.to(k.dtype)
    weights = torch.exp(-s[None, :] * (seq - torch.arange(seq, dtype=k.dtype))[:, None])
    return torch.einsum("bnhd,bnhe->bhde", k * weights[None, :, :, None], v)


def _chained(kernel, parts, q, k, v, do, dfinal, decay, scale, dtype):
    """o, final state and dq, dk, dv of <o, dO> + <F, dF> through a chain of kernel calls."""
    acc = accumulator_dtype(dtype)
    s = torch.zeros(q.shape[2], dtype=acc) if decay is None else decay.to(acc)
    q_x, k_x, v_x = (t.to(dtype).requires_grad_() for t in (q, k, v))
    outputs, state, start = [], None, 0
    for length in parts:
        rows = slice(start, start + length)
        o, state = _KernelWithState.apply(q_x[:, rows], k_x[:, rows], v_x[:, rows], state,
                                          kernel, s, scale)
        outputs.append(o)
        start += length
    o = torch.cat(outputs, dim=1)
    grads = torch.autograd.grad((o.double() * do).sum() + (state.double() * dfinal).sum(),
                                (q_x, k_x, v_x))
    return (o, state, *grads)


def check_kernel_chain(kernel_name: str, dtype: torch.dtype, decay_name: str,
                       parts=(13, 16, 8), block: int | None = 16, dims=(5, 7)) -> dict[str, float]:
    """A causal sequence cut in `parts`, each part one kernel call taking the previous part's
    final state as its initial state, equals the reference on the whole sequence: o, the final
    state, and dq, dk, dv of <o, dO> + <F, dF> — so state in, state out and both their
    gradients are checked (the first part has no initial state, as LASP-2 calls it).
    Half inputs: within 2 x the error of the same-precision reference (`same_precision_reference`)
    + eps/4 of the magnitude."""
    case = LinearCase(decay=decay_name, heads=2, key_dim=dims[0], value_dim=dims[1], batch=2)
    q, k, v, do = global_inputs(case, sum(parts))
    dfinal = torch.randn(case.batch, case.heads, case.key_dim, case.value_dim,
                         generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    decay, scale = case.log_decay(), 0.3
    q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
    o_ref = linear_attention_reference(q_r, k_r, v_r, decay=decay, scale=scale)
    final_ref = final_state_reference(k_r, v_r, decay)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (final_ref * dfinal).sum(), (q_r, k_r, v_r))
    expected = (o_ref.detach(), final_ref.detach(), *ref_grads)

    inputs = (parts, q, k, v, do, dfinal, decay, scale, dtype)
    names = ("o", "final_state", "dq", "dk", "dv")

    def single_device():
        single = same_precision_reference(q, k, v, do, decay, True, scale, dtype, dfinal)
        return {name: max_error(b, e) for name, b, e in zip(names, single, expected)}
    return compare_results(names, _chained(kernel_by_name(kernel_name, block), *inputs), expected,
                           dtype, f"{kernel_name} {dtype} decay-{decay_name}", single_device)


def check_kernel_intra(kernel_name: str, dtype: torch.dtype, decay_name: str, causal: bool,
                       seq: int = 37, block: int = 16) -> dict[str, float]:
    """The zero-state chunk pass LASP-2 overlaps with its all-gather (causal, or bidirectional
    from two causal passes) vs the reference: o, dq, dk, dv (fp32 or fp64 inputs)."""
    kernel = kernel_by_name(kernel_name, block)
    case = LinearCase(decay=decay_name, heads=2, key_dim=5, value_dim=7, batch=2)
    q, k, v, do = global_inputs(case, seq)
    decay, scale = case.log_decay(), 0.3
    expected = reference(q, k, v, do, decay, causal, scale)
    acc = accumulator_dtype(dtype)
    s = torch.zeros(case.heads, dtype=acc) if decay is None else decay.to(acc)
    x = [t.to(dtype) for t in (q, k, v, do)]
    actual = (kernel.intra_fwd(*x[:3], s, scale, causal), *kernel.intra_bwd(x[3], *x[:3], s, scale, causal))
    context = f"{kernel_name} {dtype} decay-{decay_name} causal={causal}"
    for a in actual:
        assert a.dtype == acc, (context, a.dtype)
    return {name: assert_close(name, a, e, EXACT_REL[dtype], context)
            for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected)}
