import pytest
from gateway_support import Stub


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
