"""Helpers for the NATS tests: the shared server's URL, namespaces, a private server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import nats

from atoll.determinism import RandomSource, SystemClock
from support import free_port

NATS_URL = os.environ.get("ATOLL_TEST_NATS_URL", "nats://127.0.0.1:4222")
_random = RandomSource()
_clock = SystemClock()


def new_namespace(prefix: str = "t") -> str:
    """A namespace no other test uses (stream names and subjects unique to it)."""
    return f"{prefix}-{_random.new_id().replace('-', '')[-12:]}"


def nats_url(namespace: str, base: str = NATS_URL, **options: object) -> str:
    """``base`` with a namespace and fast test settings (short ack wait and leases)."""
    settings = {"namespace": namespace, "ack_wait": 1, "lease": 2, "partitions": 8, **options}
    query = "&".join(f"{k}={v}" for k, v in settings.items())
    return f"{base}?{query}"


async def drop_namespaces(namespaces: list[str], url: str = NATS_URL) -> None:
    """Delete the streams of these namespaces (tests leave nothing on the shared server)."""
    if not namespaces:
        return
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        for ns in namespaces:
            for suffix in ("", "_DLQ", "_META", "_COORD"):
                with contextlib.suppress(Exception):
                    await nc.request(f"$JS.API.STREAM.DELETE.ATOLL_{ns}{suffix}", b"", timeout=5)
    finally:
        await nc.close()


class NatsServer:
    """A private ``nats-server -js`` on a free port, for tests that stop or break it."""

    def __init__(self, store: Path, *args: str) -> None:
        self.store = store
        self.port = free_port()
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = store / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "nats-server",
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    str(self.store),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
            )
        deadline = _clock.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if _clock.monotonic() > deadline:
                raise RuntimeError("nats-server did not start")
            await asyncio.sleep(0.05)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            await asyncio.to_thread(self.process.wait, 10)
        self.process = None

    async def restart(self) -> None:
        await self.kill()
        await self.start()
