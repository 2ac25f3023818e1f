"""Broker outages: the outbox holds messages while the transport is down, then delivers.

Subclass :class:`BrokerOutageConformance` for a transport that reaches a server over
TCP; it runs a producer and a consumer through a :class:`TcpProxy` and cuts it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing._crash_kit import check_exactly_once, effects_done
from atoll.testing._crash_system import consumer, produce, producer
from atoll.testing._proxy import TcpProxy
from atoll.testing._waiting import wait_until
from atoll.transport import Transport


class BrokerOutageConformance(abc.ABC):
    """The transport survives its server going away, with nothing lost or doubled."""

    count = 200
    timeout = 60.0

    @abc.abstractmethod
    def server_address(self) -> tuple[str, int]:
        """Host and port of the real server the proxy forwards to."""

    @abc.abstractmethod
    def make_transport(self, host: str, port: int, tmp_path: Path) -> Transport:
        """A transport that connects to ``host:port`` (the proxy), with empty topics."""

    @pytest.fixture
    async def proxy(self) -> AsyncIterator[TcpProxy]:
        """A proxy to the real server, closed after the test."""
        proxy = TcpProxy(*self.server_address())
        await proxy.start()
        yield proxy
        await proxy.close()

    def _runtime(self, role: str, tmp_path: Path, transport: Transport) -> ServiceRuntime:
        return ServiceRuntime(
            producer if role == "producer" else consumer,
            database=SQLiteDatabase(tmp_path / f"{role}.db"),
            transport=transport,
            max_batch=16,
            relay_batch=16,
        )

    async def test_server_down_while_handlers_commit_then_everything_arrives_once_in_order(
        self, proxy: TcpProxy, tmp_path: Path
    ) -> None:
        prod = self._runtime(
            "producer", tmp_path, self.make_transport("127.0.0.1", proxy.port, tmp_path)
        )
        cons = self._runtime(
            "consumer", tmp_path, self.make_transport("127.0.0.1", proxy.port, tmp_path)
        )
        await cons.start()
        await prod.start()
        try:
            proxy.block()
            # Units of work commit while the server is unreachable: the outbox holds them.
            await produce(prod, self.count)
            count, _, _ = await prod.database.outbox_stats()
            assert count > 0, "nothing waited in the outbox while the server was down"
            proxy.unblock()
            await wait_until(
                lambda: effects_done(cons.database, self.count),
                timeout=self.timeout,
                what="every message after the server came back",
            )
            await check_exactly_once(cons.database, self.count, cons.transport)
        finally:
            await prod.stop()
            await cons.stop()

    async def test_connections_cut_mid_stream_lose_and_double_nothing(
        self, proxy: TcpProxy, tmp_path: Path
    ) -> None:
        prod = self._runtime(
            "producer", tmp_path, self.make_transport("127.0.0.1", proxy.port, tmp_path)
        )
        cons = self._runtime(
            "consumer", tmp_path, self.make_transport("127.0.0.1", proxy.port, tmp_path)
        )
        await cons.start()
        await prod.start()
        try:
            task = asyncio.get_running_loop().create_task(produce(prod, self.count))
            for _ in range(3):
                await asyncio.sleep(0.3)
                proxy.cut()
            await task
            await wait_until(
                lambda: effects_done(cons.database, self.count),
                timeout=self.timeout,
                what="every message after the cuts",
            )
            await check_exactly_once(cons.database, self.count, cons.transport)
        finally:
            await prod.stop()
            await cons.stop()
