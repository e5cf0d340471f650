"""A pool of long-lived gloo worlds for multi-process tests.

`World(size)` spawns `size` CPU processes once; each initialises a gloo process group and then
serves cases: `world.run(fn, *args)` sends the module-level function `fn` (pickled by name) to
every rank, runs it there, and returns the per-rank results in rank order. `World(size, env=...)`
sets extra environment variables in each process before it imports anything (e.g.
TRITON_INTERPRET=1, which triton reads when a kernel module is imported), leaving the test
process's own environment untouched.

It never hangs the suite:
* every case has a wall-clock `timeout`; past it the world is killed (and respawned on next use);
* when one rank raises, the others get `grace` seconds to finish (they are usually stuck in a
  collective waiting for the failed rank), then the world is killed; the test fails with every
  rank's traceback;
* the process group itself has a finite collective timeout as a second line of defence;
* every case carries an id, and so does every result: a result of another case (a late answer
  of an earlier, interrupted case) is an error, never credited to the case being collected;
* a `run` interrupted from outside (pytest-timeout's signal, Ctrl-C: anything raised while it
  collects) kills its world and marks it broken, so no later case can meet its leftovers.

Timeouts are layered below pytest-timeout's 300 s per test (set-up included): a world starts
within `start_timeout_s` (60 s) and a case within its `timeout` (120 s by default), so a stuck
world is reported by the harness, with every rank's state, before pytest interrupts the test.
"""

from __future__ import annotations

import datetime
import itertools
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback


READY = 0  # the case id of the start-up handshake; cases count from 1


class StaleResult(AssertionError):
    """A result arrived for another case than the one being collected."""


class RankFailure(AssertionError):
    """A case failed on at least one rank (message: each failing rank's traceback)."""


class WorldTimeout(AssertionError):
    """A case did not finish on every rank within its timeout."""


def _serve(rank: int, size: int, store_path: str, tasks, results, path: list[str],
           threads: int, collective_timeout_s: float, env: dict[str, str]) -> None:
    sys.path[:] = path
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    results.put((rank, READY, "ok", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        case_id, fn, args, kwargs = item
        try:
            results.put((rank, case_id, "ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors
            results.put((rank, case_id, "error", traceback.format_exc()))
    dist.destroy_process_group()


class World:
    """`size` gloo ranks on CPU, kept alive across many cases."""

    def __init__(self, size: int, threads: int = 1, collective_timeout_s: float = 60.0,
                 start_timeout_s: float = 60.0, env: dict[str, str] | None = None):
        self.size = size
        self.broken = False
        self._case_ids = itertools.count(READY + 1)
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix=f"seqpar-world{size}-")
        self._tasks = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, daemon=True,
                        args=(rank, size, os.path.join(self._dir, "store"), self._tasks[rank],
                              self._results, list(sys.path), threads, collective_timeout_s,
                              dict(env or {})))
            for rank in range(size)]
        for p in self._procs:
            p.start()
        self._collect_or_kill(READY, "ready", start_timeout_s, grace=start_timeout_s)

    def _collect_or_kill(self, case_id: int, what: str, timeout: float, grace: float) -> list:
        """`_collect`, and whatever interrupts it (a failure, a timeout, pytest-timeout's signal
        or Ctrl-C) kills the world: its ranks may still be running the case or hold its late
        results, which no later case may see."""
        done = False
        try:
            values = self._collect(case_id, what, timeout, grace)
            done = True
            return values
        finally:
            if not done:
                self.close(kill=True)

    def _collect(self, case_id: int, what: str, timeout: float, grace: float) -> list:
        values: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(values) + len(errors) < self.size:
            if errors:
                deadline = min(deadline, first_error_at + grace)
            remaining = deadline - time.monotonic()
            try:
                rank, result_id, status, value = self._results.get(
                    timeout=max(0.01, min(remaining, 1.0)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead and not errors:
                    errors.update({r: f"rank {r} process died (exit code {self._procs[r].exitcode})"
                                   for r in dead if r not in values})
                    first_error_at = time.monotonic()
                if time.monotonic() >= deadline:
                    break
                continue
            if result_id != case_id:
                raise StaleResult(f"rank {rank} answered case #{result_id} while case #{case_id} "
                                  f"({what!r}) was being collected; the world is killed")
            if status == "error":
                if not errors:
                    first_error_at = time.monotonic()
                errors[rank] = value
            else:
                values[rank] = value
        missing = [r for r in range(self.size) if r not in values and r not in errors]
        if errors or missing:
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            if missing:
                report += f"\nranks {missing} did not finish ({what})"
            raise (RankFailure if errors else WorldTimeout)(
                f"case {what!r} failed on a {self.size}-rank world:\n{report}")
        return [values[r] for r in range(self.size)]

    def run(self, fn, *args, timeout: float = 120.0, grace: float = 10.0, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; per-rank return values in rank order."""
        if self.broken:
            raise RuntimeError("this world was killed by an earlier failure")
        case_id = next(self._case_ids)
        for q in self._tasks:
            q.put((case_id, fn, args, kwargs))
        return self._collect_or_kill(case_id, getattr(fn, "__name__", str(fn)), timeout, grace)

    def close(self, kill: bool = False) -> None:
        if not kill and not self.broken:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        self.broken = True
        shutil.rmtree(self._dir, ignore_errors=True)


class WorldPool:
    """One live world per size; a world that failed is replaced on next use."""

    def __init__(self, **options):
        self._options = options
        self._worlds: dict[int, World] = {}

    def __call__(self, size: int) -> World:
        world = self._worlds.get(size)
        if world is None or world.broken:
            world = self._worlds[size] = World(size, **self._options)
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
