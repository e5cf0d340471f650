"""examples/train_llama.py end to end, as a user runs it: under torchrun, killed and resumed,
and under mpirun -- on packed documents (`--packed`: chapter pieces, positions restarting).

* A 2-rank torchrun run (sequence parallel over 2 ranks) is the reference.
* The same run under `torchrun --max-restarts=1`, one worker SIGKILLed after a checkpoint:
  torchrun restarts the job, which resumes from the last checkpoint written before the kill.
  Every step is committed exactly once (steps 0 .. N-1, none lost, none twice), the restarted
  attempt starts right after that checkpoint, and the losses -- the final one included -- are
  exactly those of the reference: same data per step, restored model and optimizer, the same
  computation (bit for bit; no tolerance is needed, and none is given).
* `mpirun -n 2 python -m examples.train_llama` (mpich from the `mpi` extra) gives exactly the
  reference's losses: the MPI rendezvous leads to the same job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.launch.run import find_mpirun
from tests.test_launch import ROOT, clean_environ

STEPS, CKPT_EVERY = 16, 4
# --packed: each step trains on packed chapter pieces (documents whose positions restart), so
# the crash / resume guarantees are checked on the packed path (shard_batch's documents)
ARGS = ["--steps", str(STEPS), "--seq-len", "256", "--ckpt-every", str(CKPT_EVERY), "--packed"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_example(launcher: list[str], folder: Path, *extra: str) -> subprocess.Popen:
    """Start the example; its output goes to files (a pipe nobody reads while the test polls
    would fill up and stall the job)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "output.txt", "wb") as output:
        return subprocess.Popen(
            [*launcher, "-m", "examples.train_llama", *ARGS, "--ckpt-dir", str(folder / "ckpt"),
             "--events", str(folder / "events.jsonl"), "--out", str(folder / "out.json"), *extra],
            cwd=ROOT, env=clean_environ(), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: a stuck job is ended whole


# Each run gets a limit (the reference run takes about 20 s on the quiet 2-core VM, the killed
# and resumed one about 40 s; the limits leave room for a loaded machine), and the limits of
# one test -- its fixture's set-up included -- add up to less than the pytest-timeout these
# tests are given, so a stuck run is reported here with its output, not cut off by pytest.
REFERENCE_S, KILL_WAIT_S, RUN_S = 180, 120, 240
PYTEST_TIMEOUT_S = 600  # > REFERENCE_S + KILL_WAIT_S + RUN_S


def finish(process: subprocess.Popen, folder: Path, timeout: float = RUN_S) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:  # the launcher and the workers it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = (folder / "output.txt").read_text(errors="replace")
    assert process.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("reference")
    finish(run_example(TORCHRUN, folder), folder, REFERENCE_S)
    result = json.loads((folder / "out.json").read_text())
    assert [step for step, _ in result["losses"]] == list(range(STEPS))
    assert result["packed"]
    assert result["losses"][-1][1] < result["losses"][0][1] - 0.5  # it learns
    return result


@pytest.mark.timeout(PYTEST_TIMEOUT_S)
def test_killed_worker_resumes_from_the_last_checkpoint(reference, tmp_path):
    job = run_example([*TORCHRUN, "--max-restarts=1"], tmp_path)
    log = tmp_path / "events.jsonl"
    deadline = time.monotonic() + KILL_WAIT_S
    victim = None
    while victim is None and time.monotonic() < deadline and job.poll() is None:
        seen = events(log)
        # after the first checkpoint and two more steps, SIGKILL rank 1 of the first attempt
        if any(e["event"] == "step" and e["step"] >= CKPT_EVERY + 1 for e in seen):
            victim = next(e["pid"] for e in seen if e["event"] == "start" and e["rank"] == 1)
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    assert victim is not None, "the run ended (or stalled) before the kill"
    finish(job, tmp_path)

    seen = events(log)
    first = [e for e in seen if e["restart"] == 0]
    second = [e for e in seen if e["restart"] == 1]
    saved = [e["step"] for e in first if e["event"] == "checkpoint"]
    ran_first = [e["step"] for e in first if e["event"] == "step"]
    assert saved and max(ran_first) + 1 > saved[-1]  # work after the checkpoint was lost...
    assert {e["step"] for e in second if e["event"] == "resume"} == {saved[-1]}  # ...resumed
    assert [e["step"] for e in second if e["event"] == "step"] == list(range(saved[-1], STEPS))
    assert {e["rank"] for e in second if e["event"] == "start"} == {0, 1}  # the whole job

    result = json.loads((tmp_path / "out.json").read_text())
    assert result["resumed_from"] == saved[-1]
    assert [step for step, _ in result["losses"]] == list(range(STEPS))  # each step once
    assert result["losses"] == reference["losses"]  # the final loss included


@pytest.mark.timeout(PYTEST_TIMEOUT_S)
def test_mpirun_matches_torchrun(reference, tmp_path):
    mpirun = [find_mpirun(None), "-n", "2", sys.executable]
    finish(run_example(mpirun, tmp_path), tmp_path)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["launcher"] == "mpirun" and result["world"] == 2
    assert result["losses"] == reference["losses"]
