"""Pick the local block kernel for a (device, dtype).

Today: CPU -> the fused CPU flash op (`torch_cpu.TorchBlockKernel(flash=True)`); any other
device -> the chunked PyTorch path. A path can be forced for comparisons with the
`use_kernel(...)` context manager (a context variable, not an environment switch); backends
resolve the kernel once in forward and keep it for backward, so the choice made at forward
time holds even when autograd runs backward on another thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from .torch_cpu import TorchBlockKernel

KERNELS = {
    "flash": TorchBlockKernel(flash=True, name="flash"),
    "chunked": TorchBlockKernel(flash=False, name="chunked"),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("seqpar_forced_kernel",
                                                                     default=None)


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force the local kernel inside the block: one of `KERNELS`."""
    if name not in KERNELS:
        raise ValueError(f"use_kernel: unknown kernel {name!r}; choose one of {sorted(KERNELS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select_kernel(device: torch.device, dtype: torch.dtype) -> TorchBlockKernel:
    forced = _forced.get()
    if forced is not None:
        return KERNELS[forced]
    return KERNELS["flash"] if device.type == "cpu" else KERNELS["chunked"]
