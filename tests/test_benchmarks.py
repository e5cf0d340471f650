"""The benchmark CLIs run end to end at toy sizes (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import attention, linear_scaling
from tests.markers import needs_triton


def test_attention_benchmark_runs_and_methods_agree(tmp_path, capsys):
    attention.main(["--worlds", "2", "--seqs", "256", "--repeats", "1", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("attention-*.json")
    rows = json.loads(result.read_text())["rows"]
    methods = {r["method"] for r in rows if r["P"] == 2}
    assert methods == set(attention.default_methods())
    compared = [row for row in rows if row.get("diff") is not None]
    assert {row["method"] for row in compared} >= {m for m in methods if m.startswith("seqpar")
                                                   and attention.METHODS[m].comparable}
    for row in compared:  # each method's output vs the fused single-process kernel's (fp32)
        assert row["diff"] < 1e-5, row
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


@needs_triton
def test_kernels_benchmark_smoke_mode_runs(tmp_path):
    """The GPU kernel benchmark's code paths, at toy size on CPU under the Triton interpreter
    (a process of its own: the interpreter is chosen when triton decorates the kernels)."""
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("kernels-*.json")
    payload = json.loads(result.read_text())
    assert payload["smoke"] and payload["dense"] and payload["sparse"]
    assert {r["backend"] for r in payload["end_to_end"]} == {"ring", "ulysses", "s2"}
    assert 0 < payload["sparse"][0]["kept"] < 1
    assert [r["mask"].split()[-1] for r in payload["masks"]] == ["causal", "4", "documents"]
    assert "TFLOP/s" in done.stdout


def test_scaling_benchmark_writes_every_output(tmp_path, capsys):
    from benchmarks import scaling
    from seqpar.cost.traffic import Problem, ring_volume
    methods = ["seqpar ring (zigzag)", "seqpar usp U2 (zigzag)", scaling.LASP2,
               "torch ring (allgather)"]
    scaling.main(["--worlds", "2", "--seqs", "256", "--heads", "4", "--dim", "16",
                  "--repeats", "1", "--methods", *methods, "--out", str(tmp_path)])
    (result,) = tmp_path.glob("scaling-*.json")
    stem = result.with_suffix("")
    for suffix in (".csv", ".md", ".time.png", ".efficiency.png", ".memory.png", ".bytes.png"):
        assert stem.with_name(stem.name + suffix).exists(), suffix
    rows = {r["method"]: r for r in json.loads(result.read_text())["rows"] if r["P"] == 2}
    assert set(rows) == set(methods)
    fwd, bwd = ring_volume(Problem(batch=1, seq_len=256, heads_q=4, heads_kv=4, head_dim=16,
                                   world=2, itemsize=4))
    assert rows["seqpar ring (zigzag)"]["sent_bytes"] >= fwd.bytes + bwd.bytes  # + agree
    for name in ("seqpar ring (zigzag)", "seqpar usp U2 (zigzag)"):
        assert rows[name]["exposed_s"] >= 0  # measured; how it compares with time is not known
        assert rows[name]["predicted_s"] > 0  # the model, calibrated on the same ranks
    assert rows["torch ring (allgather)"]["exposed_s"] is None  # peers are not instrumented
    assert rows["seqpar usp U2 (zigzag)"]["diff"] < 1e-5
    summary = stem.with_name(stem.name + ".md").read_text()
    assert "# host " in summary and "## P = 2" in summary
    assert "exposed" in capsys.readouterr().out


def test_simulator_writes_every_output_and_reports_the_claims(tmp_path, capsys):
    from benchmarks import simulate
    simulate.main(["--gpus", "8", "64", "--tokens", "131072", "2097152", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("simulate-*.json")
    stem = result.with_suffix("")
    for suffix in (".csv", ".md", ".time_vs_P.png", ".time_vs_S.png", ".memory_vs_P.png",
                   ".bytes_vs_P.png"):
        assert stem.with_name(stem.name + suffix).exists(), suffix
    payload = json.loads(result.read_text())
    at64 = {r["backend"] for r in payload["rows"] if r["P"] == 64 and "ms" in r}
    assert at64 == {"ring", "tokenring", "allgather", "usp U2", "usp U4", "usp U8", "usp U16",
                    "usp U32", "lasp2", "ring_linear"}  # no ulysses: 64 ranks, 32 heads
    assert all(r["choice"] for r in payload["rows"] if r["backend"] == "auto")
    assert {r["savers"] for r in payload["whole_model"]} >= {"a: today", "d: + checkpointing"}
    assert {(r["P"], r["backend"]) for r in payload["alst"]} >= {(8, "ulysses"), (32, "ulysses")}
    assert "## Whole training step" in stem.with_name(stem.name + ".md").read_text()
    claims = "\n".join(payload["claims"])
    for expected in ("LASP-2 vs ring, 64 GPUs x 2048K tokens, a100-sxm",
                     "TokenRing vs ring, pcie-a100",
                     "Ulysses at P=64 (32 query heads, 8 K/V heads), h100-sxm: needs query heads",
                     "USP is the fastest"):
        assert expected in claims, expected
    assert "64 GPUs x 2048K tokens" in capsys.readouterr().out


def test_the_model_supports_what_the_readme_reports():
    """The "Which backend?" statements, checked against the model they come from."""
    from seqpar.cost import SPEC_SHEETS, Problem, choose, predict
    h100, mesh, pcie = (SPEC_SHEETS[n] for n in ("h100-sxm", "mi300x-mesh", "pcie-a100"))
    llama = {"heads_q": 32, "heads_kv": 8, "head_dim": 128}
    linear = Problem(batch=1, seq_len=2048 * 1024, world=64, heads_q=32, heads_kv=32,
                     head_dim=128)
    lasp2, ring = (predict(b, linear, h100).seconds for b in ("lasp2", "ring_linear"))
    assert 100 * lasp2 < ring
    # Ulysses' ceiling: P may not exceed (divide) the query heads
    assert predict("ulysses", Problem(batch=1, seq_len=2 ** 21, world=32, **llama), h100).legal
    assert not predict("ulysses", Problem(batch=1, seq_len=2 ** 21, world=64, **llama), h100).legal
    # TokenRing: ahead of the ring with MHA on a full mesh, behind it with GQA across nodes
    mha = Problem(batch=1, seq_len=2 ** 17, world=8, heads_q=32, heads_kv=32, head_dim=128)
    assert predict("tokenring", mha, mesh).seconds < 0.8 * predict("ring", mha, mesh).seconds
    gqa = Problem(batch=1, seq_len=2 ** 17, world=64, **llama)
    for hw in (h100, pcie):
        assert predict("tokenring", gqa, hw).seconds > 2 * predict("ring", gqa, hw).seconds
    # USP with Ulysses inside the node wins once the ring crosses nodes on short sequences
    many = Problem(batch=1, seq_len=2 ** 17, world=128, ulysses=8, **llama)
    assert choose(many, h100).backend == "usp"
    assert predict("usp", many, h100).seconds < 0.7 * predict("ring", many, h100).seconds


def test_masks_benchmark_counts_pairs_and_runs(tmp_path, capsys):
    from benchmarks import masks
    from seqpar.kernels.reference import document_ids
    lengths = masks.document_lengths(4096, 64, 300, seed=3)
    assert sum(lengths) == 4096 and max(lengths) <= 300 and min(lengths) >= 1
    # visible causal pairs against the rule written out (documents, window)
    pos = torch.arange(200)
    cu = masks.cu_seqlens_of([50, 1, 149])
    docs = document_ids(pos, cu)
    causal = pos[None, :] <= pos[:, None]
    assert masks.visible_pairs(200, [50, 1, 149], None) == int(
        (causal & (docs[:, None] == docs[None, :])).sum())
    assert masks.visible_pairs(200, None, 17) == int(
        (causal & (pos[:, None] - pos[None, :] < 17)).sum())
    rows = masks.main(["--world", "2", "--dense-seq", "256", "--docs-seq", "512",
                       "--window-seq", "512", "--window", "64", "--median-doc", "32",
                       "--max-doc", "128", "--backends", "ring", "allgather", "--repeats", "1",
                       "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert {"seqpar ring", "seqpar allgather"} <= methods
    for row in rows:  # every method computes the masked attention (vs a masked SDPA in fp32)
        assert row["diff"] < 1e-5, row
        assert row["pair_cost"] is not None and row["pairs"] > 0
        # the CPU seconds of all ranks (every thread) and their ratio per pair to dense
        assert row["cpu_seconds"] > 0 and row["cpu_pair_cost"] > 0, row
    (result,) = tmp_path.glob("masks-*.json")
    assert (tmp_path / result.name.replace(".json", ".png")).exists()
    assert "pair cost vs dense" in capsys.readouterr().out
