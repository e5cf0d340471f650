"""`hf.enable_memory_savers` (DeepSpeed's TiledMLP in every decoder layer, transformers'
checkpointing of every decoder layer) leaves the loss and every parameter gradient of the plain
run: fp64 tiny Llama, one process and 2 ranks on seqpar's ring attention, with the tiled loss
and without. Tolerance fp64 1e-11: the same operations, the MLP's weight gradients summed over
tiles instead of in one matmul (~1e-15 relative).

That the savers are really on is checked through autograd's saved-tensor hooks: with the tiled
MLP no [tokens, intermediate_size] tensor is saved for backward, with checkpointing far fewer
tensors are saved (only each layer's inputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.integrations import hf
from tests.checks import assert_close
from tests.test_hf import batch, tiny_llama

FP64_REL = 1e-11


def step(data, group, tiled_loss: bool, savers: dict | None, record=None):
    model = tiny_llama(tie_word_embeddings=False).double().train()
    hf.apply(model, group, backend="ring", layout="zigzag")
    if savers is not None:
        hf.enable_memory_savers(model, **savers)
    local = hf.shard_batch(data, group, layout="zigzag")
    hooks = (torch.autograd.graph.saved_tensors_hooks(lambda t: record.append(tuple(t.shape))
                                                      or t, lambda t: t)
             if record is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                                 lambda t: t))
    with hooks:
        if tiled_loss:
            value = hf.lm_loss(model, local, group, tile_tokens=6)
        else:
            inputs = {k: local[k] for k in ("input_ids", "position_ids")}
            value = hf.loss(model(**inputs).logits, local, group)
    value.backward()
    hf.sync_grads(model, group)
    return value.detach(), [p.grad for p in model.parameters()]


def check_savers(tiled_loss: bool, savers: dict) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    context = f"rank {rank} tiled_loss={tiled_loss} savers={savers}:"
    data = batch()
    plain_shapes, saver_shapes = [], []
    expected = step(data, None, tiled_loss, None, plain_shapes)
    actual = step(data, None, tiled_loss, savers, saver_shapes)
    assert_close("loss", actual[0], expected[0], FP64_REL, context)
    for i, (g, e) in enumerate(zip(actual[1], expected[1])):
        assert_close(f"gradient {i}", g, e, FP64_REL, context)
    intermediate = tiny_llama().config.intermediate_size
    wide = [s for s in saver_shapes if len(s) >= 2 and s[-1] == intermediate]
    if savers.get("tiled_mlp", True):
        assert not wide, f"{context} MLP intermediates saved: {wide}"
        assert [s for s in plain_shapes if len(s) >= 2 and s[-1] == intermediate], "check cannot fail"
    if savers.get("checkpoint", True):
        assert len(saver_shapes) < len(plain_shapes) / 2, (len(saver_shapes), len(plain_shapes))


SAVERS = [dict(tiled_mlp=True, checkpoint=False, mlp_tiles=3),
          dict(tiled_mlp=False, checkpoint=True),
          dict(tiled_mlp=True, checkpoint=True),          # tiles: ceil(tokens / hidden)
          dict(tiled_mlp=True, checkpoint=True, mlp_tiles=5)]
IDS = ["mlp3", "checkpoint", "both-default-tiles", "both-mlp5"]


@pytest.mark.parametrize("savers", SAVERS, ids=IDS)
@pytest.mark.parametrize("tiled_loss", [False, True], ids=["hf.loss", "lm_loss"])
def test_one_process(tiled_loss, savers):
    check_savers(tiled_loss, savers)


@pytest.mark.parametrize("savers", SAVERS[2:], ids=IDS[2:])
def test_two_ranks(worlds, savers):
    worlds(2).run(check_savers, True, savers)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(offload=True), r"offload=True moves saved activations from the accelerator"),
    (dict(offload=True, checkpoint=False), r"offload=True .* needs checkpoint=True"),
    (dict(mlp_tiles=0), r"mlp_tiles must be None .* got 0"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        hf.enable_memory_savers(tiny_llama(), **kwargs)


def test_disable_restores_the_plain_model():
    model = tiny_llama()
    hf.enable_memory_savers(model)
    assert "forward" in model.model.layers[0].mlp.__dict__ and model.is_activation_checkpointing
    hf.disable_memory_savers(model)
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert not model.is_activation_checkpointing
