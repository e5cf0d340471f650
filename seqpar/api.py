"""The public entry points: validate once at the edge, pick the backend, dispatch.

`attention(q, k, v, ...)` takes this rank's shard of the sequence (layout as made by
`seqpar.shard`) and returns exactly what single-device attention over the whole sequence
returns for those tokens; `linear_attention(q, k, v, ...)` does the same for linear attention
with per-head decay (LASP-2). Validation runs locally and then through one tiny all-reduce
(`comm.primitives.agree`), so bad arguments on any rank, or shapes that differ between ranks,
raise on every rank instead of hanging the next collective.

A softmax backend is a function `(q, k, v, info, mask, scale, layout, return_lse, mesh) ->
(o, lse)` registered in `BACKENDS`; mask is the call's `kernels.mask.MaskRule` (causal, window,
documents, soft cap: the backend hands it to its plans, nothing else), lse may be None when
return_lse is False (backends whose lse costs communication skip it), and mesh is the `SPMesh`
passed as group, or None. Sinks are not the backends' business: with sinks the backend is
asked for lse and `kernels.sinks.AttentionSinks` folds them into the merged (o, lse).

backend="auto" asks the cost model (`seqpar.cost.choose`) for the predicted fastest legal
exact backend of these shapes, heads, group size, mesh and hardware profile
(`seqpar.cost.profile_for`: the one set with `seqpar.cost.use_profile`, else the device's spec
sheet); `seqpar.cost.explain(seqpar.cost.problem_of(...), profile)` shows why. The choice goes
through the same cross-rank agreement, so ranks with different profiles raise, never hang.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable

import torch

from .comm.allgather import AllGatherAttention, AllGatherPlan
from .comm.lasp2 import Lasp2Attention, Lasp2Plan
from .comm.primitives import GroupInfo, active_recorders, agree, resolve_group
from .comm.ring import RingAttention, RingPlan
from .comm.tokenring import TokenRingAttention, TokenRingPlan
from .comm.ulysses import UlyssesAttention, UlyssesPlan
from .comm.usp import usp_plan
from .cost.hardware import profile_for
from .cost.predict import AUTO_CANDIDATES, choose, problem_of
from .documents import check_cu_seqlens, cu_seqlens_agreement
from .kernels.dispatch import select_kernel, select_linear_kernel
from .kernels.mask import MaskRule
from .kernels.s2 import S2Pattern, warn_if_uncovered
from .kernels.sinks import AttentionSinks
from .kernels.plan import accumulator_dtype
from .balanced import CHUNKS_PER_RANK
from .layout import ALL_LAYOUTS, BALANCED, all_local_runs, balanced_needs_documents, local_runs
from .mesh import SPMesh

BACKENDS: dict[str, Callable] = {}


def _ring(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str, return_lse: bool,
          mesh: SPMesh | None):
    seq_len = q.shape[1] * info.world
    plan = RingPlan.build(info, local_runs(seq_len, info.world, info.rank, layout, mask.documents),
                          all_local_runs(seq_len, info.world, layout, mask.documents), mask, scale,
                          select_kernel(q.device, q.dtype), active_recorders())
    return RingAttention.apply(q, k, v, plan)


def _ulysses(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str, return_lse: bool,
             mesh: SPMesh | None, s2: S2Pattern | None = None):
    plan = UlyssesPlan.build(info, GroupInfo(None, 0, 1),
                             all_local_runs(q.shape[1] * info.world, info.world, layout,
                                   mask.documents),
                             q.shape[2], k.shape[2], mask, scale,
                             select_kernel(q.device, q.dtype), active_recorders(), return_lse,
                             op="s2" if s2 is not None else "ulysses", s2=s2)
    return UlyssesAttention.apply(q, k, v, plan)


def _s2(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str, return_lse: bool,
        mesh: SPMesh | None, s2: S2Pattern):
    """Ulysses with the block-sparse S2 kernel in the middle (the same all-to-alls)."""
    warn_if_uncovered(s2, q.shape[1] * info.world // s2.block_size, k.shape[2], q.shape[2])
    return _ulysses(q, k, v, info, mask, scale, layout, return_lse, mesh, s2)


def _usp(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str, return_lse: bool,
         mesh: SPMesh | None):
    plan = usp_plan(mesh.ulysses, mesh.ring,
                    all_local_runs(q.shape[1] * info.world, info.world, layout,
                                   mask.documents), q.shape[2],
                    k.shape[2], mask, scale, select_kernel(q.device, q.dtype),
                    active_recorders(), return_lse)
    return UlyssesAttention.apply(q, k, v, plan)


def _allgather(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str,
               return_lse: bool, mesh: SPMesh | None):
    plan = AllGatherPlan.build(info, all_local_runs(q.shape[1] * info.world, info.world, layout,
                                   mask.documents),
                               mask, scale, select_kernel(q.device, q.dtype), active_recorders())
    return AllGatherAttention.apply(q, k, v, plan)


def _tokenring(q, k, v, info: GroupInfo, mask: MaskRule, scale: float, layout: str,
               return_lse: bool, mesh: SPMesh | None):
    plan = TokenRingPlan.build(info, all_local_runs(q.shape[1] * info.world, info.world, layout,
                                   mask.documents),
                               mask, scale, select_kernel(q.device, q.dtype), active_recorders())
    return TokenRingAttention.apply(q, k, v, plan)


BACKENDS["ring"] = _ring
BACKENDS["tokenring"] = _tokenring
BACKENDS["ulysses"] = _ulysses
BACKENDS["usp"] = _usp
BACKENDS["allgather"] = _allgather
BACKENDS["s2"] = _s2

_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _check_tensors(q, k, v) -> Exception | None:
    """q, k, v: 4-D floating tensors of one supported dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            return ValueError(f"{name} must be 4-D [batch, seq_local, heads, head_dim] (bshd), "
                              f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            return TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype not in _DTYPE_CODES:
            return TypeError(f"{name}.dtype={t.dtype} is not supported; use one of "
                             f"{sorted(str(d) for d in _DTYPE_CODES)}")
    if not (q.dtype == k.dtype == v.dtype):
        return TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         f"cast them to the same dtype")
    if not (q.device == k.device == v.device):
        return ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return None


