"""Shared pieces of the benchmark CLIs: machine header, launching ranks, timing, peak memory,
tables, output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from seqpar.cost.calibrate import timed  # noqa: F401 - the benchmarks time with it too

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def header_text(info: dict) -> str:
    return (f"# host {info['host']} | cores {info['cores']} | torch {info['torch']} | "
            f"triton {info['triton']} | device {info['device']} | commit {info['commit']} | "
            f"{info['date']}")


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@dataclass
class PeakMemory:
    """Peak memory a block added on this rank, in bytes (CUDA: allocator; CPU: resident set)."""

    bytes: int = 0


def _glibc():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """CUDA: max_memory_allocated over the block minus what was allocated before.

    CPU (Linux): the kernel's resident-set high-water mark, reset at entry through
    /proc/self/clear_refs, minus the resident set at entry. For the resident set to follow
    live tensors, glibc must return freed memory: a fixed 64 KiB mmap threshold (large
    buffers are mmapped and unmapped on free, instead of lingering in the heap after a first
    free raised the dynamic threshold) and a malloc_trim at entry.
    """
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - base
        return
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    base = _read_status_kib("VmRSS")
    yield result
    result.bytes = max(0, _read_status_kib("VmHWM") - base) * 1024


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, title, format). Returns aligned text."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else format(row[key], fmt))
                      for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_stem(name: str, folder: Path | None = None) -> Path:
    """<folder>/<name>-<host>-<date-time>: where a run's files go, named by machine and date."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return folder / f"{name}-{socket.gethostname()}-{stamp}"


def write_json(name: str, payload: dict, folder: Path | None = None) -> Path:
    path = results_stem(name, folder).with_suffix(".json")
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def write_csv(path: Path, rows: Sequence[dict], keys: Sequence[str]) -> Path:
    """The `keys` of every row as CSV (empty cells for missing values)."""
    import csv
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(keys)
        for row in rows:
            writer.writerow(["" if row.get(key) is None else row[key] for key in keys])
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, title, format), as `table`; returns a GitHub markdown table."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(key) is None else format(row[key], fmt)
                                       for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, folder, plot) -> Path:
    """Write the JSON (`write_json`) and, next to it, the PNG `plot(payload["rows"], path)`
    draws; say where."""
    path = write_json(name, payload, folder)
    plot(payload["rows"], path.with_suffix(".png"))
    print(f"# wrote {path} and {path.with_suffix('.png').name}")
    return path


def save_figure(fig, stem: Path, suffix: str) -> str:
    """Write `fig` to <stem>.<suffix>.png, close it, return the file name."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}.{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def start_rank(config: dict) -> tuple[int, int, torch.device, torch.dtype]:
    """Inside a launched rank: join the gloo group, take `config["threads"]` threads; returns
    (rank, world, device, dtype of config["dtype"])."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(config["threads"])
    dtype = getattr(torch, config["dtype"])
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu"), dtype


def launch(world: int, worker: Callable[[dict], list[dict]], config: dict) -> list[dict]:
    """Run `worker(config)` on `world` CPU ranks with torchrun's machinery (elastic_launch);
    returns rank 0's result. `config["threads"]` is each rank's thread count."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world,
                                 run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                                 rdzv_endpoint="localhost:0", max_restarts=0,
                                 monitor_interval=0.1, start_method="spawn")
    # Like torchrun: one OpenMP thread pool of the rank's size (an unset OMP_NUM_THREADS lets
    # every rank's runtime size itself to all cores, oversubscribing the machine).
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(config["threads"])
    try:
        return elastic_launch(launch_config, worker)(config)[0]
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
