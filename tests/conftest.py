import pytest

from tests.harness import WorldPool


@pytest.fixture(scope="session")
def worlds():
    """worlds(P) -> a live P-rank gloo world (spawned once, reused by every test)."""
    pool = WorldPool()
    yield pool
    pool.close()