def _check_length_and_flags(q, causal, scale, layout) -> Exception | None:
    """A non-empty local length the layout can hold, a bool `causal`, a usable `scale`."""
    if q.shape[1] == 0:
        return ValueError("the local sequence is empty (q.shape[1] == 0)")
    if layout == "zigzag" and q.shape[1] % 2:
        return ValueError(f"layout='zigzag' holds two equal chunks per rank, so the local length "
                          f"must be even, got q.shape[1]={q.shape[1]}; pad the global sequence "
                          f"to a multiple of 2 x the group size")
    if layout == BALANCED and q.shape[1] % CHUNKS_PER_RANK:
        return ValueError(f"layout='balanced' holds {CHUNKS_PER_RANK} equal chunks per rank, so the "
                          f"local length must be a multiple of {CHUNKS_PER_RANK}, got "
                          f"q.shape[1]={q.shape[1]}; pad the global sequence to a multiple of "
                          f"{CHUNKS_PER_RANK} x the group size")
    if not isinstance(causal, bool):
        return TypeError(f"causal must be a bool, got {causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        return ValueError(f"scale must be None (1/sqrt(head_dim)) or a positive finite number, "
                          f"got {scale!r}")
    return None


def _agreed_call_values(q, causal, scale, layout, ok: bool) -> dict[str, int]:
    """The values every rank of one call must share, as integers for `agree` (placeholders
    where this rank's arguments are bad: its own error is raised instead)."""
    return {
        "layout": ALL_LAYOUTS.index(layout) if layout in ALL_LAYOUTS else -1,
        "causal": int(bool(causal)) if isinstance(causal, bool) else -1,
        "scale": _float_bits(float(scale)) if ok and scale is not None else 0,
        "dtype": _DTYPE_CODES[q.dtype] if ok else -1,
        "batch size": q.shape[0] if ok else -1,
        "local sequence length": q.shape[1] if ok else -1,
    }


