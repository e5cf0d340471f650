"""The model zoo: tiny random-init models of twelve transformers families (tests/zoo.py) run
sequence-parallel through `hf.apply` / `shard_batch` / `loss` / `sync_grads` / `unshard` equal
one process, for plain, packed and padded batches:

* plain -- transformers' own model (eager attention) on the whole batch;
* packed (DataCollatorWithFlattening: positions restart, -100 at document starts) -- the sum of
  each document run alone, divided by the batch's labelled-token count;
* padded (left and right padding) -- transformers' own run with the attention_mask.

Compared: the loss (identical on every rank), every parameter gradient after sync_grads (the
sum of the ranks' shares), and the per-token logits mapped back by `unshard` (real tokens).
fp64, 1e-6 relative to max(1, max|expected|): the models are the same layers, only attention
is computed in pieces and merged (fp64 rounding of a few hundred-term sums is ~1e-13; RoPE of
left-padded rows sees positions shifted by the padding, which only rotates both q and k by the
same extra angle -- also rounding). gpt-oss runs in fp32 (tests/zoo.py: its experts have no
fp64 matmul on CPU): 2e-5 relative, 100x fp32's epsilon -- rounding of the same sums, of the
softmax over 4+1 logits with sinks and of the gradient sums over ranks in another order; still
far below the effect of a lost window, cap, sink or document boundary (~1e-1, see
`test_a_wrong_mask_is_caught`).

The grid covers every family x batch kind once, each of ring, ulysses, usp, allgather and
tokenring several times on both 2 and 4 ranks, with every layout (a full product is
`python -m tests.test_hf_zoo`, which prints the family x backend table).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.integrations import hf
from seqpar.layout import LAYOUTS
from tests import zoo
from tests.checks import assert_close, magnitude, max_error
from tests.test_mesh import mesh

KINDS = ("plain", "packed", "padded")
BACKENDS = ("ring", "ulysses", "usp", "allgather", "tokenring")
FP64_REL, FP32_REL = 1e-6, 2e-5


def tolerance(family: str) -> float:
    return FP32_REL if zoo.dtype_of(family) == torch.float32 else FP64_REL


def batch_of(kind: str) -> dict[str, torch.Tensor]:
    return {"plain": zoo.plain_batch, "packed": zoo.packed_batch, "padded": zoo.padded_batch}[kind]()


def token_loss_sum(logits: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100,
                           reduction="sum")


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def single_process(family: str, kind: str, **overrides):
    """(loss, gradients, logits [B, S, V] of the real tokens -- zeros at pads) on one process."""
    model = zoo.build(family)
    for name, value in overrides.items():
        setattr(model.config, name, value)
        for layer in model.model.layers:
            if hasattr(layer.self_attn, name):
                setattr(layer.self_attn, name, value)
    data = batch_of(kind)
    ids, labels = data["input_ids"], data["labels"]
    if kind == "packed":  # each document alone
        pieces = [model(input_ids=ids[:, a:b]).logits for a, b in zoo.documents()]
        losses = [token_loss_sum(p, shifted(labels[:, a:b]))
                  for p, (a, b) in zip(pieces, zoo.documents())]
        logits, total = torch.cat(pieces, dim=1), sum(losses)
        count = sum(int((shifted(labels[:, a:b]) != -100).sum()) for a, b in zoo.documents())
    elif kind == "padded" and zoo.reference_attention(family) == "eager" \
            and zoo.dtype_of(family) == torch.float64:
        # transformers' fp64 eager attention turns a left-padded row into NaN (a pad query sees
        # no key: its fp32 softmax of -1.8e308 + ... is -inf everywhere); the masked run's
        # meaning is each row's real tokens alone, so that is the reference here
        mask = data["attention_mask"]
        logits = torch.zeros(*ids.shape, zoo.VOCAB, dtype=zoo.dtype_of(family))
        total, count = 0.0, int((shifted(labels) != -100).sum())
        for row in range(ids.shape[0]):
            real = mask[row].nonzero().flatten()
            piece = model(input_ids=ids[row:row + 1, real]).logits
            logits = logits.index_put((torch.full_like(real, row), real), piece[0])
            total = total + token_loss_sum(piece, shifted(labels[row:row + 1])[:, real])
    else:
        logits = model(input_ids=ids, attention_mask=data.get("attention_mask")).logits
        total, count = token_loss_sum(logits, shifted(labels)), int((shifted(labels) != -100).sum())
        if "attention_mask" in data:
            logits = logits * data["attention_mask"][..., None]
    loss = total / count
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], logits.detach()


def sequence_parallel(family: str, kind: str, backend: str, layout: str):
    group = mesh(2) if backend == "usp" else None
    model = zoo.build(family)
    hf.apply(model, group, backend=backend, layout=layout)
    local = hf.shard_batch(batch_of(kind), group, layout=layout)
    logits = model(**local).logits
    loss = hf.loss(logits, local, group)
    loss.backward()
    hf.sync_grads(model, group)
    full = hf.unshard(logits.detach(), local)
    return loss.detach(), [p.grad for p in model.parameters()], full


def relative(actual, expected) -> float:
    return max_error(actual, expected) / magnitude(expected)


def check_case(family: str, kind: str, backend: str, layout: str) -> dict[str, float]:
    """Every comparison of one case (asserting its tolerance); returns the relative errors."""
    context = f"rank {dist.get_rank()} {family}/{kind}/{backend}/{layout}:"
    loss, grads, logits = sequence_parallel(family, kind, backend, layout)
    ref_loss, ref_grads, ref_logits = single_process(family, kind)
    rel = tolerance(family)
    assert_close("loss", loss, ref_loss, rel, context)
    assert_close("logits", logits, ref_logits, rel, context)
    assert len(grads) == len(ref_grads)
    for i, (g, e) in enumerate(zip(grads, ref_grads)):
        assert g is not None and e is not None, f"{context} gradient {i} missing"
        assert_close(f"gradient {i}", g, e, rel, context)
    return {"loss": relative(loss, ref_loss), "logits": relative(logits, ref_logits),
            "gradients": max(relative(g, e) for g, e in zip(grads, ref_grads)),
            "loss value": loss.item()}


def grid() -> list[tuple[int, str, str, str, str]]:
    """(P, family, kind, backend, layout): every family x kind once; the index f + k walks the
    backends (mod 5) and the group sizes (mod 2) together, so each backend meets P = 2 and 4;
    plus two packed / padded runs in layout="balanced"."""
    cases = []
    for f, family in enumerate(zoo.FAMILIES):
        for k, kind in enumerate(KINDS):
            step = f + k
            cases.append((2 if step % 2 == 0 else 4, family, kind, BACKENDS[step % 5],
                          LAYOUTS[(f + 2 * k) % 3]))
    # layout="balanced" (packed documents dealt by their work) on two families and kinds
    return cases + [(4, "llama", "packed", "ring", "balanced"),
                    (2, "qwen2", "padded", "ulysses", "balanced")]


GRID = grid()


@pytest.mark.parametrize("world, family, kind, backend, layout", GRID,
                         ids=[f"{fam}-{kind}-P{w}-{b}-{lay}" for w, fam, kind, b, lay in GRID])
def test_zoo_matches_one_process(worlds, world, family, kind, backend, layout):
    results = worlds(world).run(check_case, family, kind, backend, layout)
    assert len({r["loss value"] for r in results}) == 1, results  # same loss on every rank


def wrong_reference() -> str:
    """gemma2's packed run against a reference without its soft cap must fail: the comparison
    sees the mask features it claims to check."""
    loss, grads, _ = sequence_parallel("gemma2", "packed", "ring", "zigzag")
    ref_loss, ref_grads, _ = single_process("gemma2", "packed", attn_logit_softcapping=None)
    try:
        assert_close("loss", loss, ref_loss, FP64_REL)
        for i, (g, e) in enumerate(zip(grads, ref_grads)):
            assert_close(f"gradient {i}", g, e, FP64_REL)
    except AssertionError as error:
        return str(error)
    return "nothing raised"


def test_a_wrong_mask_is_caught(worlds):
    for message in worlds(2).run(wrong_reference):
        assert "> bound" in message, message


# ---------------------------------------------------------------- the table (not a test)

def table(world: int = 4) -> str:
    """Every family x backend x batch kind on `world` ranks (zigzag): the largest relative error
    over loss, gradients and logits per family x backend, or the error a case raised."""
    from tests.harness import World

    rows = ["| family | " + " | ".join(BACKENDS) + " |", "|---" * (len(BACKENDS) + 1) + "|"]
    ranks = World(world)
    try:
        for family in zoo.FAMILIES:
            cells = []
            for backend in BACKENDS:
                worst = 0.0
                try:
                    for kind in KINDS:
                        for r in ranks.run(check_case, family, kind, backend, "zigzag"):
                            worst = max(worst, r["loss"], r["logits"], r["gradients"])
                    cells.append(f"{worst:.1e}")
                except AssertionError as error:
                    cells.append("FAIL: " + str(error).strip().splitlines()[-1][:80])
                    ranks.close()
                    ranks = World(world)
            rows.append(f"| {family} ({zoo.dtype_of(family)}) | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        ranks.close()
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 4))
