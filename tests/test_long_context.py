"""`python -m benchmarks.long_context --smoke`: the whole-step benchmark at toy size on 4 gloo
ranks -- every variant (today's path, + tiled loss, + tiled MLP, + checkpointing, DeepSpeed
ALST) runs, gives the same loss (the same model and data; fp32 sums in another order: 1e-5
relative), and the outputs are written; the options that need other branches say so."""

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


@pytest.mark.parametrize("argv, pattern", [(["--window", "1024"], "needs sliding-window"),
                                           (["--million"], "needs the hybrid model")])
def test_options_that_need_other_branches(argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        long_context.main(argv)


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
