"""Two nodes on one machine: two network namespaces joined by a rate-limited veth pair, with
`torchrun --nnodes 2` across them -- fast loopback inside a node, a slow link between.

    python -m benchmarks.two_nodes                       # 2 nodes x 2 ranks, 1 Gbit/s link
    python -m benchmarks.two_nodes --seqs 2048 4096 --rate 500mbit --repeats 3
    python -m benchmarks.two_nodes --keep-going          # leave nothing behind even on ^C

The testbed (`TwoNodes`, a context manager; needs root, else `TwoNodesUnavailable` says why):

* namespaces `seqpar-node0`, `seqpar-node1`, each with loopback up, joined by the veth pair
  `sp-veth0` (10.203.0.1/24) / `sp-veth1` (10.203.0.2/24);
* both ends shaped with `tc qdisc add dev <veth> root tbf rate <rate> burst 256kb latency
  20ms` (netem is not available here: tbf gives the bandwidth; the latency is the kernel's);
* one `torchrun --nnodes 2 --nproc-per-node N` agent per namespace, c10d rendezvous on
  10.203.0.1 (node 0 hosts the store: `is_host`, as both namespaces share one host name),
  `--local-addr` its own veth address, GLOO_SOCKET_IFNAME set to its veth: ranks
  of one node talk over their veth address (routed through the namespace's loopback), ranks
  of different nodes over the shaped link;
* leftovers of a crashed run are deleted by name first, and everything is deleted again on
  the way out, whatever happened (try/finally; agents run in their own session and are killed
  as a group on timeout).

`run_two_nodes(argv)` runs `python <argv>` as the workers of such a job and returns the agents'
exit codes and output. This module's own workers (`--worker`, started by main) time seqpar's
ring, tokenring, ulysses, allgather and usp (an `SPMesh` with Ulysses inside each node, the
ring across the link) at 2 x N: fwd+bwd time (median over --repeats, slowest rank), bytes per
rank (`seqpar.comm_stats`), exposed communication (`time_waits=True`), the bytes that really
crossed the link (the veth's tx counter, per node), and the cost model's prediction from a
profile calibrated on the same job (its links measured inside and across the "nodes").
Writes JSON + markdown under benchmarks/results/ (two_nodes-<host>-<stamp>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

NAMESPACES = ("seqpar-node0", "seqpar-node1")
VETHS = ("sp-veth0", "sp-veth1")
ADDRESSES = ("10.203.0.1", "10.203.0.2")
RENDEZVOUS_PORT = 29533
REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("ring", "tokenring", "ulysses", "allgather", "usp")


class TwoNodesUnavailable(RuntimeError):
    """The two-node testbed cannot be built here (the message says why and what would fix it)."""


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done


class TwoNodes:
    """The namespaces and the shaped veth pair, built on entry, deleted on exit."""

    def __init__(self, rate: str = "1gbit"):
        self.rate = rate

    @staticmethod
    def check() -> None:
        if os.geteuid() != 0:
            raise TwoNodesUnavailable("the two-node testbed needs root (it creates network "
                                     "namespaces with `ip netns` and shapes a link with `tc`); "
                                     "run it as root, as CI does")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise TwoNodesUnavailable(f"`{tool}` (iproute2) is not installed")

    @staticmethod
    def cleanup() -> None:
        """Delete the namespaces (their veth ends go with them) and any veth left in the root
        namespace, by name; absent ones are fine."""
        present = _run("ip", "netns", "list", check=False).stdout
        for namespace in NAMESPACES:
            if namespace in present.split():
                _run("ip", "netns", "del", namespace, check=False)
        for veth in VETHS:
            if _run("ip", "link", "show", veth, check=False).returncode == 0:
                _run("ip", "link", "del", veth, check=False)

    def __enter__(self) -> "TwoNodes":
        self.check()
        self.cleanup()  # leftovers of a crashed run
        try:
            for namespace in NAMESPACES:
                _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", VETHS[0], "type", "veth", "peer", "name", VETHS[1])
            for namespace, veth, address in zip(NAMESPACES, VETHS, ADDRESSES):
                _run("ip", "link", "set", veth, "netns", namespace)
                inside = ("ip", "netns", "exec", namespace)
                _run(*inside, "ip", "addr", "add", f"{address}/24", "dev", veth)
                _run(*inside, "ip", "link", "set", "lo", "up")
                _run(*inside, "ip", "link", "set", veth, "up")
                _run(*inside, "tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate",
                     self.rate, "burst", "256kb", "latency", "20ms")
        except RuntimeError as error:
            self.cleanup()
            raise TwoNodesUnavailable(f"could not build the two-node testbed: {error}") from error
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _agent(node: int, nproc: int, argv: list[str], run_id: str) -> list[str]:
    return ["ip", "netns", "exec", NAMESPACES[node], "env", f"GLOO_SOCKET_IFNAME={VETHS[node]}",
            f"PYTHONPATH={REPO}", "OMP_NUM_THREADS=1", sys.executable, "-m",
            "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRESSES[0]}:{RENDEZVOUS_PORT}",
            "--rdzv-id", run_id, "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}",
            "--local-addr", ADDRESSES[node], "--max-restarts", "0", *argv]


def run_two_nodes(argv: list[str], nproc_per_node: int = 2, rate: str = "1gbit",
                  timeout: float = 300.0) -> list[tuple[int, str]]:
    """Run `python <argv>` (e.g. ["-m", "pkg.module", ...]) as the workers of a 2-node torchrun
    job on the testbed; returns (exit code, output) of each node's agent. The testbed is
    torn down whatever happens; on timeout the agents and their workers are killed."""
    run_id = uuid.uuid4().hex[:12]
    with TwoNodes(rate):
        agents = [subprocess.Popen(_agent(node, nproc_per_node, argv, run_id), cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True) for node in range(2)]
        try:
            deadline = time.monotonic() + timeout
            outputs = []
            for agent in agents:
                try:
                    out, _ = agent.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill(agents)
                    out = agent.communicate()[0] + f"\n(killed after {timeout:.0f} s)"
                outputs.append((agent.returncode, out))
            return outputs
        finally:
            _kill(agents)


def _kill(agents: list[subprocess.Popen]) -> None:
    """The agents we started and everything in their sessions (their workers)."""
    for agent in agents:
        if agent.poll() is None:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            agent.wait()


# ---------------------------------------------------------------- the benchmark's workers

def _tx_bytes(interface: str) -> int:
    """Bytes this namespace sent on `interface` (the link between the nodes)."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def worker(args: argparse.Namespace) -> None:
    """One rank of the two-node job (started by torchrun inside a namespace)."""
    import torch
    import torch.distributed as dist

    import seqpar
    import seqpar.cost

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = world // 2
    interface = VETHS[0] if os.path.exists(f"/sys/class/net/{VETHS[0]}") else VETHS[1]
    profile = seqpar.cost.calibrate(head_dims=(args.dim,), repeats=2)
    mesh = seqpar.SPMesh(ulysses=local_world)  # Ulysses inside a node, ring across
    rows = []
    for seq in args.seqs:
        gen = torch.Generator().manual_seed(seq)
        q, k, v, do = (seqpar.shard(torch.randn(1, seq, h, args.dim, generator=gen))
                       for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
        for backend in BACKENDS:
            group = mesh if backend == "usp" else None
            times, link_bytes = [], []
            for repeat in range(args.repeats + 2):  # a warm-up, the repeats, one timing waits
                q_l, k_l, v_l = (t.clone().requires_grad_() for t in (q, k, v))
                dist.barrier()
                before = _tx_bytes(interface)
                start = time.perf_counter()
                with seqpar.comm_stats(time_waits=repeat == args.repeats + 1) as stats:
                    seqpar.attention(q_l, k_l, v_l, group, backend=backend).backward(do)
                seconds = time.perf_counter() - start
                dist.barrier()  # every rank done: the node's link counter holds the call's bytes
                if 1 <= repeat <= args.repeats:
                    times.append(seconds)
                    link_bytes.append(_tx_bytes(interface) - before)
            measured = torch.tensor([statistics.median(times), stats.sent(backend),
                                     stats.waited(), min(link_bytes)], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
            problem = seqpar.cost.Problem(batch=1, seq_len=seq, heads_q=args.heads,
                                          heads_kv=args.kv_heads, head_dim=args.dim,
                                          world=world, itemsize=4,
                                          ulysses=local_world if backend == "usp" else None)
            predicted = seqpar.cost.predict(backend, problem, profile)
            rows.append({"backend": backend, "S": seq, "seconds": measured[0].item(),
                         "sent_bytes": int(measured[1].item()),
                         "exposed_s": measured[2].item(),
                         "link_bytes_per_node": int(measured[3].item()),
                         "predicted_s": predicted.seconds,
                         "predicted_inter_bytes": predicted.fwd.sent.inter_bytes
                         + predicted.bwd.sent.inter_bytes})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"rows": rows, "profile": profile.to_json(),
                                              "world": world, "nodes": 2}, indent=2))
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="1gbit", help="tc rate of the link between the nodes")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.worker:
        worker(args)
        return

    from benchmarks.common import header_text, machine, markdown_table, mib, results_stem, table

    info = machine()
    print(header_text(info), flush=True)
    try:
        TwoNodes.check()
    except TwoNodesUnavailable as why:
        print(f"# skipped: {why}")
        return
    with tempfile.TemporaryDirectory(prefix="seqpar-two-nodes-") as folder:
        result = Path(folder) / "result.json"
        outputs = run_two_nodes(
            ["-m", "benchmarks.two_nodes", "--worker", "--seqs", *map(str, args.seqs),
             "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--dim",
             str(args.dim), "--repeats", str(args.repeats), "--out", str(result)],
            args.nproc_per_node, args.rate, args.timeout)
        if any(code for code, _ in outputs) or not result.exists():
            for node, (code, out) in enumerate(outputs):
                print(f"--- node {node} (exit {code}) ---\n{out[-4000:]}", file=sys.stderr)
            raise SystemExit("the two-node job failed")
        payload = json.loads(result.read_text())
    rows = payload["rows"]
    for row in rows:
        row["sent_mib"], row["link_mib"] = mib(row["sent_bytes"]), mib(row["link_bytes_per_node"])
        row["predicted_inter_mib"] = mib(row["predicted_inter_bytes"])
        row["exposed_ms"], row["predicted_ms"] = 1e3 * row["exposed_s"], 1e3 * row["predicted_s"]
    nic = payload["profile"]["nic"]
    title = (f"2 nodes x {args.nproc_per_node} ranks (network namespaces, veth shaped to "
             f"{args.rate}; measured across: {nic['bandwidth'] * 8 / 1e9:.2f} Gbit/s, "
             f"{nic['latency'] * 1e3:.2f} ms), causal fwd+bwd, B=1, H={args.heads}, "
             f"Hkv={args.kv_heads}, D={args.dim}, fp32, zigzag; usp: Ulysses inside a node, "
             f"ring across; median of {args.repeats}")
    columns = [("S", "S", "d"), ("backend", "backend", "s"), ("seconds", "fwd+bwd s", ".3f"),
               ("exposed_ms", "exposed comm ms", ".0f"), ("sent_mib", "sent MiB/rank", ".1f"),
               ("link_mib", "MiB over the link per node", ".1f"),
               ("predicted_inter_mib", "model: MiB across, busiest rank", ".1f"),
               ("predicted_ms", "model ms", ".0f")]
    print(f"# {title}")
    print(table(rows, columns))
    stem = results_stem("two_nodes", args.out)
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args),
                                                     **payload}, indent=2, default=str))
    stem.with_suffix(".md").write_text(f"# Two nodes on one machine ({info['date']})\n\n"
                                       f"{header_text(info)}\n\n{title}.\n\n"
                                       f"{markdown_table(rows, columns)}\n")
    print(f"# wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
