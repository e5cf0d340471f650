"""The benchmark CLIs run end to end at toy sizes (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json

from benchmarks import attention


def test_attention_benchmark_runs_and_methods_agree(tmp_path, capsys):
    attention.main(["--worlds", "2", "--seqs", "256", "--repeats", "1", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("attention-*.json")
    rows = json.loads(result.read_text())["rows"]
    methods = {r["method"] for r in rows if r["P"] == 2}
    assert methods == set(attention.METHODS)
    for row in rows:
        if row.get("diff") is not None:
            assert row["diff"] < 1e-5, row  # every method computes the same attention
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    assert "efficiency" in capsys.readouterr().out
