"""seqpar.launch: which launcher started a process and what it says (pure functions of the
environment), jobs really started by torchrun, mpirun and (simulated) srun through `init`, the
`seqpar launch` front (torchrun's parser, --mpi, --dry-run), the `seqpar` command, and the rule
that nothing outside seqpar/launch/ reads launcher variables."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from seqpar import cli
from seqpar.launch import env as launch_env
from seqpar.launch import run as launch_run

ROOT = Path(__file__).resolve().parent.parent
_LAUNCHER_VARIABLES = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|"
                                 r"MASTER_PORT|OMPI_.*|PMI_.*|PMIX_.*|MPI_LOCAL.*|HYDRA_.*|"
                                 r"SLURM_.*|SEQPAR_LAUNCHER|TORCHELASTIC_.*|OMP_NUM_THREADS)$")


def clean_environ(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (so the test sees only its own
    launcher), with the repository importable."""
    environ = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARIABLES.match(k)}
    return {**environ, "PYTHONPATH": str(ROOT), **extra}


def read_ranks(out: Path, world: int) -> list[dict]:
    views = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, view in enumerate(views):
        assert view["rank"] == view["dist_rank"] == rank and view["world"] == view["dist_world"]
        assert view["again_same"], view  # a second init returned the same Job
        assert view["rank_sum"] == world * (world + 1) / 2  # the group works
    return views


# ---------------------------------------------------------------- detection (no processes)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "head", "MASTER_PORT": "29400"}
SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
        "SLURM_STEP_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "2",
        "SLURM_NTASKS": "7"}


@pytest.mark.parametrize("environ, launcher", [
    (TORCHRUN, "torchrun"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, "mpirun"),
    ({"PMI_SIZE": "2", "PMI_RANK": "0", "MPI_LOCALNRANKS": "2"}, "mpirun"),   # MPICH / Hydra
    ({"PMIX_RANK": "0"}, "mpirun"),
    (SRUN, "srun"),
    ({**SRUN, "PMI_SIZE": "7"}, "mpirun"),      # mpirun inside a Slurm allocation: MPI decides
    ({**SRUN, **TORCHRUN}, "torchrun"),          # torchrun inside srun: torchrun's ranks
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, "single"),  # batch script
    ({}, "single"),
])
def test_detect(environ, launcher):
    assert launch_env.detect(environ) == launcher


def test_torchrun_rendezvous():
    assert launch_env.torchrun_rendezvous(TORCHRUN) == launch_env.Rendezvous(3, 8, 1, 4, "head", 29400)


def test_srun_rendezvous():
    place = launch_env.srun_rendezvous(SRUN)
    # node 2 runs 2 tasks; rank 0 listens on the first host; the port comes from the ids
    assert place == launch_env.Rendezvous(5, 7, 1, 2, "gpu07", 12000 + (123456 * 31 + 2) % 20000)
    chosen = launch_env.srun_rendezvous({**SRUN, "MASTER_ADDR": "login", "MASTER_PORT": "2222"})
    assert (chosen.addr, chosen.port) == ("login", 2222)


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[07-09,12]", "gpu07"), ("node5", "node5"), ("a-b,c-d", "a-b"),
    ("rack[1-2]-n[01-04],x", "rack1-n01"), ("n[3,1]", "n3"), ("pre[10-11]post,q", "pre10post"),
])
def test_first_host(nodelist, host):
    assert launch_env.first_host(nodelist) == host


def test_tasks_per_node():
    assert launch_env.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launch_env.tasks_per_node("4") == [4]


def test_bad_launcher_values_are_clear():
    with pytest.raises(ValueError, match=r"WORLD_SIZE='eight' is not an integer"):
        launch_env.torchrun_rendezvous({**TORCHRUN, "WORLD_SIZE": "eight"})
    with pytest.raises(ValueError, match=r"SLURM_STEP_NUM_TASKS is not set"):
        launch_env.srun_rendezvous({"SLURM_PROCID": "0"})


@pytest.mark.parametrize("timeout", [None, 0, -5, float("inf"), float("nan"), True, "60"])
def test_init_needs_a_finite_timeout(timeout):
    with pytest.raises(ValueError, match=r"timeout must be a positive, finite number of seconds"):
        launch_env.init(timeout=timeout)


def test_init_rejects_unknown_or_impossible_backends():
    with pytest.raises(ValueError, match=r"backend='mpi'; choose None"):
        launch_env.init(backend="mpi")
    if not launch_env.torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA"):
            launch_env.init(backend="nccl")


# ---------------------------------------------------------------- real launches

def test_single_process(tmp_path):
    """No launcher: a one-process group (no port), twice harmless."""
    subprocess.run([sys.executable, "-m", "tests.launch_probe", str(tmp_path)], cwd=ROOT,
                   env=clean_environ(), check=True, timeout=120)
    (view,) = read_ranks(tmp_path, 1)
    assert (view["launcher"], view["local_rank"], view["device"], view["backend"]) == \
        ("single", 0, "cpu", "gloo")


