import pytest

from tests.harness import WorldPool


@pytest.fixture(scope="session")
def worlds():
    """worlds(P) -> a live P-rank gloo world (spawned once, reused by every test)."""
    pool = WorldPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def interpreted_worlds():
    """worlds whose ranks run Triton kernels on CPU under the Triton interpreter.

    triton reads TRITON_INTERPRET when a kernel is decorated (at import), so it is set only in
    these ranks' environment: the test process keeps the real compiler (for ahead-of-time
    compile checks) and the other worlds never see it."""
    pool = WorldPool(env={"TRITON_INTERPRET": "1"})
    yield pool
    pool.close()
