"""`python -m seqpar.launch [torchrun options] [--mpi] script.py args` (= `seqpar launch`)."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
