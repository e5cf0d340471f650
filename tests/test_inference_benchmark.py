"""`python -m benchmarks.inference` end to end at toy size (a smoke test: nothing is timed)."""

from __future__ import annotations

import json

from benchmarks import inference


def test_inference_benchmark_runs(tmp_path, capsys):
    inference.main(["--world", "2", "--prefill-seqs", "256", "--contexts", "512", "--rounds", "2",
                    "--decode-seqs", "256", "1024", "--heads", "4", "--kv-heads", "1",
                    "--partial-kv-heads", "4", "1",
                    "--dim", "16", "--repeats", "1", "--decode-steps", "2",
                    "--out", str(tmp_path)])
    (result,) = tmp_path.glob("inference-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["S"] for r in rows["prefill"]] == [256]
    assert [(r["Hkv"], r["share"]) for r in rows["partial"]] == [
        (h, share) for h in (4, 1) for share in inference.SHARES]
    for row in rows["partial"]:
        assert row["pick"] in ("pass-kv", "pass-q")
    # one decode step sends the fp32 partial of 1 token, 4 heads, 16 + 1 values, after the
    # 13 int64 values of its argument check: at every S
    assert [r["bytes"] for r in rows["decode"]] == [4 * 17 * 4 + 13 * 8] * 2
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    out = capsys.readouterr().out
    assert "efficiency" in out and "decode bytes per step and rank the same at every S: yes" in out
