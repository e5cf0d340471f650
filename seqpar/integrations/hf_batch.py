"""Packed and padded batches for the transformers integration: documents into one sharded row.

`hf.shard_batch` hands a batch here when it is not one plain sequence per row:

* packed documents -- `position_ids` that restart (transformers' DataCollatorWithFlattening:
  B == 1, positions 0, 1, ... per document, labels -100 at each document's first token);
* padded rows -- an `attention_mask` with zeros at the start (left padding) or the end (right
  padding) of a row, B >= 1;
* both at once (padded rows of packed documents).

A *document* is a maximal run of real (mask 1) tokens of one row whose positions step by one
(transformers' own packed-sequence rule: a new sequence starts wherever position_ids[t] !=
position_ids[t-1] + 1). The real tokens of every row, in row-major order, become one sequence
of N tokens; its document boundaries are `cu_seqlens` = [0, c_1, ..., N] (GLOBAL positions,
the same on every rank). When the layout needs a longer sequence (a multiple of
chunks_per_rank x P), a *filler* of F < chunks_per_rank x P tokens is appended as one more
document: token id 0, no label, positions 0 .. F-1. Being its own document, no real token sees
it; it only sees itself. No pad token is computed on, and no document is padded.

Targets are transformers' own: in each row of the caller's batch, token t's target is
labels[b, t + 1] (-100 after the row's last token) -- as `model(..., labels=)` shifts them --
taken for the real tokens only. A pad position's own target (a prediction made *from* padding,
which transformers would count if its label is not -100) is not trained; give pads and, with
left padding, the row's first real token the label -100 to get transformers' exact loss.

Positions (RoPE): each real token keeps the position transformers would give it -- the given
`position_ids` (a packed document counts from 0), else its column in the row (transformers'
default for `model(input_ids, attention_mask)`, so a left-padded row's first real token sits at
the number of pads); the filler counts from 0. Within a document positions step by one, so they
are the document's own positions up to one shift per document, which RoPE cannot see (it
depends only on the difference of two positions), and keeping transformers' values makes the
rotation -- computed in fp32 by transformers -- the same numbers as in its own run.

`Packing` remembers where each packed token came from, so `hf.unshard` can put per-token
outputs back at [b, t] of the caller's [B, S] batch (zeros at pad positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import chunks_per_rank

IGNORE_INDEX = -100
FILLER_TOKEN = 0  # any id the embedding has; the filler's outputs are never used


@dataclass(frozen=True, eq=False)
class Packing:
    """How a padded / packed [B, S] batch became one row of `length` tokens.

    source: int64 [n_real]: flat index b * S + t (in the caller's batch) of packed token i;
            the packed tokens n_real .. length - 1 are the filler.
    cu_seqlens: int64 [n_docs + 1]: global document boundaries of the packed row (the filler,
            when there is one, is the last document)."""

    batch_shape: tuple[int, int]
    source: torch.Tensor
    cu_seqlens: torch.Tensor
    length: int

    @property
    def n_real(self) -> int:
        return self.source.numel()


def packing_needed(mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> bool:
    """True when the batch is not plain rows: padding (mask zeros) or restarting positions."""
    if mask is not None and not bool((mask != 0).all()):
        return True
    if position_ids is not None and position_ids.shape[1] > 1:
        return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())
    return False


def check_mask_and_positions(ids: torch.Tensor, mask: torch.Tensor | None,
                             position_ids: torch.Tensor | None) -> Exception | None:
    """Why `attention_mask` / `position_ids` cannot be packed (shapes are already checked)."""
    if position_ids is not None and position_ids.is_floating_point():
        return TypeError(f"batch['position_ids'] must be an integer tensor, got "
                         f"{position_ids.dtype}")
    if mask is None:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        return ValueError("batch['attention_mask'] must hold only 0 (padding) and 1 (real "
                          "token); a 4-D or weighted mask cannot be sharded -- pass the 2-D "
                          "padding mask the tokenizer returns")
    real = mask != 0
    # left or right padding: the real tokens of a row are one contiguous run
    steps = (real[:, 1:] != real[:, :-1]).sum(dim=1)
    gapped = ((steps > 2) | ((steps == 2) & real[:, 0])).nonzero().flatten()
    if gapped.numel():
        row = int(gapped[0])
        return ValueError(f"batch['attention_mask'] row {row} has padding between real tokens "
                          f"({real[row].int().tolist()}); only left or right padding is "
                          f"supported (one run of real tokens per row)")
    if not bool(real.any()):
        return ValueError("batch['attention_mask'] is all zeros: the batch has no real token")
    return None


def pack(ids: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None,
         position_ids: torch.Tensor | None, unit: int
         ) -> tuple[dict[str, torch.Tensor], Packing]:
    """The packed row (input_ids, position_ids, shift_labels as [1, length]) and its `Packing`;
    `length` = N rounded up to a multiple of `unit` (module docstring)."""
    batch, seq = ids.shape
    device = ids.device
    real = (mask != 0) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    start = real.clone()
    start[:, 1:] &= ~real[:, :-1]                       # first real token after padding / row start
    if position_ids is not None:
        restart = torch.zeros_like(real)
        restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        start |= real & restart
    flat_real = real.flatten()
    source = flat_real.nonzero().flatten()              # row-major order
    n_real = source.numel()
    doc_start = start.flatten()[source].nonzero().flatten()
    length = -(-n_real // unit) * unit
    bounds = doc_start.tolist() + [n_real] + ([length] if length > n_real else [])
    cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=device)

    filler = length - n_real
    # transformers' own positions of the real tokens: the given ones, else the column index
    # (what model(input_ids, attention_mask) uses); the filler counts from 0
    given = position_ids if position_ids is not None else \
        torch.arange(seq, device=device).expand(batch, seq)
    packed_positions = torch.cat([given.flatten()[source].to(torch.int64),
                                  torch.arange(filler, device=device)])
    packed_ids = torch.cat([ids.flatten()[source], ids.new_full((filler,), FILLER_TOKEN)])
    out = {"input_ids": packed_ids[None], "position_ids": packed_positions[None]}
    if labels is not None:
        shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1)
        out["shift_labels"] = torch.cat([shifted.flatten()[source],
                                         labels.new_full((filler,), IGNORE_INDEX)])[None]
    return out, Packing((batch, seq), source, cu_seqlens, length)


def unpack(full: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[1, length, ...] packed per-token values -> [B, S, ...] at the caller's positions (zeros
    at pad positions). Differentiable (index_copy)."""
    batch, seq = packing.batch_shape
    rest = full.shape[2:]
    values = full[0, :packing.n_real]
    out = full.new_zeros((batch * seq, *rest))
    return out.index_copy(0, packing.source.to(full.device), values).view(batch, seq, *rest)


def layout_unit(world: int, layout: str) -> int:
    """What the packed length must be a multiple of."""
    return chunks_per_rank(layout) * world


__all__ = ["Packing", "pack", "unpack", "packing_needed", "check_mask_and_positions",
           "layout_unit"]
