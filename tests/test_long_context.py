"""`python -m benchmarks.long_context --smoke`: the whole-step benchmark at toy size on 4 gloo
ranks -- every variant (today's path, + tiled loss, + tiled MLP, + checkpointing, DeepSpeed
ALST) runs, gives the same loss (the same model and data; fp32 sums in another order: 1e-5
relative), and the outputs are written; the windowed confirming run (--window) and the million-token step
(--million) run at toy size too."""

from __future__ import annotations

import json

import pytest

from benchmarks import long_context


def test_smoke_run(tmp_path):
    payload = long_context.main(["--smoke", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert {r["variant"] for r in rows} == set(long_context.VARIANTS)
    failed = [r for r in rows if "peak_gib" not in r]
    assert not failed, failed
    for seq in {r["S"] for r in rows}:
        losses = [r["loss"] for r in rows if r["S"] == seq]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), (seq, losses)
    assert all(line.get("slope_kib_per_token") is not None for line in payload["summary"])
    (result,) = tmp_path.glob("long_context-*.json")
    assert json.loads(result.read_text())["summary"]
    stem = result.with_suffix("")
    for suffix in (".csv", ".md", ".memory_vs_S.png"):
        assert stem.with_name(stem.name + suffix).exists(), suffix


def test_window_confirming_run(tmp_path):
    """--window: variant d at the fit's longest S (here from a prior run's JSON whose fit says
    1,024 tokens fit the budget) with the attention on a sliding window of 64, and ALST beside
    it on the same windowed model; each row carries the measured peak beside the cost model's
    prediction (and d's beside the fit's), and the two compute the same loss -- ALST's inner
    attention really is windowed."""
    fit = {"summary": [{"variant": "d", "slope_kib_per_token": 1.0, "fixed_gib": 0.5,
                        "longest_k": 1.0}]}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit))
    payload = long_context.main(["--smoke", "--window", "64", "--fit-from", str(path),
                                 "--confirm-variants", "d", "alst", "--out", str(tmp_path)])
    d, alst = payload["confirm"]
    for row in (d, alst):
        assert row["S"] == 1024 and row["window"] == 64 and row["source"] == "fit", row
        assert "peak_gib" in row and row["seconds"] > 0 and row["loss"] > 0, row
        assert row["model_gib"] > 0
    assert (d["variant"], alst["variant"]) == ("d", "alst")
    assert abs(d["fit_gib"] - (0.5 + 1024 / 2 ** 20)) < 1e-12
    # fp32 model: ring zigzag vs all-to-all + one-rank kernel differ in summation order only;
    # a full causal (unwindowed) ALST would be off by far more at S = 16 windows
    assert abs(d["loss"] - alst["loss"]) < 1e-4 * d["loss"], (d["loss"], alst["loss"])
    saved = json.loads(next(tmp_path.glob("long_context-*.json")).read_text())
    assert [r["S"] for r in saved["confirm"]] == [1024, 1024]


def test_window_confirm_seq_picks_the_fit_or_the_model():
    fitted = [{"variant": "d", "longest_k": 100.3, "model_longest_k": 50.0}]
    assert long_context.confirm_seq(fitted, 4) == (102704, "fit")  # floor to 2 x world
    flat = [{"variant": "d", "model_longest_k": 50.0, "note": "flat"}]
    assert long_context.confirm_seq(flat, 4) == (51200, "cost model (the fit is flat)")
    with pytest.raises(SystemExit, match="no fit of variant d"):
        long_context.confirm_seq([{"variant": "a", "longest_k": 1.0}], 4)
    with pytest.raises(SystemExit, match="leaves no S"):
        long_context.confirm_seq([{"variant": "d", "longest_k": 0.001}], 4)


@pytest.mark.parametrize("argv, pattern", [
    (["--window", "0"], "--window must be >= 1"),
    (["--seq", "1024"], "add --window"),
    (["--window", "64", "--seq", "1023"], "multiple of 2 x world"),
    (["--window", "64", "--variants", "a", "b"], "add d to --variants"),
])
def test_window_bad_options(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        long_context.main(argv)
    assert pattern in capsys.readouterr().err


def test_million_smoke(tmp_path):
    """--million at toy size: one full step of the hybrid model on 4 ranks, finite loss and
    gradients, every rank's peak, the phases' times, the JSON."""
    payload = long_context.main(["--million", "--seq", "4096", "--hidden", "64", "--vocab",
                                 "512", "--window", "128", "--token-tile", "300",
                                 "--loss-tile", "300", "--out", str(tmp_path)])
    assert payload["grads_finite"] and 0 < payload["loss"] < 10, payload
    assert len(payload["peak_gib_per_rank"]) == 4 and min(payload["peak_gib_per_rank"]) > 0
    assert set(payload["seconds"]) == {"forward", "backward", "sync_grads", "optimizer", "step"}
    assert payload["estimate"]["peak_gib"] > 0
    (result,) = tmp_path.glob("million-*.json")
    assert json.loads(result.read_text())["layers"] == ["linear", "linear", "linear", "softmax"]


def test_fit_headroom_and_overheads_arithmetic():
    slope, fixed = long_context._fit([(1024, 3.0), (2048, 5.0), (4096, 9.0)])
    assert abs(slope - 2 / 1024) < 1e-12 and abs(fixed - 1.0) < 1e-9
    assert long_context._fit([(1024, 3.0)]) is None
    summary = [{"variant": "a", "longest_k": 4.0}, {"variant": "d", "longest_k": 40.0},
               {"variant": "alst", "longest_k": 20.0}]
    assert long_context.headroom(summary) == {"d / a": 10.0, "d / alst": 2.0}
    rows = [{"variant": "a", "S": 1024, "seconds": 2.0}, {"variant": "a", "S": 2048, "seconds": 4.0},
            {"variant": "b", "S": 2048, "seconds": 4.4}, {"variant": "d", "S": 4096, "seconds": 9.0}]
    over = long_context.overheads(rows)
    assert over["S"] == 2048 and abs(over["b"] - 0.1) < 1e-12 and "d" not in over
