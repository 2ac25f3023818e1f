"""The NATS JetStream transport against the conformance kits (real server, 127.0.0.1:4222)."""

from urllib.parse import urlsplit

import pytest

from atoll.testing import BrokerOutageConformance, ExactlyOnceCrashConformance, TransportConformance
from atoll.transport.nats import NatsTransport
from nats_support import NATS_URL, drop_namespaces, nats_url, new_namespace

pytestmark = pytest.mark.nats


class _Namespaces:
    """Gives each test its own namespace and deletes its streams afterwards."""

    @pytest.fixture(autouse=True)
    async def _namespaces(self):
        self.namespaces: list[str] = []
        yield
        await drop_namespaces(self.namespaces)

    def namespace(self) -> str:
        if not self.namespaces:
            self.namespaces.append(new_namespace())
        return self.namespaces[0]


class TestNatsTransport(_Namespaces, TransportConformance):
    async def make_transport(self, tmp_path):
        return NatsTransport.from_url(nats_url(self.namespace()))


class TestNatsCrashes(_Namespaces, ExactlyOnceCrashConformance):
    def transport_url(self, tmp_path):
        return nats_url(self.namespace())


class TestNatsBrokerOutage(_Namespaces, BrokerOutageConformance):
    def server_address(self):
        parts = urlsplit(NATS_URL)
        return parts.hostname or "127.0.0.1", parts.port or 4222

    def make_transport(self, host, port, tmp_path):
        return NatsTransport.from_url(nats_url(self.namespace(), base=f"nats://{host}:{port}"))


async def test_processes_creating_a_namespace_at_once_all_connect():
    # Concurrent creates of one stream can be refused as "subjects overlap" before the
    # stream is visible; every transport must still connect to the one namespace.
    import asyncio  # noqa: PLC0415 - this test only

    namespaces = [new_namespace() for _ in range(30)]
    try:
        for namespace in namespaces:
            transports = [NatsTransport.from_url(nats_url(namespace)) for _ in range(6)]
            try:
                results = await asyncio.gather(
                    *(t.connect() for t in transports), return_exceptions=True
                )
                assert not [r for r in results if isinstance(r, BaseException)], results
            finally:
                for transport in transports:
                    await transport.close()
    finally:
        await drop_namespaces(namespaces)
