"""Memory savers beyond attention for a transformers causal LM, switched on by one call:

    hf.enable_memory_savers(model, tiled_mlp=True, checkpoint=True, offload=False)

* tiled MLP: each decoder layer's `mlp` runs over tiles of the sequence, forward under no_grad,
  backward recomputing one tile at a time, so its [tokens, intermediate] activations exist for
  one tile only (and none are kept between forward and backward). This is DeepSpeed's
  `TiledMLP` (deepspeed.runtime.sequence_parallel.ulysses_sp, ALST), used as is: it runs on
  CPU and on CUDA, and its gradients equal the untiled ones up to summation order (tests). The
  tile count defaults to ALST's rule, ceil(tokens / hidden_size), so a tile's intermediate is
  at most about hidden_size x intermediate_size elements. It is installed as an instance
  attribute `mlp.forward` (the class and the parameter names stay untouched).
* checkpointing of decoder layers: transformers' own `activation_checkpointing_enable`
  (torch.utils.checkpoint, non-reentrant, every decoder layer): a layer keeps only its input
  between forward and backward and recomputes the rest in the backward. Like every transformers
  checkpointing, it acts in training mode (`model.train()`); seqpar's attention runs again in
  the recompute, with its collectives, on every rank in the same order.
* offload (CUDA only, with checkpoint): transformers' `offload=True`, which moves what the
  checkpoints save to pinned host memory (torch.autograd.graph.save_on_cpu) and back in the
  backward. On a CPU model there is nothing to move, and it is refused.

The sequence-tiled loss is not switched on here: it replaces the call that computes the loss,
`hf.lm_loss(model, local_batch, group)` (`tiled_loss`).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemorySavers:
    """What `enable_memory_savers` switched on."""

    tiled_mlp_layers: int
    mlp_tiles: int | None        # None: ceil(tokens / hidden_size) per call
    checkpoint: bool
    offload: bool


def _tiled_mlp_class():
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    except ImportError as error:  # pragma: no cover - deepspeed is a dev dependency
        raise ImportError("tiled_mlp=True uses DeepSpeed's TiledMLP: install deepspeed "
                          "(pip install 'seqpar[dev]'), or pass tiled_mlp=False") from error
    return TiledMLP


def _mlp_forward(tiled_mlp, tiles: int | None, hidden_size: int):
    """The forward installed on one MLP instance: its class's own forward, tiled along dim -2
    (the sequence of [B, S, H], or the tokens of [N, H])."""

    def untiled(module, x):
        return type(module).forward(module, x)

    def forward(self, x):
        count = tiles if tiles is not None else max(1, math.ceil(x.shape[-2] / hidden_size))
        count = min(count, x.shape[-2])
        if count <= 1 or not torch.is_grad_enabled():
            return untiled(self, x)  # one tile, or no backward to save memory for
        return tiled_mlp.apply(untiled, self, x, count, list(self.parameters()))

    return forward


def _decoder_mlps(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.mlp for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and isinstance(getattr(m, "mlp", None),
                                                                       torch.nn.Module)]


def enable_memory_savers(model, tiled_mlp: bool = True, checkpoint: bool = True,
                         offload: bool = False, mlp_tiles: int | None = None) -> MemorySavers:
    """Switch on the savers of the module docstring for `model` (a transformers PreTrainedModel);
    every result and gradient stays that of the plain model (up to summation order)."""
    if mlp_tiles is not None and (not isinstance(mlp_tiles, int) or isinstance(mlp_tiles, bool)
                                  or mlp_tiles < 1):
        raise ValueError(f"enable_memory_savers: mlp_tiles must be None (ceil(tokens / "
                         f"hidden_size)) or an int >= 1, got {mlp_tiles!r}")
    if offload and not checkpoint:
        raise ValueError("enable_memory_savers: offload=True moves what the layer checkpoints "
                         "save; it needs checkpoint=True")
    device = next(model.parameters()).device
    if offload and device.type == "cpu":
        raise ValueError("enable_memory_savers: offload=True moves saved activations from the "
                         "accelerator to host memory, but the model is on cpu already; pass "
                         "offload=False")
    mlps = []
    if tiled_mlp:
        mlps = _decoder_mlps(model)
        if not mlps:
            raise ValueError(f"enable_memory_savers: {type(model).__name__} has no decoder "
                             f"layer with an `mlp` module to tile; pass tiled_mlp=False")
        forward = _mlp_forward(_tiled_mlp_class(), mlp_tiles, model.config.get_text_config()
                               .hidden_size)
        for mlp in mlps:
            mlp.forward = types.MethodType(forward, mlp)
    if checkpoint:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"enable_memory_savers: {type(model).__name__} does not support "
                             f"activation checkpointing in transformers; pass checkpoint=False")
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    return MemorySavers(len(mlps), mlp_tiles, checkpoint, offload)


def disable_memory_savers(model) -> None:
    """Undo `enable_memory_savers`: plain MLP forwards, no checkpointing."""
    for mlp in _decoder_mlps(model):
        mlp.__dict__.pop("forward", None)
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()


__all__ = ["enable_memory_savers", "disable_memory_savers", "MemorySavers"]
