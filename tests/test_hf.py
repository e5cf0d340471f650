"""Hugging Face integration: a tiny random-init LlamaForCausalLM (GQA 4:2, RoPE, no download)
run sequence-parallel through `hf.apply` / `shard_batch` / `loss` / `sync_grads` equals the same
model on one process: gathered logits, the loss (the same value on every rank) and every
parameter gradient, fp32, within 1e-5 relative (fp32 rounding of a few hundred-term sums; the
layers are the same, only the attention is computed in pieces and merged).

The single-process side is transformers' own: its sdpa attention and its loss
(`model(input_ids, labels=...)`, which shifts labels itself). Labels carry some -100s, so the
global token count matters. Gradients without `sync_grads` (each rank's share only) must fail
the comparison, so it is not vacuous. What seqpar cannot compute exactly -- padding masks,
dropout, position ids that are not the global ones (RoPE) -- raises on every rank.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.integrations import hf
from tests.checks import assert_close, raised
from tests.test_mesh import mesh

FP32_REL = 1e-5
SEQ, BATCH = 32, 2


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(seed: int = 1, batch_size: int = BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (batch_size, seq), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100           # e.g. a prompt without targets
    labels[0, seq // 2 + 1] = -100
    return {"input_ids": ids, "labels": labels}


def single_process(data: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """transformers alone: logits, loss (its own shift and mean), parameter gradients."""
    model = tiny_llama()
    out = model(**data)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), [p.grad for p in model.parameters()]


def sequence_parallel(data: dict, group, backend: str, layout: str, global_positions=True):
    model = tiny_llama()
    hf.apply(model, group, backend=backend, layout=layout)
    local = hf.shard_batch(data, group, layout=layout)
    positions = local["position_ids"] if global_positions else \
        torch.arange(local["input_ids"].shape[1]).expand_as(local["input_ids"])
    logits = model(input_ids=local["input_ids"], position_ids=positions).logits
    loss = hf.loss(logits, local, group)
    loss.backward()
    hf.sync_grads(model, group)
    return (seqpar.gather(logits.detach(), group, dim=1, layout=layout), loss.detach(),
            [p.grad for p in model.parameters()])


def compare(actual, expected, context: str) -> None:
    logits, loss, grads = actual
    ref_logits, ref_loss, ref_grads = expected
    assert_close("logits", logits, ref_logits, FP32_REL, context)
    assert_close("loss", loss, ref_loss, FP32_REL, context)
    assert len(grads) == len(ref_grads)
    for i, (g, e) in enumerate(zip(grads, ref_grads)):
        assert_close(f"gradient {i}", g, e, FP32_REL, context)


def check_model(backend: str, layout: str, ulysses: int | None) -> float:
    group = mesh(ulysses) if ulysses else None
    data = batch()
    context = f"rank {dist.get_rank()} {backend}/{layout}:"
    result = sequence_parallel(data, group, backend, layout)
    compare(result, single_process(data), context)
    return result[1].item()


# The four backends of the issue on 2 and 4 ranks (usp as U=2 x R=1 and U=2 x R=2), plus the
# other layouts, TokenRing and a one-wide Ulysses mesh on 4.
CASES = [("ring", "zigzag", None), ("ulysses", "zigzag", None), ("usp", "zigzag", 2),
         ("allgather", "zigzag", None)]
GRID = ([(2, *case) for case in CASES]
        + [(4, *case) for case in CASES + [("ring", "striped", None),
                                           ("allgather", "contiguous", None),
                                           ("tokenring", "zigzag", None),
                                           ("usp", "contiguous", 1)]])


@pytest.mark.parametrize("world, backend, layout, ulysses", GRID,
                         ids=[f"P{w}-{b}-{l}" + (f"-U{u}" if u else "") for w, b, l, u in GRID])
def test_llama_matches_single_process(worlds, world, backend, layout, ulysses):
    losses = worlds(world).run(check_model, backend, layout, ulysses)
    assert len(set(losses)) == 1, losses  # bit-identical loss on every rank


def check_without_sync_fails() -> str:
    """Each rank's gradients alone are only its share: the comparison must catch that."""
    data = batch()
    model = tiny_llama()
    hf.apply(model)
    local = hf.shard_batch(data)
    hf.loss(model(**local).logits, local).backward()
    _, _, expected = single_process(data)
    try:
        for i, (p, e) in enumerate(zip(model.parameters(), expected)):
            assert_close(f"gradient {i}", p.grad, e, FP32_REL, "without sync_grads:")
    except AssertionError as error:
        return str(error)
    return "nothing raised"


def test_unsynced_gradients_are_caught(worlds):
    for message in worlds(4).run(check_without_sync_fails):
        assert re.search(r"gradient \d+: max error .* > bound", message), message


def local_positions(layout: str) -> tuple[str, str]:
    """RoPE with each rank's local positions (0 .. S_loc - 1) is wrong: refused on every rank."""
    model = tiny_llama()
    hf.apply(model, layout=layout)
    ids = hf.shard_batch(batch(), layout=layout)["input_ids"]
    return raised(model, input_ids=ids)  # the model's default: local positions


@pytest.mark.parametrize("layout, pattern", [
    ("zigzag", r"position_ids are not this rank's global token positions"),
    # each rank's local positions are its global ones shifted, but by a different amount
    ("contiguous", r"position_ids offset from the layout's global positions \(pass "
                   r"shard_batch's\) differs across ranks"),
])
def test_local_position_ids_are_refused(worlds, layout, pattern):
    results = worlds(4).run(local_positions, layout, timeout=60)
    for rank, (kind, message) in enumerate(results):
        assert kind == "ValueError" and message.startswith("seqpar attention: "), message
        if layout == "zigzag" and rank == 3:
            # the middle rank's two chunks are adjacent (positions 12..19): its local positions
            # are a shift of its global ones, so it reports the first rank that refused
            pattern = r"rank 0 of the group rejected its arguments"
        assert re.search(pattern, message), message


def check_data_parallel_replicas() -> None:
    """SPMesh(dp=2): each sequence-parallel pair trains on its own batch; sync_grads sums over
    the pair and averages over the replicas, giving the gradient of the replicas' mean loss."""
    m = mesh(1, dp=2)
    replicas = [batch(seed=10 + d) for d in range(2)]
    _, loss, grads = sequence_parallel(replicas[m.dp.rank], m, "ring", "zigzag")
    expected = [single_process(data) for data in replicas]
    assert_close("loss", loss, expected[m.dp.rank][1], FP32_REL, f"rank {dist.get_rank()}")
    for i, g in enumerate(grads):
        mean = (expected[0][2][i] + expected[1][2][i]) / 2
        assert_close(f"gradient {i}", g, mean, FP32_REL, f"rank {dist.get_rank()}")


def test_sync_grads_averages_data_parallel_replicas(worlds):
    worlds(4).run(check_data_parallel_replicas)


# ---------------------------------------------------------------- malformed use

def bad_batch(case: str) -> tuple[str, str]:
    data = batch()
    if case == "gap in the mask":
        data["attention_mask"] = torch.ones_like(data["input_ids"])
        data["attention_mask"][1, 4:6] = 0
    elif case == "4-D mask":
        data["attention_mask"] = torch.ones(BATCH, 1, SEQ, SEQ)
    elif case == "packed, float positions":
        data["position_ids"] = torch.zeros(data["input_ids"].shape)
    elif case == "differs" and dist.get_rank() == 1:
        data["input_ids"] = data["input_ids"].flip(1)
    elif case == "length":
        data = {k: v[:, :SEQ - 2] for k, v in data.items()}
    elif case == "unknown key":
        data["token_type_ids"] = torch.zeros_like(data["input_ids"])
    return raised(hf.shard_batch, data)


@pytest.mark.parametrize("case, kind, pattern", [
    ("gap in the mask", "ValueError",
     r"hf.shard_batch: batch\['attention_mask'\] row 1 has padding between real tokens"),
    ("4-D mask", "ValueError", r"shard_batch takes the 2-D padding mask, not a 4-D one"),
    ("packed, float positions", "TypeError", r"batch\['position_ids'\] must be an integer"),
    ("differs", "ValueError", r"hf.shard_batch: input_ids differs across ranks"),
    ("length", "ValueError", r"sequence length 30 is not divisible by 8 .*pad the sequence to 32"),
    ("unknown key", "ValueError", r"keys \['token_type_ids'\] that shard_batch does not know"),
])
def test_bad_batches_raise_on_every_rank(worlds, case, kind, pattern):
    for result in worlds(4).run(bad_batch, case, timeout=60):
        assert result[0] == kind and re.search(pattern, result[1]), result


def test_an_all_ones_mask_is_fine(worlds):
    worlds(2).run(ones_mask)


def ones_mask() -> None:
    """An all-ones mask is no mask: shard_batch drops it, and the model may be given one."""
    data = batch()
    local = hf.shard_batch({**data, "attention_mask": torch.ones_like(data["input_ids"])})
    assert set(local) == {"input_ids", "position_ids", "shift_labels"}
    model = tiny_llama()
    hf.apply(model)
    plain = model(**local).logits
    masked = model(**local, attention_mask=torch.ones_like(local["input_ids"])).logits
    assert torch.equal(plain, masked)


def misuse(case: str) -> tuple[str, str]:
    model = tiny_llama(attention_dropout=0.1 if case == "dropout" else 0.0)
    hf.apply(model)
    local = hf.shard_batch(batch())
    if case == "mask":
        padding = torch.ones_like(local["input_ids"])
        padding[0, -1] = 0
        return raised(model, input_ids=local["input_ids"], position_ids=local["position_ids"],
                      attention_mask=padding)
    if case == "dropout":
        return raised(model.train(), input_ids=local["input_ids"],
                      position_ids=local["position_ids"])
    if case == "no labels":
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        return raised(hf.loss, logits, {"input_ids": local["input_ids"]})
    return raised(hf.apply, model, backend="ring", causal=False)


@pytest.mark.parametrize("case, pattern", [
    ("mask", r"seqpar attention mask: the model got an attention_mask with zeros"),
    ("dropout", r"attention dropout is not applied by seqpar \(got dropout=0.1\)"),
    ("no labels", r"hf.loss: local_batch has no 'shift_labels'"),
    ("causal kwarg", r"hf.apply: causal= is not a backend option"),
])
def test_misuse_is_a_clear_error(worlds, case, pattern):
    for kind, message in worlds(2).run(misuse, case, timeout=60):
        assert kind == "ValueError" and re.search(pattern, message), (kind, message)


def test_apply_names_its_settings():
    """Same settings -> same registry entry; other settings -> another."""
    model = tiny_llama()
    first = hf.apply(model, backend="ring", layout="zigzag")
    assert hf.apply(model, backend="ring", layout="zigzag") == first
    assert hf.apply(model, backend="allgather", layout="zigzag") != first
    assert model.config._attn_implementation.startswith("seqpar_allgather_zigzag_world_")
