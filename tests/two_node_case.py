"""The worker of tests/test_two_nodes.py, run by torchrun on the two-node testbed
(`benchmarks.two_nodes`): every backend against the float64 reference across the two "nodes"
(usp: Ulysses inside a node, the ring across), output, lse and every gradient on every rank,
bytes against the formulas; each rank writes what it found to <folder>/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import seqpar
from seqpar.cost.traffic import backend_volume
from tests.attention_cases import AttnCase, problem_of, run_case

BACKENDS = ("ring", "tokenring", "ulysses", "allgather", "usp")


def main(folder: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = world // 2
    mesh = seqpar.SPMesh(ulysses=local)
    found = {"namespace": os.stat("/proc/self/ns/net").st_ino, "backends": {}}
    for backend in BACKENDS:
        case = AttnCase(backend=backend, layout="zigzag", heads_q=4, heads_kv=2, seq_local=8,
                        dtype=torch.float64, batch=2)
        try:
            errors = run_case(case, group=mesh if backend == "usp" else None)
        except AssertionError as error:
            found["backends"][backend] = {"ok": False, "error": str(error)}
            continue
        problem = problem_of(case, world, return_lse=True,
                             ulysses=local if backend == "usp" else None)
        fwd, bwd = backend_volume(backend, problem, rank)
        found["backends"][backend] = {
            "ok": True, "bytes": [errors["bytes_fwd"], errors["bytes_bwd"]],
            "expected_bytes": [fwd.bytes, bwd.bytes],
            "max_error": max(v for k, v in errors.items() if not k.startswith(("bytes", "mess")))}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
