"""Comparison helpers shared by the correctness tests (they run inside the ranks)."""

from __future__ import annotations

import torch


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