def test_torchrun_through_seqpar_launch(tmp_path):
    """`python -m seqpar.launch` runs torchrun; each rank's Job is what torchrun said; CPU ranks
    share the cores (OMP_NUM_THREADS = cores // ranks)."""
    subprocess.run([sys.executable, "-m", "seqpar.launch", "--nproc-per-node", "2", "-m",
                    "tests.launch_probe", str(tmp_path)], cwd=ROOT, env=clean_environ(),
                   check=True, timeout=180)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for rank, view in enumerate(read_ranks(tmp_path, 2)):
        assert (view["launcher"], view["local_rank"], view["local_world"]) == ("torchrun", rank, 2)
        assert view["exported"]["OMP_NUM_THREADS"] == threads


def test_mpirun_through_seqpar_launch(tmp_path):
    """`seqpar launch --mpi` runs mpirun; ranks come from MPI, the port from rank 0's
    broadcast, and the torchrun variables are exported for other libraries."""
    subprocess.run([sys.executable, "-m", "seqpar.launch", "--mpi", "--nproc-per-node", "2",
                    "-m", "tests.launch_probe", str(tmp_path)], cwd=ROOT, env=clean_environ(),
                   check=True, timeout=180)
    for rank, view in enumerate(read_ranks(tmp_path, 2)):
        assert (view["launcher"], view["local_rank"], view["local_world"]) == ("mpirun", rank, 2)
        assert view["exported"] == {**view["exported"], "RANK": str(rank), "WORLD_SIZE": "2",
                                    "LOCAL_RANK": str(rank), "SEQPAR_LAUNCHER": "mpirun"}


def test_srun_variables(tmp_path):
    """What srun sets, by hand (no Slurm here): two tasks on one node find each other."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tasks = [subprocess.Popen(
        [sys.executable, "-m", "tests.launch_probe", str(tmp_path)], cwd=ROOT,
        env=clean_environ(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                          SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                          SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="77",
                          SLURM_STEP_ID="0", MASTER_PORT=str(port)))
        for rank in range(2)]
    assert [task.wait(timeout=120) for task in tasks] == [0, 0]
    for rank, view in enumerate(read_ranks(tmp_path, 2)):
        assert (view["launcher"], view["local_rank"], view["local_world"]) == ("srun", rank, 2)


# ---------------------------------------------------------------- the front, dry

def dry_run(argv: list[str], capsys) -> list[str]:
    assert launch_run.main(argv) == 0
    return shlex.split(capsys.readouterr().out)


def test_dry_run_torchrun_keeps_the_scripts_arguments(capsys):
    """seqpar's own options go; torchrun's stay; everything after the script is the script's
    (even a --mpi there)."""
    printed = dry_run(["--nproc-per-node", "2", "--dry-run", "--max-restarts=1", "-m",
                       "pkg.train", "--mpi", "--lr", "1"], capsys)
    assert printed == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--max-restarts=1", "-m", "pkg.train", "--mpi", "--lr", "1"]


def test_dry_run_mpi(capsys):
    printed = dry_run(["--mpi", "--dry-run", "--nproc-per-node", "3", "--mpirun", "/opt/mpirun",
                       "--mpi-args", "--hostfile hosts", "-m", "pkg.train", "--lr", "1"], capsys)
    assert printed == ["/opt/mpirun", "-n", "3", "--hostfile", "hosts", sys.executable, "-m",
                       "pkg.train", "--lr", "1"]
    printed = dry_run(["--mpi", "--dry-run", "--nnodes", "2", "--nproc-per-node", "4",
                       "train.py"], capsys)
    assert printed[1:5] == ["-n", "8", "-ppn", "4"]  # mpich's Hydra: 4 ranks per host
    assert printed[-2:] == [sys.executable, "train.py"]


def test_mpi_needs_a_fixed_node_count():
    with pytest.raises(SystemExit, match=r"mpirun starts a fixed number of ranks; got --nnodes 1:2"):
        launch_run.main(["--mpi", "--nnodes", "1:2", "--nproc-per-node", "2", "train.py"])


# ---------------------------------------------------------------- the seqpar command

def test_seqpar_command(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0 and re.search(r"launch\s+start a job", capsys.readouterr().out)
    assert cli.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: " in out and "ring" in out and "transformers" in out
    assert cli.main(["launch", "--dry-run", "--nproc-per-node", "2", "x.py"]) == 0
    assert shlex.split(capsys.readouterr().out)[-3:] == ["--nproc-per-node", "2", "x.py"]


def test_only_launch_reads_launcher_variables():
    """The package's rule: launcher environment variables are read in seqpar/launch/ only."""
    names = re.compile(r"""["'](RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|"""
                       r"""MASTER_PORT|OMPI_\w*|PMI_\w*|PMIX_\w*|SLURM_\w*)["']""")
    package = ROOT / "seqpar"
    offenders = [str(path.relative_to(ROOT)) for path in package.rglob("*.py")
                 if package / "launch" not in path.parents and names.search(path.read_text())]
    assert offenders == []
    assert names.search((package / "launch" / "env.py").read_text())  # the scan does see them


def joined_view() -> dict:
    from seqpar.launch import init
    job = init(timeout=60)  # the harness started the group: nothing to initialise
    return {"rank": job.rank, "world": job.world, "launcher": job.launcher,
            "backend": job.backend, "same": init(timeout=60) == job}


def test_init_inside_a_group_someone_else_started(worlds):
    views = worlds(2).run(joined_view)
    assert [(v["rank"], v["world"]) for v in views] == [(0, 2), (1, 2)]
    assert all(v["backend"] == "gloo" and v["same"] for v in views)
    assert all(v["launcher"] in ("external", "torchrun") for v in views)  # torchrun if under it
