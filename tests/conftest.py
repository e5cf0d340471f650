import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter. It is read
# when kernels are decorated, so it is set before any test module imports them (and inherited
# by the spawned ranks).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.harness import WorldPool  # noqa: E402


@pytest.fixture(scope="session")
def worlds():
    """worlds(P) -> a live P-rank gloo world (spawned once, reused by every test)."""
    pool = WorldPool()
    yield pool
    pool.close()
