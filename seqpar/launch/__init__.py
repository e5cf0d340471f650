"""Launching: join a job started by torchrun, mpirun or srun (`init`), and start one
(`python -m seqpar.launch` / `seqpar launch`, a front over torchrun with an mpirun option).

The only part of seqpar that reads launcher environment variables.
"""

from .env import LAUNCHERS, Job, detect, init

__all__ = ["init", "Job", "detect", "LAUNCHERS"]
