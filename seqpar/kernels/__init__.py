"""Local (single-device) attention compute. Knows nothing about communication."""

from .dispatch import (KERNELS, LINEAR_KERNELS, select_kernel, select_linear_kernel, use_kernel,
                       use_linear_kernel)
from .linear_chunked import ChunkedLinearKernel
from .linear_state import LinearKernel
from .mask import MaskKind, Run, Runs, SubBlock, plan_blocks, runs_to_positions
from .merge import merge, merge_into
from .reference import attention_reference, linear_attention_reference

__all__ = [
    "KERNELS", "select_kernel", "use_kernel",
    "LINEAR_KERNELS", "select_linear_kernel", "use_linear_kernel", "LinearKernel",
    "ChunkedLinearKernel",
    "MaskKind", "Run", "Runs", "SubBlock", "plan_blocks", "runs_to_positions",
    "merge", "merge_into",
    "attention_reference", "linear_attention_reference",
]
