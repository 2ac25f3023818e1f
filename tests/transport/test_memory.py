from atoll.testing import InProcessCrashConformance, TransportConformance
from atoll.transport.memory import InMemoryTransport


class TestInMemoryTransport(TransportConformance):
    async def make_transport(self, tmp_path):
        return InMemoryTransport(lease=1.0)


class TestInMemoryCrashes(InProcessCrashConformance):
    async def make_transport(self):
        return InMemoryTransport()
