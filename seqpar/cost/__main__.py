"""`seqpar bench calibrate | explain` (= `python -m seqpar.cost ...`): measure this machine, or
explain a choice.

    seqpar bench calibrate --ranks 4 --out profile.json               # 4 CPU ranks (gloo)
    torchrun --nproc-per-node 8 -m seqpar.cost calibrate --launched --out profile.json
    mpirun -n 16 python -m seqpar.cost calibrate --launched --out profile.json
    python -m seqpar.cost explain --seq 1048576 --heads 32 --kv-heads 8 --dim 128 --world 64 \
        --ulysses 8 --profile h100-sxm                               # or --profile profile.json

`calibrate` with --ranks N spawns N CPU ranks on this machine (gloo, one thread each unless
--threads); with --launched it joins the job its launcher started (torchrun, mpirun or srun,
through `seqpar.launch.init`; NCCL when CUDA is available). Rank 0 prints the profile and
writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from .calibrate import calibrate, calibrate_cpu_ranks
from .hardware import SPEC_SHEETS, Profile
from .predict import explain
from .traffic import Problem


def _write(profile: Profile, out: str | None) -> None:
    print(json.dumps(profile.to_json(), indent=2))
    if out:
        print(f"# wrote {profile.save(out)}")


def _profile(name: str) -> Profile:
    if name in SPEC_SHEETS:
        return SPEC_SHEETS[name]
    if os.path.exists(name):
        return Profile.load(name)
    raise SystemExit(f"--profile {name!r}: not a spec sheet ({sorted(SPEC_SHEETS)}) nor a file")


def main(argv=None, prog: str = "python -m seqpar.cost") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser("calibrate", help="measure this machine, write a profile JSON")
    cal.add_argument("--ranks", type=int, default=2, help="CPU ranks to spawn (default 2)")
    cal.add_argument("--threads", type=int, default=1, help="threads per spawned rank")
    cal.add_argument("--launched", "--torchrun", dest="launched", action="store_true",
                     help="join the job of a launcher (torchrun / mpirun / srun) instead of "
                          "spawning ranks")
    cal.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--name", default=None)
    cal.add_argument("--out", default=None, help="where to write the profile JSON")
    exp = commands.add_parser("explain", help="predict every backend and show auto's choice")
    exp.add_argument("--profile", default="h100-sxm", help="a spec sheet name or a profile JSON")
    exp.add_argument("--batch", type=int, default=1)
    exp.add_argument("--seq", type=int, required=True, help="global sequence length")
    exp.add_argument("--heads", type=int, default=32)
    exp.add_argument("--kv-heads", type=int, default=None)
    exp.add_argument("--dim", type=int, default=128)
    exp.add_argument("--world", type=int, required=True)
    exp.add_argument("--ulysses", type=int, default=None, help="USP mesh degree U")
    exp.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped"])
    exp.add_argument("--full", action="store_true", help="non-causal")
    exp.add_argument("--itemsize", type=int, default=2, help="bytes per element (bf16: 2)")
    args = parser.parse_args(argv)
    if args.command == "explain":
        problem = Problem(batch=args.batch, seq_len=args.seq, heads_q=args.heads,
                          heads_kv=args.kv_heads or args.heads, head_dim=args.dim,
                          world=args.world, itemsize=args.itemsize, causal=not args.full,
                          layout=args.layout, ulysses=args.ulysses)
        print(explain(problem, _profile(args.profile)))
        return 0
    options = {"head_dims": tuple(args.head_dims), "name": args.name, "repeats": args.repeats}
    if args.launched:
        from seqpar.launch import init
        init()
        profile = calibrate(**options)
        if dist.get_rank() == 0:
            _write(profile, args.out)
        dist.destroy_process_group()
        return 0
    _write(calibrate_cpu_ranks(args.ranks, args.threads, **options), args.out)
    return 0


def bench(argv: list[str]) -> int:
    """`seqpar bench ...`: the row of seqpar.cli's COMMANDS."""
    return main(argv, prog="seqpar bench")


if __name__ == "__main__":
    raise SystemExit(main())
