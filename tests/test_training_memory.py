"""The whole-step memory model (`seqpar.cost.training_memory`): its formulas on hand-worked
numbers, its monotonicity in the savers, the bisection's edge, and the statements the README
and `benchmarks.simulate` make about ALST's figures. Deterministic arithmetic, exact or to
float rounding."""

from __future__ import annotations

import pytest

from benchmarks.simulate import whole_model
from seqpar.cost.predict import memory_bytes
from seqpar.cost.training_memory import (ALST_PUBLISHED, LLAMA3_8B, LONG_CONTEXT_CPU,
                                         ModelShape, Savers, Training, alst_comparison,
                                         attention_kept_bytes, attention_problem,
                                         bytes_per_token, longest_sequence, model_state_bytes,
                                         step_memory)

TINY = ModelShape(layers=2, hidden=8, heads_q=2, heads_kv=1, head_dim=4, intermediate=16,
                  vocab=10)


def test_parameter_counts():
    assert LLAMA3_8B.params == 8_030_261_248            # Meta-Llama-3-8B's published count
    # hand count: per layer q,o 8x8, k,v 8x4, mlp 3x8x16, 2 norms of 8; embeddings 2 x 10 x 8
    layer = 2 * 64 + 2 * 32 + 3 * 128 + 16
    assert TINY.layer_params == layer
    assert TINY.params == 2 * layer + 160 + 8
    assert ModelShape(**{**TINY.__dict__, "tied": True}).params == TINY.params - 80


@pytest.mark.parametrize("stage, offload, expected", [
    (0, False, 16 * 1000), (1, False, 4 * 1000 + 12 * 1000 / 4),
    (2, False, 2 * 1000 + 14 * 1000 / 4), (3, False, 16 * 1000 / 4 + 4 * 100),
    (3, True, 4 * 1000 / 4 + 4 * 100), (0, True, 4 * 1000)])
def test_zero_stages(stage, offload, expected, monkeypatch):
    monkeypatch.setattr(ModelShape, "params", property(lambda self: 1000))
    monkeypatch.setattr(ModelShape, "layer_params", property(lambda self: 100))
    assert model_state_bytes(TINY, 4, Training(2, stage, offload)) == expected


def test_bad_zero_stage():
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        model_state_bytes(TINY, 2, Training(zero_stage=4))


def test_parts_by_hand():
    """TINY, S = 64 on P = 2 (C = 32 tokens), bf16, ZeRO-0, ring attention."""
    t = Training(2, 0)
    c, b, h, i, v = 32, 2, 8, 16, 10
    p = attention_problem(TINY, 64, 2, t)
    att_kept = 2 * c * 2 * 4 * b + 2 * c * 1 * 4 * b + c * 2 * 4   # q, o, k, v, fp32 lse
    assert attention_kept_bytes("ring", p) == att_kept
    att_work = memory_bytes("ring", p) - att_kept
    plain = step_memory(TINY, 64, 2, "ring", Savers(), t)
    kept = b * (4 * h + 4 * i) * c + att_kept
    logits = c * v * (b + 4) + c * v * 8
    assert plain.parts["kept activations"] == 2 * kept
    assert plain.parts["logits (loss phase)"] == logits
    layer_bwd = att_work + 2 * i * c * b + 4 * c * h * b
    assert plain.peak == model_state_bytes(TINY, 2, t) + 2 * kept + max(logits + 4 * c * h * b,
                                                                         layer_bwd)
    tiled = step_memory(TINY, 64, 2, "ring", Savers(True, True, True, loss_tile=4, mlp_tile=8), t)
    assert tiled.parts["kept activations"] == 2 * b * h * c
    assert tiled.parts["logits (loss phase)"] == 4 * v * (b + 12)
    assert tiled.parts["mlp working set"] == 6 * 8 * i * b
    assert tiled.parts["layer backward"] == (b * 4 * h * c + att_kept) + att_work \
        + 6 * 8 * i * b + 4 * c * h * b
    offloaded = step_memory(TINY, 64, 2, "ring", Savers(True, True, True, True), t)
    assert offloaded.parts["kept activations"] == 0


@pytest.mark.parametrize("backend", ["ring", "tokenring", "ulysses", "allgather"])
def test_each_saver_lowers_the_peak(backend):
    steps = [Savers(), Savers(True), Savers(True, True), Savers(True, True, True),
             Savers(True, True, True, True)]
    peaks = [step_memory(LLAMA3_8B, 2 ** 20, 8, backend, s).peak for s in steps]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks


def test_longest_sequence_is_the_edge():
    t, s = Training(4, 0), Savers(True, True, True)
    budget = 5 * 2 ** 30
    longest = longest_sequence(LONG_CONTEXT_CPU, 4, "ring", s, budget, t)
    assert longest % 8 == 0
    assert step_memory(LONG_CONTEXT_CPU, longest, 4, "ring", s, t).peak <= budget
    assert step_memory(LONG_CONTEXT_CPU, longest + 8, 4, "ring", s, t).peak > budget
    assert longest_sequence(LONG_CONTEXT_CPU, 4, "ring", s, 1e3, t) == 0


def test_slope_and_fixed_part_reproduce_the_peak():
    t, s = Training(4, 0), Savers()
    slope, fixed = bytes_per_token(LONG_CONTEXT_CPU, 4, "ring", s, t, seq=2 ** 15)
    peak = step_memory(LONG_CONTEXT_CPU, 2 ** 16, 4, "ring", s, t).peak
    assert slope > 0 and abs(fixed + slope * 2 ** 16 - peak) <= 1e-9 * peak


def test_alst_statements():
    """What benchmarks.simulate's notes say: the Ulysses prediction within 10% of ALST's
    figures, allgather about a third of it at 32 GPUs, and the savers' steps ordered."""
    rows = {(r["P"], r["backend"]): r for r in alst_comparison()}
    for world, published in ALST_PUBLISHED:
        assert 0.9 <= rows[(world, "ulysses")]["predicted_tokens"] / published <= 1.1
    assert 0.25 <= rows[(32, "allgather")]["ratio_to_alst"] <= 0.4
    ring = [r["ring"] for r in whole_model(80e9)]
    assert ring == sorted(ring) and ring[-1] > 40 * ring[0]
