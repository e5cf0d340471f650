"""`seqpar launch` / `python -m seqpar.launch`: start a job, with torchrun or with mpirun.

    python -m seqpar.launch --nproc-per-node 4 train.py --lr 1e-3            # torchrun underneath
    python -m seqpar.launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint head:29400 train.py
    python -m seqpar.launch --mpi --nproc-per-node 4 -m pkg.train            # mpirun -n 4 python -m pkg.train
    python -m seqpar.launch --mpi --dry-run --nnodes 2 --nproc-per-node 8 train.py   # print the line

The parser is torchrun's own (`torch.distributed.run.get_args_parser`) and the torchrun path is
torchrun's `run`: every torchrun option means what it means there (spelled out in full:
abbreviations are off, so the options below are never mistaken for the script's). seqpar adds:

  --mpi        start the ranks with mpirun instead: nnodes x nproc-per-node processes, one per
               rank; `seqpar.launch.init()` in the script rendezvouses over MPI. torchrun's
               elastic options (restarts, rendezvous) do not apply to it.
  --mpirun     the mpirun to use (default: the one next to this Python, where the `mpi` extra
               installs mpich's, else the one on PATH)
  --mpi-args   extra mpirun arguments, one string (e.g. "--hostfile hosts")
  --dry-run    print the command that would run, and exit

On a host without CUDA each rank gets cores / ranks-per-host OpenMP threads unless
OMP_NUM_THREADS is set (torchrun alone would give every rank one thread).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed import run as torchrun

# seqpar's own options: flags, and options that take a value.
_FLAGS = ("--mpi", "--dry-run")
_VALUED = ("--mpirun", "--mpi-args")


def parser() -> argparse.ArgumentParser:
    parse = torchrun.get_args_parser()
    parse.prog = "seqpar launch"
    parse.description = __doc__.splitlines()[0]
    parse.allow_abbrev = False
    ours = parse.add_argument_group("seqpar")
    ours.add_argument("--mpi", action="store_true",
                      help="start the ranks with mpirun (one process per rank) instead of torchrun")
    ours.add_argument("--mpirun", default=None,
                      help="the mpirun executable (default: next to this Python, else on PATH)")
    ours.add_argument("--mpi-args", default="", help="extra mpirun arguments, one string")
    ours.add_argument("--dry-run", action="store_true",
                      help="print the command that would run, and exit")
    return parse


def torchrun_argv(argv: list[str], args: argparse.Namespace) -> list[str]:
    """`argv` without seqpar's options (which all come before the script)."""
    tail = 1 + len(args.training_script_args)
    options, script = argv[:len(argv) - tail], argv[len(argv) - tail:]
    kept, skip = [], False
    for token in options:
        if skip:
            skip = False
        elif token in _FLAGS or token.split("=", 1)[0] in _VALUED:
            skip = token in _VALUED
        else:
            kept.append(token)
    return kept + script


def find_mpirun(requested: str | None) -> str:
    if requested:
        return requested
    beside_python = Path(sys.executable).parent / "mpirun"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpirun")
    if found is None:
        raise SystemExit("seqpar launch --mpi: no mpirun found next to this Python or on PATH; "
                         "pip install 'seqpar[mpi]' (mpi4py and mpich), or pass --mpirun PATH")
    return found


def ranks_per_node_flag(mpirun: str, ranks: int) -> list[str]:
    """How this mpirun places `ranks` processes on each host (Open MPI and Hydra differ)."""
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return ["--npernode", str(ranks)]
    return ["-ppn", str(ranks)]  # MPICH / Hydra, Intel MPI


def mpirun_command(args: argparse.Namespace) -> list[str]:
    min_nodes, nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    if min_nodes != nodes:
        raise SystemExit(f"seqpar launch --mpi: mpirun starts a fixed number of ranks; got "
                         f"--nnodes {args.nnodes}, give one number")
    per_node = torchrun.determine_local_world_size(args.nproc_per_node)
    mpirun = find_mpirun(args.mpirun)
    command = [mpirun, "-n", str(nodes * per_node)]
    if nodes > 1:
        command += ranks_per_node_flag(mpirun, per_node)
    command += shlex.split(args.mpi_args)
    if args.no_python:
        program = [args.training_script]
    elif args.module:
        program = [sys.executable, "-m", args.training_script]
    else:
        program = [sys.executable, args.training_script]
    return command + program + list(args.training_script_args)


def _threads_per_rank(args: argparse.Namespace) -> None:
    """CPU hosts: cores / ranks-per-host OpenMP threads per rank, unless the user chose."""
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    per_node = torchrun.determine_local_world_size(args.nproc_per_node)
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.mpi:
        command = mpirun_command(args)
        if args.dry_run:
            print(shlex.join(command))
            return 0
        _threads_per_rank(args)
        return subprocess.call(command)
    if args.dry_run:
        print(shlex.join([sys.executable, "-m", "torch.distributed.run",
                          *torchrun_argv(argv, args)]))
        return 0
    _threads_per_rank(args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        torchrun.run(args)
    except ChildFailedError as failure:
        print(failure.format_msg(), file=sys.stderr)
        return 1
    return 0


__all__ = ["main", "parser", "mpirun_command", "torchrun_argv"]
