"""Packed documents (`cu_seqlens`): validation at the API edge, shared by every entry point.

cu_seqlens (DESIGN §2 "Masks") is a 1-D integer tensor [n_docs + 1] of GLOBAL document
boundaries of one packed sequence, 0 = c[0] < c[1] < ... < c[-1] = S, identical on every rank;
it needs batch size 1. `check_cu_seqlens` is this rank's verdict (an exception to raise, or
None); `cu_seqlens_agreement` gives the integers every rank must share for
`comm.primitives.agree`, so boundaries that differ between ranks raise on every rank instead of
silently computing different masks.
"""

from __future__ import annotations

import torch

# A large prime for the boundary fingerprint; values stay below 2^61, so `agree` can negate them.
_FINGERPRINT_MODULUS = (1 << 61) - 1


def check_cu_seqlens(cu_seqlens, seq_len: int, batch: int) -> Exception | None:
    """None, or the error for cu_seqlens of a global sequence of `seq_len` tokens and `batch`
    rows: an integer tensor, 1-D, at least one document, 0 first, seq_len last, strictly
    increasing (every document holds at least one token), batch == 1."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        return TypeError(f"cu_seqlens must be None or a 1-D integer torch.Tensor of global "
                         f"document boundaries [n_docs + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        return TypeError(f"cu_seqlens.dtype={cu_seqlens.dtype} is not supported; pass the document "
                         f"boundaries as torch.int32 or torch.int64")
    if cu_seqlens.dim() != 1:
        return ValueError(f"cu_seqlens must be 1-D [n_docs + 1] (the boundaries of ONE packed "
                          f"sequence), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        return ValueError(f"cu_seqlens must hold at least [0, S] (one document), got "
                          f"{cu_seqlens.tolist()}")
    if batch != 1:
        return ValueError(f"cu_seqlens packs documents into one sequence, which needs batch "
                          f"size 1, got batch size {batch}; concatenate the rows into one packed "
                          f"sequence and shift their boundaries")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        return ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={bounds[0]}; the first "
                          f"document starts at the first token of the global sequence")
    if bounds[-1] != seq_len:
        return ValueError(f"cu_seqlens must end at the global sequence length S = {seq_len} "
                          f"(local length x group size), got cu_seqlens[-1]={bounds[-1]}; pass "
                          f"the GLOBAL boundaries, identical on every rank")
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            return ValueError(f"cu_seqlens must be strictly increasing (every document holds at "
                              f"least one token), got cu_seqlens[{i}]={bounds[i]} <= "
                              f"cu_seqlens[{i - 1}]={bounds[i - 1]}")
    return None


def cu_seqlens_agreement(cu_seqlens, ok: bool) -> dict[str, int]:
    """The integers every rank must share about cu_seqlens (placeholders when this rank's
    arguments are bad: its own error is raised instead)."""
    present = cu_seqlens is not None
    fingerprint, count = 0, 0
    well_formed = (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1
                   and not (cu_seqlens.is_floating_point() or cu_seqlens.is_complex()))
    if ok and present and well_formed:
        bounds = cu_seqlens.tolist()
        count = len(bounds) - 1
        for b in bounds:
            fingerprint = (fingerprint * 1_000_003 + b + 1) % _FINGERPRINT_MODULUS
    return {"cu_seqlens (None or a tensor)": int(present),
            "number of documents in cu_seqlens": count,
            "cu_seqlens boundaries (fingerprint)": fingerprint}


__all__ = ["check_cu_seqlens", "cu_seqlens_agreement"]
