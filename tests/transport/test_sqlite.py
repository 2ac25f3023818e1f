from atoll.testing import ExactlyOnceCrashConformance, TransportConformance
from atoll.transport.sqlite import SQLiteTransport


class TestSQLiteTransport(TransportConformance):
    async def make_transport(self, tmp_path):
        return SQLiteTransport(tmp_path / "bus.db", lease=1.0)


class TestSQLiteCrashes(ExactlyOnceCrashConformance):
    def transport_url(self, tmp_path):
        return f"sqlite:///{tmp_path}/bus.db"
