"""hf.shard_batch with packed and padded batches, and hf.unshard: what each rank gets (the
documents, within-document positions, the filler, the targets), that unshard puts every token
back where the caller had it, and that misuse is refused on every rank. The models' numbers
are tests/test_hf_zoo.py's."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from seqpar.integrations import hf
from tests import zoo
from tests.checks import raised


def packed_view(layout: str) -> dict:
    data = zoo.packed_batch()
    local = hf.shard_batch(data, None, layout)
    full = {name: hf.unshard(local[name][..., None].double(), local)[..., 0]
            for name in ("input_ids", "position_ids", "shift_labels")}
    return {"local": {k: v.tolist() for k, v in local.items()},
            "full": {k: v.long().tolist() for k, v in full.items()}}


@pytest.mark.parametrize("layout", ["zigzag", "striped", "balanced"])
def test_packed_documents(worlds, layout):
    """4 ranks, documents 5 + 3 + 7 + 4 = 19 tokens and a filler document to what the layout
    needs (zigzag 8 | S: 24, striped 4 | S: 20, balanced 16 | S: 32); positions restart per document; targets are the next token
    of the same document (-100 at document ends, as the collator's labels make them)."""
    data = zoo.packed_batch()
    ids, pos = data["input_ids"][0].tolist(), data["position_ids"][0].tolist()
    for view in worlds(4).run(packed_view, layout):
        length = {"zigzag": 24, "striped": 20, "balanced": 32}[layout]
        assert view["local"]["seqpar_cu_seqlens"] == [0, 5, 8, 15, 19, length]
        assert len(view["local"]["input_ids"][0]) == length // 4
        assert view["full"]["input_ids"] == [ids]
        assert view["full"]["position_ids"] == [pos]
        targets = [ids[t + 1] if t + 1 < len(ids) and pos[t + 1] != 0 else -100
                   for t in range(len(ids))]
        assert view["full"]["shift_labels"] == [targets]


def padded_view() -> dict:
    data = zoo.padded_batch()
    local = hf.shard_batch(data, None, "zigzag")
    back = hf.unshard(local["input_ids"][..., None].double(), local)[..., 0].long()
    return {"cu": local["seqpar_cu_seqlens"].tolist(), "back": back.tolist(),
            "length": local["input_ids"].shape[1]}


def test_padded_rows(worlds):
    """Rows of 7 (right padding), 9 (left) and 12 real tokens: 28 tokens, no pad computed on,
    a filler of 4 to 32 (zigzag over 4 ranks); unshard gives [3, 12] with zeros at the pads."""
    data = zoo.padded_batch()
    for view in worlds(4).run(padded_view):
        assert view["cu"] == [0, 7, 16, 28, 32]
        assert view["length"] == 8
        assert view["back"] == (data["input_ids"] * data["attention_mask"]).tolist()


def misuse(case: str) -> tuple[str, str]:
    model = zoo.build("llama")
    hf.apply(model)
    data = zoo.packed_batch()
    local = hf.shard_batch(data)
    if case == "packed without its documents":
        return raised(model, input_ids=local["input_ids"], position_ids=local["position_ids"])
    if case == "no real token":
        padded = zoo.padded_batch()
        return raised(hf.shard_batch, {**padded, "attention_mask": 0 * padded["attention_mask"]})
    if case == "unshard a plain dict":
        return raised(hf.unshard, local["input_ids"][..., None].double(), dict(local))
    if case == "unshard the wrong shape":
        return raised(hf.unshard, torch.zeros(1, 3, 2), local)
    raise AssertionError(case)


@pytest.mark.parametrize("case, kind, pattern", [
    ("packed without its documents", "ValueError",
     r"position_ids are not this rank's global token positions .*needs its seqpar_cu_seqlens"),
    ("no real token", "ValueError", r"attention_mask'\] is all zeros"),
    ("unshard a plain dict", "TypeError", r"hf.unshard: local_batch must be the object "
                                          r"hf.shard_batch returned"),
    ("unshard the wrong shape", "ValueError", r"hf.unshard: local must be a tensor"),
])
def test_misuse_is_refused_on_every_rank(worlds, case, kind, pattern):
    results = worlds(2).run(misuse, case, timeout=60)
    for rank, (got, message) in enumerate(results):
        assert got == kind and re.search(pattern, message), (rank, got, message)
