"""Local (single-device) attention compute. Knows nothing about communication."""

from .dispatch import KERNELS, select_kernel, use_kernel
from .mask import MaskKind, Run, Runs, SubBlock, plan_blocks, runs_to_positions
from .merge import merge, merge_into
from .reference import attention_reference, linear_attention_reference

__all__ = [
    "KERNELS", "select_kernel", "use_kernel",
    "MaskKind", "Run", "Runs", "SubBlock", "plan_blocks", "runs_to_positions",
    "merge", "merge_into",
    "attention_reference", "linear_attention_reference",
]
