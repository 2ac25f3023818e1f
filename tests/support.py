"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import asyncio
import socket
from pathlib import Path
from typing import Any

import uvicorn

from atoll.persistence import SQLiteDatabase
from atoll.service import Service, ServiceRuntime
from atoll.testing import wait_until
from atoll.transport import RedeliveryPolicy
from atoll.transport.memory import InMemoryTransport

ROOT = Path(__file__).resolve().parents[1]
SHOP = ROOT / "examples" / "shop"
FAST_RETRY = RedeliveryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class System:
    """Services on one in-memory transport, each with its own SQLite file."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.transport = InMemoryTransport(lease=1.0)
        self.runtimes: list[ServiceRuntime] = []

    async def start(self, *services: Service, **kwargs) -> list[ServiceRuntime]:
        await self.transport.connect()
        started = []
        for service in services:
            runtime = ServiceRuntime(
                service,
                database=SQLiteDatabase(self.tmp_path / f"{service.name}.db", lock_timeout=0.2),
                transport=self.transport,
                owns_transport=False,
                **kwargs,
            )
            await runtime.start()
            self.runtimes.append(runtime)
            started.append(runtime)
        return started

    async def stop(self):
        for runtime in self.runtimes:
            await runtime.stop()
        await self.transport.close()


async def serve(app: Any) -> tuple[str, Any]:
    """Serve ``app`` with uvicorn on a free port: (base URL, stop coroutine function)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", ws="none")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or task.done(), what="uvicorn")
    if task.done():
        task.result()

    async def stop() -> None:
        server.should_exit = True
        await task
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop
