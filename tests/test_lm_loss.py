"""`hf.lm_loss` (sequence-tiled lm_head + cross entropy) returns what `hf.loss` returns on the
full logits -- the value (the global mean, on every rank) and, after `sync_grads`, every
parameter gradient -- and what one process computes; fp64 tiny Llamas (tied and untied
embeddings) on 1, 2 and 4 ranks, tiles that do not divide the tokens; a tiny Gemma 2 for the
final-logit soft cap (one process: its attention has windows and soft caps seqpar's HF layer
does not take yet, so it runs transformers' own eager attention).

Tolerances, fp64: the same model and the same operations, summed in a different order (tiles,
ranks): errors ~1e-15 relative; bound 1e-11. The fp64 single-process reference is a
hand-written shift + cross entropy, not transformers' loss (which casts logits to fp32). A
check that the fp32 loss misses the fp64 bound (the old `hf.loss` cast) keeps the comparison
from passing vacuously, and so do unsynced gradients on more than one rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.integrations import hf
from tests.checks import assert_close, max_error
from tests.test_hf import batch, tiny_llama

FP64_REL = 1e-11
CAP = 0.05  # Gemma 2 final soft cap in the tests: below the tiny model's logits, so it bends them


def fp64_llama(tied: bool):
    return tiny_llama(tie_word_embeddings=tied).double()


def reference(model_fn, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One process, fp64: shift by hand, mean cross entropy over the labelled tokens."""
    model = model_fn()
    logits = model(input_ids=data["input_ids"]).logits
    value = F.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten(),
                            ignore_index=-100)
    value.backward()
    return value.detach(), [p.grad for p in model.parameters()]


def run_path(model_fn, data, group, tiled: bool, tile_tokens=None, apply=True, sync=True):
    model = model_fn()
    if apply:
        hf.apply(model, group, backend="ring", layout="zigzag")
    local = hf.shard_batch(data, group, layout="zigzag")
    if tiled:
        value = hf.lm_loss(model, local, group, tile_tokens=tile_tokens)
    else:
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        value = hf.loss(logits, local, group)
    value.backward()
    if sync:
        hf.sync_grads(model, group)
    return value.detach(), [p.grad for p in model.parameters()]


def compare(name, actual, expected, context):
    value, grads = actual
    ref_value, ref_grads = expected
    assert value.dtype == torch.float64, f"{context} {name}: loss in {value.dtype}, not fp64"
    assert_close(f"{name} loss", value, ref_value, FP64_REL, context)
    assert len(grads) == len(ref_grads)
    for i, (g, e) in enumerate(zip(grads, ref_grads)):
        assert_close(f"{name} gradient {i}", g, e, FP64_REL, context)


def check_llama(tied: bool, tile_tokens) -> float:
    group = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    context = f"rank {rank}/{world} tied={tied} tile={tile_tokens}:"
    data = batch()

    def make():
        return fp64_llama(tied)

    expected = reference(make, data)
    tiled = run_path(make, data, group, tiled=True, tile_tokens=tile_tokens)
    compare("lm_loss vs one process", tiled, expected, context)
    compare("lm_loss vs hf.loss", tiled, run_path(make, data, group, tiled=False), context)
    if tied:  # one tensor: the embedding's and the lm_head's gradients add up in it
        model = make()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if world > 1:  # each rank's share alone is not the gradient: the check must see that
        unsynced = run_path(make, data, group, tiled=True, tile_tokens=tile_tokens, sync=False)
        errors = [max_error(g, e) for g, e in zip(unsynced[1], expected[1])]
        assert max(errors) > 1e-3, f"{context} unsynced gradients passed: {errors}"
    return tiled[0].item()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tile_tokens", [5, 1, None], ids=["tile5", "tile1", "tile-default"])
def test_one_process(tied, tile_tokens):
    check_llama(tied, tile_tokens)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ranks(worlds, world, tied):
    values = worlds(world).run(check_llama, tied, 7)
    assert len(set(values)) == 1, values  # the same global mean, bit for bit, on every rank


def test_fp64_loss_is_fp64_not_fp32():
    """hf.loss used to cast fp64 logits to fp32: that result misses the fp64 bound."""
    data = batch()
    expected, _ = reference(lambda: fp64_llama(False), data)
    model = fp64_llama(False)
    logits = model(input_ids=data["input_ids"]).logits
    fp32 = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), data["labels"][:, 1:].flatten(),
                           ignore_index=-100)
    assert max_error(fp32, expected) > FP64_REL * max(1.0, expected.abs().item())
    local = hf.shard_batch(data)
    value = hf.loss(model(input_ids=local["input_ids"]).logits, local)
    assert value.dtype == torch.float64
    assert_close("hf.loss fp64", value, expected, FP64_REL)


def tiny_gemma2(softcap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=64, sliding_window=8,
                          final_logit_softcapping=softcap, attn_logit_softcapping=20.0,
                          use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).double()


@pytest.mark.parametrize("tile_tokens", [5, None], ids=["tile5", "tile-default"])
def test_gemma2_final_softcap(tile_tokens):
    """The soft cap is small (CAP: random-init logits are ~0.1) so it bends every logit: leaving it out must fail."""
    data = batch()
    expected = reference(lambda: tiny_gemma2(CAP), data)
    tiled = run_path(lambda: tiny_gemma2(CAP), data, None, tiled=True, tile_tokens=tile_tokens,
                     apply=False)
    compare("gemma2 lm_loss vs one process", tiled, expected, "")
    compare("gemma2 lm_loss vs hf.loss", tiled,
            run_path(lambda: tiny_gemma2(CAP), data, None, tiled=False, apply=False), "")
    uncapped = run_path(lambda: tiny_gemma2(None), data, None, tiled=True, apply=False)
    assert max_error(uncapped[0], expected[0]) > 1e-3, "the soft cap made no difference"


def test_forward_saves_no_full_logits():
    """Only lm_loss's inputs are saved for backward: no [tokens, vocab] tensor (the untiled
    path saves the logits), seen through autograd's saved-tensor hooks."""
    model = fp64_llama(False)
    local = hf.shard_batch(batch())
    vocab = model.config.vocab_size
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hf.lm_loss(model, local, tile_tokens=4)
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == vocab], shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hf.loss(model(**{k: local[k] for k in ("input_ids", "position_ids")}).logits, local)
    assert [s for s in shapes if len(s) >= 2 and s[-1] == vocab], "the check cannot fail"


@pytest.mark.parametrize("case, kind, pattern", [
    ("no labels", ValueError, r"hf.lm_loss: local_batch has no 'shift_labels'"),
    ("tile", ValueError, r"tile_tokens must be None or an int >= 1, got 0"),
    ("logit_scale", ValueError, r"config.logit_scale=2.0 rescales the logits"),
    ("not a causal lm", TypeError, r"output embedding is an nn.Linear"),
])
def test_lm_loss_misuse(case, kind, pattern):
    model = fp64_llama(False)
    local = hf.shard_batch(batch())
    tile = None
    if case == "no labels":
        local = {k: v for k, v in local.items() if k != "shift_labels"}
    elif case == "tile":
        tile = 0
    elif case == "logit_scale":
        model.config.logit_scale = 2.0
    else:
        model = model.model
    with pytest.raises(kind, match=pattern):
        hf.lm_loss(model, local, tile_tokens=tile)
