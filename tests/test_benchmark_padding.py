"""benchmarks.padding at toy size: it runs on 2 ranks, prints its table, writes its JSON, and
the packed batch computes only the real tokens (the timing itself is the benchmark's, never a
test's)."""

from __future__ import annotations

import json

from benchmarks import padding


def test_padding_benchmark_smoke(tmp_path, capsys):
    rows = padding.main(["--world", "2", "--rows", "2", "--seq", "32", "--hidden", "32",
                         "--layers", "1", "--heads", "2", "--repeats", "1",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "vs padding as tokens" in out and "25% padding" in out
    by_mode = {row["mode"]: row for row in rows}
    assert by_mode["packed"]["real"] == 32 + 16
    assert by_mode["packed"]["tokens"] == 48 and by_mode["as tokens"]["tokens"] == 64
    assert by_mode["as tokens"]["vs_tokens"] == 1.0
    written = json.loads(next(tmp_path.glob("padding-*.json")).read_text())
    assert [row["mode"] for row in written["rows"]] == list(padding.MODES)
