import gc

import pytest
from gateway_support import Stub


@pytest.fixture(autouse=True)
def collect_fully():
    """A full collection after each test, for the root conftest's unread-exception check.

    Requests that fail leave tasks and futures in reference cycles (their exception's
    traceback holds their frame) that only a full collection is sure to find.
    """
    yield
    gc.collect()


@pytest.fixture
async def stub():
    server = await Stub("a").start()
    yield server
    await server.stop()


@pytest.fixture
async def stub_b():
    server = await Stub("b").start()
    yield server
    await server.stop()
