import gc

import pytest
from gateway_support import Stub

from support import write_certificates


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


@pytest.fixture
def certs(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files
    in ``tmp_path / "certs"`` (``support.write_certificates``)."""
    directory = tmp_path / "certs"
    directory.mkdir()
    write_certificates(directory)
    return directory


@pytest.fixture
async def three():
    """The shop's order, payment and shipping upstreams, for aggregation."""
    stubs = [await Stub(name).start() for name in ("orders", "payments", "shipping")]
    yield stubs
    for stub in stubs:
        await stub.stop()
