"""The `seqpar` command: `seqpar <command> [arguments]`.

    seqpar launch --nproc-per-node 4 train.py     # = python -m seqpar.launch ... (torchrun / --mpi)
    seqpar info                                   # versions, backends, integrations, launcher
    seqpar bench calibrate --ranks 2 --out p.json # measure kernels and links: a cost-model profile
    seqpar bench explain --seq 1048576 --world 64 # auto's choice and every backend's prediction

Each command is one row of `COMMANDS`: name -> (module, function, one-line help). The function
takes the remaining arguments (a list of str) and returns an exit code. Its module is imported
only when the command runs, so `seqpar --help` stays fast and each command keeps its
dependencies to itself. A new command is one new row.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "launch": ("seqpar.launch.run", "main",
               "start a job: torchrun's options, or --mpi to start it with mpirun"),
    "info": ("seqpar.cli", "info", "versions, backends, installed integrations, the launcher seen"),
    "bench": ("seqpar.cost.__main__", "bench",
              "calibrate: measure this machine into a profile; explain: auto's choice"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name.ljust(width)}  {help_text}"
                     for name, (_, _, help_text) in COMMANDS.items())
    return (f"usage: seqpar <command> [arguments]   (seqpar <command> --help for its options)"
            f"\n\ncommands:\n{rows}")


def _version(distribution: str) -> str:
    """Installed version, read from package metadata (importing DeepSpeed alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(argv: list[str]) -> int:
    """Print what this installation has: versions, backends, layouts, optional integrations."""
    if argv:
        print("usage: seqpar info   (takes no arguments)", file=sys.stderr)
        return 2
    import torch

    import seqpar
    from seqpar.launch import detect

    print(f"seqpar {seqpar.__version__}, torch {torch.__version__}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print(f"backends: {', '.join(sorted(seqpar.BACKENDS))}; layouts: {', '.join(seqpar.LAYOUTS)}, balanced (packed documents)")
    for extra, module in (("gpu", "triton"), ("hf", "transformers"), ("deepspeed", "deepspeed"),
                          ("mpi", "mpi4py")):
        print(f"  {module:<13} {_version(module):<16} (extra: {extra})")
    print(f"launcher of this process: {detect(os.environ)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from seqpar import __version__
        print(f"seqpar {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"seqpar: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
