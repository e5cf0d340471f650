"""A small hybrid language model for the million-token step (`benchmarks.long_context --million`)
and its S = 16K twin test: a Llama-like stack whose token mixers are LASP-2 linear attention
(`seqpar.linear_attention`) and sliding-window softmax attention (`seqpar.attention(window=)`),
3:1 by default, every layer sequence-parallel over one process group.

Per layer (pre-norm residual, as Llama), x [1, S_loc, h] this rank's tokens:

    x = x + mix(rmsnorm(x))                    mix: linear or sliding-window softmax attention
    x = x + mlp(rmsnorm(x))                    SwiGLU: down(silu(gate(x)) * up(x))

    linear:  q = silu(x Wq), k = silu(x Wk), v = x Wv      (heads H, head dim D; TransNormer's
             o = LASP-2 causal linear attention with a     feature map: q.k >= 0)
                 fixed per-head decay lambda_h = exp(-s_h), s_h = 2^(-8(h+1)/H) (ALiBi's slopes,
                 Lightning Attention's choice: spans 1/s_h of 4 .. 256 tokens for H = 4)
             out = rmsnorm(o) Wo                           (no softmax normaliser, so the output
                                                            is normalised instead)
    softmax: q, k = rope(x Wq), rope(x Wk) at the tokens' GLOBAL positions (`seqpar.positions`),
             v = x Wv (GQA: Hkv K/V heads), o = softmax attention over the causal window of W
             keys (`seqpar.attention(..., window=W)`), out = o Wo

then logits = rmsnorm(x) W_head (untied), and the loss is the mean next-token cross entropy over
the whole sequence. Parameters in the dtype given (fp32 for the benchmark, fp64 in the twin
test), every weight N(0, 0.02) like transformers' Llama, norms 1.

Memory savers (`Savers`), each exact (the twin test compares the savers-on sharded run with a
plain one-process run):
  * checkpoint: every layer runs under torch.utils.checkpoint (non-reentrant), keeping only its
    input [S_loc, h] between forward and backward; the recompute runs the layer's collectives
    again, in the same order on every rank.
  * token_tile: each layer's token-wise parts -- before the attention (norm, q/k/v
    projections, feature maps, RoPE) and after it (output norm and projection, residual, norm,
    SwiGLU, residual) -- run over tiles of that many tokens (`TokenTiles`): forward without
    keeping anything but their inputs, backward recomputing one tile at a time. It is DeepSpeed
    TiledMLP's idea (which `hf.enable_memory_savers` uses as is) applied to every token-wise op
    of the layer, with several inputs (attention output and residual) and outputs (q, k, v),
    which TiledMLP does not take: so one layer's recompute holds q, k, v, the attention output
    and their gradients, not also its norms', projections' and MLP's [S_loc, *] intermediates.
  * loss_tile: lm_head + cross entropy over tiles of that many tokens (`tiled_loss`), one tile's
    logits at a time, recomputed per tile in the backward.

`HybridLM.loss(ids_local, labels_local, group, layout)` returns the global mean on every rank,
its gradient this rank's share (as `hf.loss`): after backward, `hf.sync_grads(model, group)`
makes every rank's gradients the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import seqpar
from seqpar.comm.primitives import resolve_group
from seqpar.integrations.tiled_loss import IGNORE_INDEX, tiled_lm_loss_sum

KINDS = ("linear", "softmax")


@dataclass(frozen=True)
class HybridConfig:
    vocab: int = 32000
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4                      # head dim = hidden // heads
    kv_heads: int = 2                   # softmax layers (GQA); linear layers use `heads`
    kinds: tuple[str, ...] = ("linear", "linear", "linear", "softmax")
    window: int = 1024
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"HybridConfig: hidden={self.hidden} must be a multiple of heads="
                             f"{self.heads}, and heads of kv_heads={self.kv_heads}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"HybridConfig: kinds must be a non-empty sequence of {KINDS}, "
                             f"got {self.kinds!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"HybridConfig: window must be an int >= 1, got {self.window!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Savers:
    checkpoint: bool = False
    token_tile: int | None = None       # tokens per tile of the token-wise parts; None: untiled
    loss_tile: int | None = None        # tokens per loss tile; None: one tile (all local tokens)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S_loc, head_dim / 2] of the angles position * theta^(-2i / head_dim); computed
    in fp64 (positions reach 2^20, where fp32 angles lose ~0.06 rad) and cast to `dtype`."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S_loc, H, D], rotate-half convention (transformers' Llama): pairs (i, i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([first * c - second * s, second * c + first * s], dim=-1)


def _linear(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, dtype=dtype)


class TokenTiles(torch.autograd.Function):
    """outputs = fn(*inputs) for a token-wise fn (token t's outputs depend on token t's inputs
    only), computed over tiles of `tile` tokens along dim 1, keeping only the inputs: forward
    under no_grad, tile by tile; backward recomputes one tile at a time with autograd on and
    differentiates it alone (dInput rows written in place, parameter gradients summed over
    tiles). So the token-wise intermediates (norms, projections, feature maps, the MLP's
    [tile, intermediate]) exist for one tile at a time. fn returns a tensor or a tuple of them,
    each [B, tile, ...]; `params` are the parameters fn uses."""

    @staticmethod
    def forward(ctx, fn, tile: int, n_inputs: int, *tensors):
        inputs = tensors[:n_inputs]
        seq = inputs[0].shape[1]
        with torch.no_grad():
            parts = [fn(*(x[:, start:start + tile] for x in inputs))
                     for start in range(0, seq, tile)]
        single = isinstance(parts[0], torch.Tensor)
        outputs = tuple(torch.cat([p if single else p[i] for p in parts], dim=1)
                        for i in range(1 if single else len(parts[0])))
        ctx.fn, ctx.tile, ctx.n_inputs, ctx.single = fn, tile, n_inputs, single
        ctx.params = tensors[n_inputs:]
        ctx.save_for_backward(*inputs)
        return outputs[0] if single else outputs

    @staticmethod
    def backward(ctx, *d_outputs):
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        need_in, need_p = need[:ctx.n_inputs], need[ctx.n_inputs:]
        d_inputs = [torch.empty_like(x) if n else None for x, n in zip(inputs, need_in)]
        d_params = [None] * len(ctx.params)
        for start in range(0, inputs[0].shape[1], ctx.tile):
            stop = start + ctx.tile
            tiles = [x[:, start:stop].detach().requires_grad_(n) for x, n in zip(inputs, need_in)]
            with torch.enable_grad():
                outs = ctx.fn(*tiles)
            outs = (outs,) if ctx.single else outs
            pairs = [(o, d[:, start:stop]) for o, d in zip(outs, d_outputs) if d is not None]
            wanted = ([t for t, n in zip(tiles, need_in) if n]
                      + [p for p, n in zip(ctx.params, need_p) if n])
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted,
                                             [d for _, d in pairs], allow_unused=True))
            for i, n in enumerate(need_in):
                if n:
                    g = next(grads)
                    d_inputs[i][:, start:stop] = 0 if g is None else g
            for i, n in enumerate(need_p):
                if n:
                    g = next(grads)
                    if g is not None:
                        d_params[i] = g if d_params[i] is None else d_params[i] + g
        return (None, None, None, *d_inputs, *d_params)


def token_tiles(fn, tile: int | None, inputs: list[torch.Tensor], params: list[torch.Tensor]):
    """fn(*inputs), over tiles of `tile` tokens when it saves memory (TokenTiles), else plain."""
    if tile is None or tile >= inputs[0].shape[1] or not torch.is_grad_enabled():
        return fn(*inputs)
    return TokenTiles.apply(fn, tile, len(inputs), *inputs, *params)


class LinearMixer(nn.Module):
    """LASP-2 linear attention (module docstring)."""

    def __init__(self, config: HybridConfig, dtype: torch.dtype):
        super().__init__()
        h, heads, d = config.hidden, config.heads, config.head_dim
        self.heads, self.head_dim = heads, d
        self.q_proj, self.k_proj, self.v_proj = (_linear(h, heads * d, dtype) for _ in range(3))
        self.o_norm = RMSNorm(heads * d, config.eps, dtype)
        self.o_proj = _linear(heads * d, h, dtype)
        slopes = [2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]
        self.register_buffer("log_decay", torch.tensor(slopes, dtype=dtype), persistent=False)

    def tables(self, positions, dtype):
        return []  # no positions: the decay carries the order

    def project(self, x):
        """Token-wise: x [B, T, h] (normed) -> q, k, v [B, T, H, D]."""
        shape = (*x.shape[:2], self.heads, self.head_dim)
        return (F.silu(self.q_proj(x)).view(shape), F.silu(self.k_proj(x)).view(shape),
                self.v_proj(x).view(shape))

    def attend(self, q, k, v, group, layout):
        return seqpar.linear_attention(q, k, v, group, decay=self.log_decay, layout=layout)

    def out(self, o):
        """Token-wise: o [B, T, H, D] -> [B, T, h]."""
        return self.o_proj(self.o_norm(o.flatten(2)))


class WindowMixer(nn.Module):
    """Sliding-window causal softmax attention with RoPE (module docstring)."""

    def __init__(self, config: HybridConfig, dtype: torch.dtype, backend: str):
        super().__init__()
        h, d = config.hidden, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, d
        self.window, self.theta, self.backend = config.window, config.rope_theta, backend
        self.q_proj = _linear(h, self.heads * d, dtype)
        self.k_proj = _linear(h, self.kv_heads * d, dtype)
        self.v_proj = _linear(h, self.kv_heads * d, dtype)
        self.o_proj = _linear(self.heads * d, h, dtype)

    def tables(self, positions, dtype):
        """RoPE's cos, sin as [1, S_loc, D/2]: tiled along the tokens like x."""
        return [t[None] for t in rope_tables(positions, self.head_dim, self.theta, dtype)]

    def project(self, x, cos, sin):
        b, t = x.shape[:2]
        q = apply_rope(self.q_proj(x).view(b, t, self.heads, self.head_dim), cos[0], sin[0])
        k = apply_rope(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim), cos[0], sin[0])
        return q, k, self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)

    def attend(self, q, k, v, group, layout):
        return seqpar.attention(q, k, v, group, backend=self.backend, layout=layout,
                                window=self.window)

    def out(self, o):
        return self.o_proj(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, config: HybridConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = _linear(config.hidden, config.intermediate, dtype)
        self.up_proj = _linear(config.hidden, config.intermediate, dtype)
        self.down_proj = _linear(config.intermediate, config.hidden, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HybridLayer(nn.Module):
    """x -> x + mix(norm(x)) -> + mlp(norm(.)), as three parts: the token-wise part before
    the attention (norm, projections, feature maps / RoPE), the attention (the only part that
    mixes tokens, and the only one with communication), and the token-wise part after it
    (output norm / projection, residual, norm, SwiGLU, residual); with `tile`, both token-wise
    parts run over tiles of that many tokens (TokenTiles: this is the tiled MLP, extended to
    every token-wise op of the layer)."""

    def __init__(self, kind: str, config: HybridConfig, dtype: torch.dtype, backend: str):
        super().__init__()
        self.kind = kind
        self.mix_norm = RMSNorm(config.hidden, config.eps, dtype)
        self.mix = (LinearMixer(config, dtype) if kind == "linear"
                    else WindowMixer(config, dtype, backend))
        self.mlp_norm = RMSNorm(config.hidden, config.eps, dtype)
        self.mlp = SwiGLU(config, dtype)

    def _before(self, x, *tables):
        return self.mix.project(self.mix_norm(x), *tables)

    def _after(self, o, x):
        x = x + self.mix.out(o)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x, group, layout, positions, tile):
        tables = self.mix.tables(positions, x.dtype)
        before = [self.mix_norm.weight, self.mix.q_proj.weight, self.mix.k_proj.weight,
                  self.mix.v_proj.weight]
        after = [p for p in self.parameters() if all(p is not b for b in before)]
        q, k, v = token_tiles(self._before, tile, [x, *tables], before)
        o = self.mix.attend(q, k, v, group, layout)
        return token_tiles(self._after, tile, [o, x], after)


class HybridLM(nn.Module):
    """The stack of the module docstring; `backend` is the softmax layers' seqpar backend; the
    weights are drawn from `seed` (the same on every rank)."""

    def __init__(self, config: HybridConfig, dtype: torch.dtype = torch.float32,
                 backend: str = "ring", seed: int | None = 0):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden, dtype=dtype)
        self.layers = nn.ModuleList(HybridLayer(kind, config, dtype, backend)
                                    for kind in config.kinds)
        self.norm = RMSNorm(config.hidden, config.eps, dtype)
        self.lm_head = _linear(config.hidden, config.vocab, dtype)
        if seed is None:  # left as constructed (e.g. on the meta device, to count parameters)
            return
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not name.endswith("norm.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.02)

    def hidden_states(self, ids_local: torch.Tensor, group=None, layout: str = "contiguous",
                      savers: Savers = Savers(),
                      after: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """ids_local [1, S_loc] (this rank's tokens, `layout`) -> final-normed hidden states
        [1, S_loc, h]. `after(i, x)` is called with the embedding's output (i = 0) and each
        layer's (i = 1 .. L): progress reports, backward hooks."""
        world = resolve_group(group).world
        positions = seqpar.positions(ids_local.shape[1] * world, group, layout)
        x = self.embed(ids_local)
        if after is not None:
            after(0, x)
        for i, layer in enumerate(self.layers):
            if savers.checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer, x, group, layout, positions, savers.token_tile,
                               use_reentrant=False)
            else:
                x = layer(x, group, layout, positions, savers.token_tile)
            if after is not None:
                after(i + 1, x)
        return self.norm(x)

    def loss(self, ids_local: torch.Tensor, labels_local: torch.Tensor, group=None,
             layout: str = "contiguous", savers: Savers = Savers(),
             after: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Mean next-token cross entropy over every labelled token of the whole sequence
        (labels_local: this rank's targets, IGNORE_INDEX for none): the same value on every
        rank, its gradient this rank's share. Computed in fp32 (fp64 for an fp64 model)."""
        hidden = self.hidden_states(ids_local, group, layout, savers, after)
        tile = savers.loss_tile or max(1, labels_local.numel())
        total = tiled_lm_loss_sum(hidden, self.lm_head.weight, None, labels_local, tile)
        info = resolve_group(group)
        counted = torch.stack([total.detach().double(),
                               (labels_local != IGNORE_INDEX).sum().double()])
        if info.world > 1:
            dist.all_reduce(counted, group=info.group)
        count = counted[1].clamp(min=1)
        value = (counted[0] / count).to(total.dtype)
        return value + (total - total.detach()) / count.to(total.dtype)


def batch(seq: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [1, S] and their next-token labels [1, S] (the last one IGNORE_INDEX)."""
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def shard_batch(ids: torch.Tensor, labels: torch.Tensor, group=None, layout: str = "contiguous"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens and labels (labels were shifted over the whole sequence first)."""
    return (seqpar.shard(ids, group, dim=1, layout=layout),
            seqpar.shard(labels, group, dim=1, layout=layout))


__all__ = ["HybridConfig", "HybridLM", "Savers", "batch", "shard_batch", "rope_tables",
           "apply_rope"]
