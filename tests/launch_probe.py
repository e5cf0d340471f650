"""Started by a launcher in tests/test_launch.py: join the job twice, run one collective, and
write this rank's view as JSON to <out>/rank<R>.json.

    python -m tests.launch_probe <out>
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from seqpar.launch import init


def main(out: str) -> None:
    job = init(timeout=60)
    again = init(timeout=30)  # harmless: the same Job, nothing initialised twice
    total = torch.tensor([float(job.rank + 1)])
    dist.all_reduce(total)
    view = {**dataclasses.asdict(job), "device": str(job.device), "again_same": again == job,
            "rank_sum": total.item(), "dist_rank": dist.get_rank(),
            "dist_world": dist.get_world_size(),
            "exported": {name: os.environ.get(name) for name in
                         ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                          "SEQPAR_LAUNCHER", "OMP_NUM_THREADS")}}
    Path(out, f"rank{job.rank}.json").write_text(json.dumps(view))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
