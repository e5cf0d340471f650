"""Comparison helpers shared by the correctness tests (they run inside the ranks)."""

from __future__ import annotations

import torch


def raised(fn, *args, **kwargs) -> tuple[str, str]:
    """(exception type name, message) of calling fn, or ("nothing raised", "")."""
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return type(error).__name__, str(error)
    return "nothing raised", ""


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| over finite expected entries; -inf must match -inf exactly."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    if not torch.equal(torch.isfinite(actual), finite) or not torch.equal(actual[~finite], expected[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    return (actual[finite] - expected[finite]).abs().max().item()


def magnitude(expected: torch.Tensor) -> float:
    finite = expected.detach()[torch.isfinite(expected.detach())]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float,
                 context: str = "") -> float:
    """Assert max error <= rel * max(1, max|expected|); return the error for reporting."""
    err = max_error(actual, expected)
    bound = rel * magnitude(expected)
    if not err <= bound:
        raise AssertionError(f"{context} {name}: max error {err:.3e} > bound {bound:.3e} "
                             f"(rel {rel:.1e})")
    return err


def s2_rule_blocks(pattern, num_blocks: int, kv_heads, heads_q: int) -> torch.Tensor:
    """bool [len(kv_heads), nb, nb] written from DESIGN §4's S2 rule, independently of
    `seqpar.kernels.s2`: query block i may attend key block j <= i iff i - j < local_blocks or
    (j + h * step + head_offset) % vert_stride == 0, step = max(1, vert_stride // Hq), h the
    GLOBAL kv head (0 for every head when homogeneous)."""
    step = max(1, pattern.vert_stride // heads_q)
    mask = torch.zeros(len(kv_heads), num_blocks, num_blocks, dtype=torch.bool)
    for n, head in enumerate(kv_heads):
        h = head if pattern.heterogeneous else 0
        for i in range(num_blocks):
            for j in range(i + 1):
                mask[n, i, j] = (i - j < pattern.local_blocks
                                 or (j + h * step + pattern.head_offset) % pattern.vert_stride == 0)
    return mask


def s2_rule_token_mask(pattern, seq_len: int, heads_q: int, heads_kv: int) -> torch.Tensor:
    """[1, Hq, S, S]: `s2_rule_blocks` over every global head, block by block (query head h
    uses kv head h // (Hq / Hkv))."""
    blocks = s2_rule_blocks(pattern, seq_len // pattern.block_size, range(heads_kv), heads_q)
    size = pattern.block_size
    return (blocks.repeat_interleave(size, 1).repeat_interleave(size, 2)
            .repeat_interleave(heads_q // heads_kv, 0))[None]