def _check_attention_args(q, k, v, backend, causal, scale, layout, return_lse, s2,
                          info: GroupInfo, mesh: SPMesh | None) -> Exception | None:
    """This rank's verdict on its arguments: the exception to raise, or None."""
    if backend not in BACKENDS and backend != "auto":
        return ValueError(f"backend={backend!r} is not available; choose one of "
                          f"{sorted(BACKENDS) + ['auto']}")
    if layout not in ALL_LAYOUTS:
        return ValueError(f"layout={layout!r} is unknown; choose one of {ALL_LAYOUTS}")
    problem = _check_tensors(q, k, v)
    if problem:
        return problem
    if k.shape != v.shape:
        return ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                          f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        return ValueError(f"batch sizes differ: q.shape[0]={q.shape[0]}, k.shape[0]={k.shape[0]}")
    if q.shape[1] != k.shape[1]:
        return ValueError(f"q holds {q.shape[1]} local tokens but k/v hold {k.shape[1]}; "
                          f"shard q, k and v of the same sequence with the same layout")
    if q.shape[3] != k.shape[3]:
        return ValueError(f"head dims differ: q.shape[3]={q.shape[3]}, k.shape[3]={k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        return ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                          f"({k.shape[2]}) for grouped-query attention")
    problem = _check_length_and_flags(q, causal, scale, layout)
    if problem:
        return problem
    if not isinstance(return_lse, bool):
        return TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if s2 is not None and backend != "s2":
        return ValueError(f"s2= is only used by backend='s2', got backend={backend!r}; "
                          f"drop s2= or choose backend='s2'")
    if backend == "s2":
        problem = _check_s2(s2, causal, q.shape[1] * info.world)
        if problem:
            return problem
    return _check_head_sharding(backend, q.shape[2], info, mesh)


def _check_s2(s2, causal: bool, seq_len: int) -> Exception | None:
    """backend="s2" needs a pattern, causal attention, and whole blocks."""
    if s2 is None:
        return ValueError("backend='s2' needs its sparsity pattern: pass s2=seqpar.S2Pattern("
                          "block_size=64, local_blocks=4, vert_stride=4)")
    if not isinstance(s2, S2Pattern):
        return TypeError(f"s2 must be a seqpar.S2Pattern, got {type(s2).__name__}")
    if not causal:
        return ValueError("backend='s2' is causal only (its stripes select earlier blocks); "
                          "pass causal=True, or use a dense backend for non-causal attention")
    if seq_len % s2.block_size:
        padded = -(-seq_len // s2.block_size) * s2.block_size
        return ValueError(f"backend='s2': the global sequence length {seq_len} is not a multiple "
                          f"of s2.block_size={s2.block_size}; pad it to {padded} or pick a "
                          f"smaller block_size")
    return None


def _check_head_sharding(backend: str, heads_q: int, info: GroupInfo, mesh: SPMesh | None
                         ) -> Exception | None:
    """The group arguments the head-sharded backends need: an SPMesh for usp, and query heads
    that the Ulysses degree divides."""
    if backend == "usp" and mesh is None:
        return ValueError("backend='usp' needs group=seqpar.SPMesh(group, ulysses=U) to know its "
                          "Ulysses x ring split, got a plain process group; build the mesh once, "
                          "e.g. mesh = seqpar.SPMesh(group, ulysses=2), and pass group=mesh")
    degree = {"ulysses": info.world, "s2": info.world,
              "usp": mesh.ulysses_size if mesh else 0}.get(backend, 0)
    if degree and heads_q % degree:
        where = (f"the {info.world} ranks of the group" if backend in ("ulysses", "s2")
                 else f"ulysses={degree} ranks of the mesh")
        fix = ("use backend='usp' with seqpar.SPMesh(group, ulysses=U) for a U that divides the "
               "query heads, or backend='ring'" if backend == "ulysses"
               else "choose a group size that divides the query heads" if backend == "s2"
               else "choose a Ulysses degree that divides the query heads, or backend='ring'")
        return ValueError(f"backend={backend!r} shards the {heads_q} query heads over {where}, "
                          f"which needs heads % {degree} == 0; {fix}")
    return None


def _auto_backend(q, k, info: GroupInfo, mesh: SPMesh | None, causal: bool, layout: str,
                  return_lse: bool, window: int | None = None, cu_seqlens=None) -> str:
    """The backend the cost model predicts fastest among the registered exact ones (with a
    window or documents: their visible work and the ring's / TokenRing's reduced traffic)."""
    problem = problem_of(q, k, info.world, mesh.ulysses_size if mesh is not None else None,
                         causal, layout, return_lse, window,
                         None if cu_seqlens is None else tuple(cu_seqlens.tolist()))
    available = [name for name in AUTO_CANDIDATES if name in BACKENDS]
    return choose(problem, profile_for(q.device), available).backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, backend: str = "ring",
              causal: bool = True, scale: float | None = None, layout: str = "zigzag",
              return_lse: bool = False, s2=None, *, cu_seqlens: torch.Tensor | None = None,
              window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None):
    """Softmax attention over a sequence sharded across `group`.

    q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D] (Hq % Hkv == 0): this rank's tokens, sharded
    with `layout` ("contiguous" | "zigzag" | "striped"), as `seqpar.shard` makes them.
    Returns o [B, S_loc, Hq, D] in q's dtype, and with `return_lse=True` also
    lse [B, Hq, S_loc] (fp32, natural log; fp64 for fp64 inputs). Collective: every rank of the
    group calls it with the same shapes, and calls backward if any rank does.
    group: None (WORLD), a ProcessGroup, or a `seqpar.SPMesh` (needed by backend="usp"; the
    other backends use its whole group). s2: the `seqpar.S2Pattern` backend "s2" attends with
    (Ulysses all-to-all + block-sparse S2 heads; causal only).
    backend="auto": the cost model's predicted fastest legal exact backend (module docstring).

    Masks (DESIGN §2 / §4 "Masks"; every backend but "s2", every layout): `cu_seqlens` the
    GLOBAL document boundaries [n_docs + 1] of a packed B = 1 sequence (0 = c[0] < ... < c[-1]
    = S, the same on every rank; a token sees only its own document), `window` W >= 1 (key j
    visible to query i only if |i - j| < W), `softcap` c > 0 (scores become c tanh(s / c)),
    `sinks` [Hq] (one extra logit per head in every denominator; lse includes it; its gradient
    is this rank's tokens' share). The mask reaches every backend through one plan
    (`kernels.mask.plan_blocks` with a `MaskRule`); sinks are applied once to the merged
    result (`kernels.sinks`).
    """
    mesh = group if isinstance(group, SPMesh) else None
    info = mesh.info if mesh is not None else resolve_group(group)
    problem = _check_attention_args(q, k, v, backend, causal, scale, layout, return_lse, s2,
                                    info, mesh)
    if problem is None:
        problem = _check_masks(q, backend, layout, info, cu_seqlens, window, softcap, sinks)
    requested = backend
    shapes_ok = problem is None
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if backend == "auto" and shapes_ok:
        backend = _auto_backend(q, k, info, mesh, causal, layout, return_lse, window, cu_seqlens)
    agree(info, "seqpar.attention", {
        "backend='auto' requested": int(requested == "auto"),
        ("backend chosen by backend='auto' (use the same cost profile on every rank)"
         if requested == "auto" else "backend"):
            sorted(BACKENDS).index(backend) if backend in BACKENDS else -1,
        **_agreed_call_values(q, causal, scale, layout, shapes_ok),
        "return_lse": int(bool(return_lse)) if isinstance(return_lse, bool) else -1,
        "SPMesh ulysses degree": mesh.ulysses_size if mesh is not None else 0,
        "query heads": q.shape[2] if shapes_ok else -1,
        "key/value heads": k.shape[2] if shapes_ok else -1,
        "head dim": q.shape[3] if shapes_ok else -1,
        **_s2_values(s2 if shapes_ok else None),
        **_mask_values(cu_seqlens, window, softcap, sinks, shapes_ok),
    }, problem, device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    options = {"s2": s2} if backend == "s2" else {}
    mask = MaskRule(causal, None if window is None else int(window),
                    None if cu_seqlens is None else tuple(cu_seqlens.tolist()),
                    None if softcap is None else float(softcap))
    o, lse = BACKENDS[backend](q, k, v, info, mask, scale, layout,
                               return_lse or sinks is not None, mesh, **options)
    if sinks is not None:
        o, lse = AttentionSinks.apply(o, lse, sinks)
    return (o, lse) if return_lse else o


def _check_masks(q, backend: str, layout: str, info: GroupInfo, cu_seqlens, window, softcap,
                 sinks) -> Exception | None:
    """This rank's verdict on the mask arguments (q is already known to be well formed)."""
    if backend == "s2" and not (cu_seqlens is None and window is None and softcap is None
                                and sinks is None):
        return ValueError("backend='s2' does not take cu_seqlens, window, softcap or sinks (its "
                          "block-sparse pattern is its mask); use backend='ring', 'tokenring', "
                          "'ulysses', 'usp' or 'allgather' for these masks")
    if cu_seqlens is not None:
        problem = check_cu_seqlens(cu_seqlens, q.shape[1] * info.world, q.shape[0])
        if problem:
            return problem
    elif layout == BALANCED:
        return ValueError(balanced_needs_documents())
    return _check_window_softcap_sinks(q, window, softcap, sinks)


def _check_window_softcap_sinks(q, window, softcap, sinks) -> Exception | None:
    """The window, soft cap and sinks of a call with queries q (also used by inference)."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            return TypeError(f"window must be None or an int W >= 1 (key j visible to query i "
                             f"iff |i - j| < W), got {window!r}")
        if window < 1:
            return ValueError(f"window must be >= 1 (window=1: each token sees only itself), "
                              f"got {window}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            return TypeError(f"softcap must be None or a positive number, got {softcap!r}")
        if not math.isfinite(softcap) or softcap <= 0:
            return ValueError(f"softcap must be a positive finite number (scores become "
                              f"softcap * tanh(s / softcap)), got {softcap!r}; pass None for "
                              f"no cap")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            return TypeError(f"sinks must be None or a tensor [Hq] of per-head logits, got "
                             f"{type(sinks).__name__}")
        if sinks.dtype not in _DTYPE_CODES:
            return TypeError(f"sinks.dtype={sinks.dtype} is not supported; pass the sink logits "
                             f"as a floating tensor (e.g. torch.float32)")
        if tuple(sinks.shape) != (q.shape[2],):
            return ValueError(f"sinks must have shape [Hq] = [{q.shape[2]}] (one logit per "
                              f"query head), got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            return ValueError(f"sinks is on {sinks.device} but q is on {q.device}; move it to "
                              f"q's device")
    return None


def _mask_values(cu_seqlens, window, softcap, sinks, ok: bool) -> dict[str, int]:
    """The mask arguments as integers every rank must share (zeros where absent)."""
    return {
        **cu_seqlens_agreement(cu_seqlens, ok),
        "window": int(window) if ok and isinstance(window, numbers.Integral) else 0,
        "softcap": _float_bits(float(softcap)) if ok and isinstance(softcap, numbers.Real) else 0,
        "sinks (None or a tensor)": int(sinks is not None),
    }


def _s2_values(s2: S2Pattern | None) -> dict[str, int]:
    """The S2 pattern as integers every rank must share (zeros without one)."""
    fields = ("block_size", "local_blocks", "vert_stride", "heterogeneous", "head_offset")
    return {f"s2.{name}": int(getattr(s2, name)) if s2 is not None else 0 for name in fields}


LINEAR_LAYOUTS = ("contiguous", "zigzag")
_DECAY_DTYPES = (torch.float32, torch.float64)


def _check_decay(decay, q) -> Exception | None:
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor):
        return TypeError(f"decay must be None or a torch.Tensor of per-head log-decays, got "
                         f"{type(decay).__name__}")
    if decay.dtype not in _DECAY_DTYPES:
        return TypeError(f"decay.dtype={decay.dtype} is not supported; pass log-decays as "
                         f"torch.float32 or torch.float64 (they are exponents over long spans)")
    if decay.shape != (q.shape[2],):
        return ValueError(f"decay must have shape [H] = [{q.shape[2]}] (one log-decay per head), "
                          f"got {tuple(decay.shape)}")
    if decay.device != q.device:
        return ValueError(f"decay is on {decay.device} but q is on {q.device}; move it to "
                          f"q's device")
    if decay.requires_grad:
        return ValueError("decay requires grad, but gradients with respect to the log-decays are "
                          "not computed; pass decay.detach()")
    if not torch.isfinite(decay).all():
        return ValueError("decay holds non-finite values; log-decays must be finite numbers >= 0")
    if (decay < 0).any():
        return ValueError(f"decay holds log-decays s_h = -log(lambda_h), which must be >= 0 "
                          f"(lambda_h <= 1), got min {decay.min().item():g}; pass -log(lambda)")
    return None


def _check_linear_args(q, k, v, decay, causal, scale, layout) -> Exception | None:
    """This rank's verdict on the arguments of `linear_attention`: the exception, or None."""
    if layout in ("striped", BALANCED):
        return ValueError(f"layout={layout!r} is not supported by linear_attention: LASP-2 passes "
                          f"one state per contiguous chunk of a fixed layout (striped shards have "
                          f"none, balanced ones depend on the documents); use "
                          f"layout='contiguous' or 'zigzag'")
    if layout not in ALL_LAYOUTS:
        return ValueError(f"layout={layout!r} is unknown; choose one of {LINEAR_LAYOUTS}")
    problem = _check_tensors(q, k, v)
    if problem:
        return problem
    if q.shape[3] != k.shape[3]:
        return ValueError(f"head dims differ: q.shape[3]={q.shape[3]}, k.shape[3]={k.shape[3]}; "
                          f"q and k share the key dim Dk (v may have its own Dv)")
    if q.shape != k.shape:
        return ValueError(f"q and k must have the same shape [B, S_loc, H, Dk], got "
                          f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        return ValueError(f"v must hold the same batch, local tokens and heads as q: "
                          f"v.shape[:3]={tuple(v.shape[:3])}, q.shape[:3]={tuple(q.shape[:3])}")
    return _check_length_and_flags(q, causal, scale, layout) or _check_decay(decay, q)


def _decay_checksum(decay: torch.Tensor) -> int:
    """One integer that differs when the per-head values (or their order) differ."""
    weights = torch.arange(1, decay.numel() + 1, dtype=torch.float64, device=decay.device)
    return _float_bits(float((decay.double() * weights).sum()))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                     decay: torch.Tensor | None = None, causal: bool = True,
                     scale: float | None = None, layout: str = "contiguous",
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Linear attention (no softmax, no normaliser) over a sequence sharded across `group`.

    q/k [B, S_loc, H, Dk], v [B, S_loc, H, Dv]: this rank's tokens, sharded with `layout`
    ("contiguous" | "zigzag"). decay: None or [H] per-head log-decays s_h >= 0 (lambda_h =
    exp(-s_h)): causal o_i = sum_{j <= i} lambda^(i-j) scale (q_i . k_j) v_j; non-causal the
    same over every j with lambda^|i-j|. cu_seqlens: None, or the GLOBAL document boundaries
    [n_docs + 1] of one packed sequence (B == 1, identical on every rank): the sums run over j
    of i's own document only (the LASP-2 state chain is cut at every boundary). Returns
    o [B, S_loc, H, Dv] in q's dtype. Collective: every rank of the group calls it with the same
    shapes, decay and cu_seqlens, and calls backward if any rank does.
    """
    info = resolve_group(group)
    problem = _check_linear_args(q, k, v, decay, causal, scale, layout)
    if problem is None:
        problem = check_cu_seqlens(cu_seqlens, q.shape[1] * info.world, q.shape[0])
    ok = problem is None
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    agree(info, "seqpar.linear_attention", {
        **_agreed_call_values(q, causal, scale, layout, ok),
        "heads": q.shape[2] if ok else -1,
        "key dim": q.shape[3] if ok else -1,
        "value dim": v.shape[3] if ok else -1,
        "decay (None or a tensor)": int(decay is not None),
        "decay": _decay_checksum(decay) if ok and decay is not None else 0,
        **cu_seqlens_agreement(cu_seqlens, ok),
    }, problem, device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    seq_len = q.shape[1] * info.world
    plan = Lasp2Plan.build(info, all_local_runs(seq_len, info.world, layout), causal,
                           decay is not None, scale,
                           select_linear_kernel(q.device, q.dtype, max(q.shape[3], v.shape[3])),
                           active_recorders(), cu_seqlens, q.device)
    log_decay = None
    if not plan.summed:
        log_decay = (torch.zeros(q.shape[2], dtype=accumulator_dtype(q.dtype), device=q.device)
                     if decay is None else decay.to(accumulator_dtype(q.dtype)))
    return Lasp2Attention.apply(q, k, v, log_decay, plan)
