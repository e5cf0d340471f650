"""Join the distributed job this process was started in, whichever launcher started it.

This package is the only code in seqpar that reads launcher environment variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT, OMPI_COMM_WORLD_*, PMI_*, SLURM_*).

    job = seqpar.launch.init(timeout=600)
    job.rank, job.world, job.local_rank, job.device     # e.g. 3, 8, 1, device("cuda", 1)

Launchers, recognised in this order (`detect`):

* torchrun, or any env:// launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* mpirun (Open MPI, MPICH / Hydra, Intel MPI, PMIx): rank and size from mpi4py's COMM_WORLD,
  the local rank from its shared-memory split; rank 0 picks a free port on its host and
  broadcasts its address and the port over MPI (127.0.0.1 when every rank is on its host).
* srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE; the
  address is the first host of SLURM_STEP_NODELIST and the port is derived from the job and
  step ids, so every task computes the same pair without talking (MASTER_ADDR / MASTER_PORT,
  when set, win). A batch script itself (no step) is not an srun launch.
* none of them: a one-process job (an in-memory store, no port).

The backend is nccl when CUDA is available (device cuda:LOCAL_RANK, set as the current
device), gloo otherwise (device cpu); the collective timeout is always finite. After the mpirun
and srun paths the torchrun variables are exported (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as DeepSpeed and other libraries expect, with
SEQPAR_LAUNCHER naming the launcher (for every launcher). Calling `init` again returns the same `Job` and
initialises nothing.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCHERS = ("torchrun", "mpirun", "srun", "single")
DEFAULT_TIMEOUT_S = 600.0

# Any of these in the environment means an MPI launcher started this process.
_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class Job:
    """Where this process sits in the launched job."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str
    launcher: str  # one of LAUNCHERS, or "external" (a process group someone else started)
    restart: int = 0  # how many times torchrun restarted the job (0 for other launchers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Rendezvous:
    """What a launcher tells this process: its place, and where rank 0 listens."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    addr: str
    port: int


def detect(environ: Mapping[str, str]) -> str:
    """Which launcher started this process, from its environment."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if any(name in environ for name in _MPI_MARKERS):
        return "mpirun"
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return "srun"
    return "single"


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"seqpar.launch: {name} is not set, but the other variables of its "
                             f"launcher are; start the job with the launcher's own command")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"seqpar.launch: {name}={value!r} is not an integer") from None


def torchrun_rendezvous(environ: Mapping[str, str]) -> Rendezvous:
    world = _int(environ, "WORLD_SIZE")
    return Rendezvous(_int(environ, "RANK"), world, _int(environ, "LOCAL_RANK", 0),
                      _int(environ, "LOCAL_WORLD_SIZE", world),
                      environ.get("MASTER_ADDR", "127.0.0.1"), _int(environ, "MASTER_PORT", 29500))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: "gpu[07-09,12],cpu1" -> "gpu07"; brackets in
    several places ("rack[1-2]-n[01-04]") take the first value of each."""
    host, depth, taking = [], 0, True
    for char in nodelist:
        if char == "[":
            depth, taking = depth + 1, True
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            break
        elif depth and char in ",-":
            taking = False  # the rest of this bracket is further values
        elif taking or not depth:
            host.append(char)
    return "".join(host)


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def srun_rendezvous(environ: Mapping[str, str]) -> Rendezvous:
    world = _int(environ, "SLURM_STEP_NUM_TASKS")
    counts = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or str(world))
    node = _int(environ, "SLURM_NODEID", 0)
    local_world = counts[node] if node < len(counts) else world
    addr = environ.get("MASTER_ADDR") or first_host(
        environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    # The same port on every task without talking: from the job and step ids (two steps of
    # one job running at once get different ports).
    port = _int(environ, "MASTER_PORT", 12000 + (_int(environ, "SLURM_JOB_ID", 0) * 31
                                                  + _int(environ, "SLURM_STEP_ID", 0)) % 20000)
    return Rendezvous(_int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID", 0),
                      local_world, addr, port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def mpi_rendezvous(environ: Mapping[str, str]) -> Rendezvous:
    """Rank and size from COMM_WORLD; rank 0's address and a free port of its, broadcast."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("seqpar.launch: this process was started by mpirun, which needs "
                           "mpi4py to rendezvous; pip install 'seqpar[mpi]' (mpi4py and mpich)"
                           ) from None
    world_comm = MPI.COMM_WORLD
    node_comm = world_comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    local_rank, local_world = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    endpoint = None
    if rank == 0:
        addr = environ.get("MASTER_ADDR") or ("127.0.0.1" if local_world == world
                                              else socket.getfqdn())
        endpoint = (addr, _int(environ, "MASTER_PORT", 0) or free_port())
    addr, port = world_comm.bcast(endpoint, root=0)
    return Rendezvous(rank, world, local_rank, local_world, addr, port)


