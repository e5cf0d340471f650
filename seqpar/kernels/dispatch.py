"""Pick the local kernel for a (device, dtype).

Softmax blocks: CPU -> the fused CPU flash op (`torch_cpu.TorchBlockKernel(flash=True)`); CUDA
with fp16/bf16/fp32 -> the Triton flash kernels (`flash.TritonBlockKernel`, imported only then:
triton is optional); anything else (fp64 on CUDA, no triton) -> the chunked PyTorch path. Linear attention: CUDA with fp16/bf16/fp32 and head dims
up to 128 -> the Triton Lightning kernel (`lightning.LightningKernel`, imported only then: triton
is optional); otherwise -> the chunked PyTorch kernel (`linear_chunked.ChunkedLinearKernel`).

A path can be forced for comparisons with the `use_kernel(...)` / `use_linear_kernel(...)`
context managers (context variables, not environment switches); backends resolve the kernel
once in forward and keep it for backward, so the choice made at forward time holds even when
autograd runs backward on another thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from .linear_chunked import ChunkedLinearKernel
from .linear_state import LinearKernel
from .plan import PlanKernel
from .torch_cpu import TorchBlockKernel

KERNELS = {
    "flash": TorchBlockKernel(flash=True, name="flash"),
    "chunked": TorchBlockKernel(flash=False, name="chunked"),
}
SOFTMAX_KERNELS = ("flash", "chunked", "triton")  # "triton" is loaded on first use
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("seqpar_forced_kernel",
                                                                     default=None)


@contextlib.contextmanager
def _forcing(choice: contextvars.ContextVar, name: str, known: tuple[str, ...], where: str
             ) -> Iterator[None]:
    if name not in known:
        raise ValueError(f"{where}: unknown kernel {name!r}; choose one of {list(known)}")
    token = choice.set(name)
    try:
        yield
    finally:
        choice.reset(token)


def use_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Force the local softmax kernel inside the block: one of `SOFTMAX_KERNELS` ("triton" off
    CUDA needs TRITON_INTERPRET=1 set before seqpar.kernels.flash is imported)."""
    return _forcing(_forced, name, SOFTMAX_KERNELS, "use_kernel")


def softmax_kernel(name: str) -> PlanKernel:
    if name == "triton":
        from .flash import TritonBlockKernel
        return TritonBlockKernel()
    return KERNELS[name]


def select_kernel(device: torch.device, dtype: torch.dtype) -> PlanKernel:
    forced = _forced.get()
    if forced is not None:
        return softmax_kernel(forced)
    if device.type == "cpu":
        return KERNELS["flash"]
    if device.type == "cuda" and dtype in TRITON_DTYPES:
        try:
            return softmax_kernel("triton")
        except ImportError:  # triton is an optional dependency; the chunked path is exact too
            pass
    return KERNELS["chunked"]


LINEAR_KERNELS = ("chunked", "lightning")
LIGHTNING_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton kernel holds a [Dk, Dv] fp32 state and a block's tiles in one SM's shared memory.
LIGHTNING_MAX_HEAD_DIM = 128

_forced_linear: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "seqpar_forced_linear_kernel", default=None)


def use_linear_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Force the local linear-attention kernel inside the block: one of `LINEAR_KERNELS`
    ("lightning" off CUDA needs TRITON_INTERPRET=1 set before seqpar.kernels.lightning is
    imported)."""
    return _forcing(_forced_linear, name, LINEAR_KERNELS, "use_linear_kernel")


def _lightning() -> LinearKernel:
    from .lightning import LightningKernel
    return LightningKernel()


def select_linear_kernel(device: torch.device, dtype: torch.dtype, head_dim: int = 0
                         ) -> LinearKernel:
    """head_dim: the larger of Dk and Dv (the Triton kernel holds a Dk x Dv state on chip)."""
    forced = _forced_linear.get()
    if forced is not None:
        return _lightning() if forced == "lightning" else ChunkedLinearKernel()
    if device.type == "cuda" and dtype in LIGHTNING_DTYPES and head_dim <= LIGHTNING_MAX_HEAD_DIM:
        try:
            return _lightning()
        except ImportError:  # triton is an optional dependency; the chunked path is exact too
            pass
    return ChunkedLinearKernel()
