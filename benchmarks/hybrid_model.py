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
  * mlp_tile: the MLP runs over tiles of that many tokens with DeepSpeed's TiledMLP (as
    `hf.enable_memory_savers` does): one tile's [tile, intermediate] activations at a time.
  * loss_tile: lm_head + cross entropy over tiles of that many tokens (`tiled_loss`), one tile's
    logits at a time, recomputed per tile in the backward.

`HybridLM.loss(ids_local, labels_local, group, layout)` returns the global mean on every rank,
its gradient this rank's share (as `hf.loss`): after backward, `hf.sync_grads(model, group)`
makes every rank's gradients the single-process ones.
"""

from __future__ import annotations

import math
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
    mlp_tile: int | None = None         # tokens per MLP tile; None: untiled
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

    def forward(self, x, group, layout, positions):
        shape = (*x.shape[:2], self.heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)
        k = F.silu(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        o = seqpar.linear_attention(q, k, v, group, decay=self.log_decay, layout=layout)
        return self.o_proj(self.o_norm(o.reshape(*x.shape[:2], -1)))


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

    def forward(self, x, group, layout, positions):
        b, s = x.shape[:2]
        cos, sin = rope_tables(positions, self.head_dim, self.theta, x.dtype)
        q = apply_rope(self.q_proj(x).view(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        o = seqpar.attention(q, k, v, group, backend=self.backend, layout=layout,
                             window=self.window)
        return self.o_proj(o.reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: HybridConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = _linear(config.hidden, config.intermediate, dtype)
        self.up_proj = _linear(config.hidden, config.intermediate, dtype)
        self.down_proj = _linear(config.intermediate, config.hidden, dtype)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor, tile: int | None) -> torch.Tensor:
        tiles = 1 if tile is None else math.ceil(x.shape[-2] / tile)
        if tiles <= 1 or not torch.is_grad_enabled():
            return self.untiled(x)
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        return TiledMLP.apply(lambda module, t: module.untiled(t), self, x, tiles,
                              list(self.parameters()))


class HybridLayer(nn.Module):
    def __init__(self, kind: str, config: HybridConfig, dtype: torch.dtype, backend: str):
        super().__init__()
        self.kind = kind
        self.mix_norm = RMSNorm(config.hidden, config.eps, dtype)
        self.mix = (LinearMixer(config, dtype) if kind == "linear"
                    else WindowMixer(config, dtype, backend))
        self.mlp_norm = RMSNorm(config.hidden, config.eps, dtype)
        self.mlp = SwiGLU(config, dtype)

    def forward(self, x, group, layout, positions, mlp_tile):
        x = x + self.mix(self.mix_norm(x), group, layout, positions)
        return x + self.mlp(self.mlp_norm(x), mlp_tile)


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
                x = checkpoint(layer, x, group, layout, positions, savers.mlp_tile,
                               use_reentrant=False)
            else:
                x = layer(x, group, layout, positions, savers.mlp_tile)
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