def _timeout(timeout) -> datetime.timedelta:
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"seqpar.launch.init: timeout must be a positive, finite number of "
                         f"seconds (or a timedelta), got {timeout!r}; a collective that waits "
                         f"forever hides the rank that failed")
    return datetime.timedelta(seconds=seconds)


def _backend(backend: str | None) -> str:
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"seqpar.launch.init: backend={backend!r}; choose None (nccl on CUDA, "
                         f"gloo otherwise), 'nccl' or 'gloo'")
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ValueError("seqpar.launch.init: backend='nccl' needs CUDA, which is not available "
                         "here; use backend='gloo' (or None)")
    return backend or ("nccl" if cuda else "gloo")


def _device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"seqpar.launch.init: local rank {local_rank} has no GPU (this host "
                         f"has {torch.cuda.device_count()}); start at most that many ranks per "
                         f"host")
    return torch.device("cuda", local_rank)


def _rendezvous(launcher: str, environ: Mapping[str, str]) -> Rendezvous:
    if launcher == "torchrun":
        return torchrun_rendezvous(environ)
    if launcher == "mpirun":
        return mpi_rendezvous(environ)
    if launcher == "srun":
        return srun_rendezvous(environ)
    return Rendezvous(0, 1, 0, 1, "", 0)


def _joined(environ: Mapping[str, str]) -> Job:
    """The Job of a process whose group is already initialised (by an earlier `init`, which
    exported the torchrun variables, or by someone else)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    launcher = environ.get("SEQPAR_LAUNCHER") or ("torchrun" if detect(environ) == "torchrun"
                                                  else "external")
    local_rank = _int(environ, "LOCAL_RANK", rank)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return Job(rank, world, local_rank, local_world, device, backend, launcher,
               _int(environ, "TORCHELASTIC_RESTART_COUNT", 0))


def init(timeout: float | datetime.timedelta = DEFAULT_TIMEOUT_S, backend: str | None = None
         ) -> Job:
    """Join the job (torchrun, mpirun, srun, or none: one process); see the module docstring.

    timeout: the collective timeout in seconds (or a timedelta), finite. backend: None picks
    nccl on CUDA and gloo otherwise. Returns this process's `Job`; a second call returns it
    again without initialising anything.
    """
    wait, backend = _timeout(timeout), _backend(backend)
    environ = os.environ
    if dist.is_initialized():
        return _joined(environ)
    launcher = detect(environ)
    place = _rendezvous(launcher, environ)
    device = _device(place.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ["SEQPAR_LAUNCHER"] = launcher
    if launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=wait)
    else:
        if launcher != "torchrun":
            # Where torchrun would have put them: env:// below reads them, and so do DeepSpeed
            # and the other libraries that look for a torchrun-style launch.
            os.environ.update({name: str(value) for name, value in (
                ("RANK", place.rank), ("WORLD_SIZE", place.world),
                ("LOCAL_RANK", place.local_rank), ("LOCAL_WORLD_SIZE", place.local_world),
                ("MASTER_ADDR", place.addr), ("MASTER_PORT", place.port))})
        device_id = device if backend == "nccl" else None
        if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store for the whole job: a restarted attempt would
            # find the dead attempt's connection keys there (and dial its closed ports), so
            # each attempt gets keys of its own.
            store = dist.PrefixStore(
                f"seqpar/attempt{_int(environ, 'TORCHELASTIC_RESTART_COUNT', 0)}/",
                dist.TCPStore(place.addr, place.port, place.world, is_master=False,
                              timeout=wait))
            dist.init_process_group(backend, store=store, rank=place.rank,
                                    world_size=place.world, timeout=wait, device_id=device_id)
        else:
            dist.init_process_group(backend, init_method="env://", rank=place.rank,
                                    world_size=place.world, timeout=wait, device_id=device_id)
    return Job(place.rank, place.world, place.local_rank, place.local_world, device, backend,
               launcher, _int(environ, "TORCHELASTIC_RESTART_COUNT", 0))


__all__ = ["Job", "Rendezvous", "LAUNCHERS", "init", "detect", "first_host", "tasks_per_node",
           "torchrun_rendezvous", "srun_rendezvous", "mpi_rendezvous"]
