"""The benchmark CLIs run end to end at toy sizes (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import attention, linear_scaling


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


def test_tokenring_benchmark_runs(tmp_path, capsys):
    from benchmarks import tokenring
    tokenring.main(["--worlds", "2", "--seqs", "256", "--heads", "4", "--kv-heads", "4", "1",
                    "--dim", "16", "--repeats", "1", "--comm-repeats", "2", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("tokenring-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {(r["Hkv"], r["backend"]) for r in rows} == {(h, b) for h in (4, 1) for b in tokenring.BACKENDS}
    ratio = {r["Hkv"]: r["bytes_vs_ring"] for r in rows if r["backend"] == "tokenring"}
    assert ratio[4] < 1 < ratio[1], ratio  # MHA: fewer bytes than the ring; GQA 4:1: more
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    assert "ms/step" in capsys.readouterr().out


def test_linear_scaling_benchmark_runs_with_constant_bytes(tmp_path, capsys):
    linear_scaling.main(["--world", "2", "--seqs", "256", "1024", "--heads", "2", "--key-dim", "8",
                         "--value-dim", "16", "--repeats", "1", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("linear_scaling-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["S"] for r in rows] == [256, 1024]
    # one fp32 state (B=1, 2 heads, 8 x 16) to the other rank, forward and backward
    assert rows[0]["sent_bytes"] == rows[1]["sent_bytes"] == 2 * (2 * 8 * 16 * 4)
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    assert "bytes per rank the same at every S: yes" in capsys.readouterr().out


def test_kernels_benchmark_smoke_mode_runs(tmp_path):
    """The GPU kernel benchmark's code paths, at toy size on CPU under the Triton interpreter
    (a process of its own: the interpreter is chosen when triton decorates the kernels)."""
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("kernels-*.json")
    payload = json.loads(result.read_text())
    assert payload["smoke"] and payload["dense"] and payload["sparse"]
    assert {r["backend"] for r in payload["end_to_end"]} == {"ring", "ulysses", "s2"}
    assert 0 < payload["sparse"][0]["kept"] < 1
    assert "TFLOP/s" in done.stdout
