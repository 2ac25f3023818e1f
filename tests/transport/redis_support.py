"""Helpers for the Redis transport tests: namespaces, cleanup, own servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from support import free_port

REDIS_URL = os.environ.get("ATOLL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def namespace_for(tmp_path: Path) -> str:
    """A namespace unique to one test (stable across the processes of the test)."""
    return "atoll-test-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]


def url_for(namespace: str, base: str = REDIS_URL, **options: object) -> str:
    query = "&".join([f"namespace={namespace}", *(f"{k}={v}" for k, v in options.items())])
    return f"{base}{'&' if '?' in base else '?'}{query}"


def delete_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete every key of ``namespace``."""
    client = redis.Redis.from_url(url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


class RedisServer:
    """A redis-server of the test's own, on a free port, that the test may kill.

    ``appendonly`` (with ``appendfsync everysec``) is what atoll asks of production
    servers; ``extra`` adds arguments (a password, TLS).
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        port: int | None = None,
        tls: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.tls = tls
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "redis.log"
        port_args = (
            ("--port", "0", "--tls-port", str(self.port))
            if self.tls
            else ("--port", str(self.port))
        )
        args = [
            binary,
            *port_args,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.directory),
            "--logfile", str(log_path),
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if log_path.exists():
                with log_path.open("rb") as log:
                    log.seek(offset)
                    if b"Ready to accept connections" in log.read():
                        return
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {log_path}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start: see {log_path}")

    def kill(self) -> None:
        """SIGKILL: what a crash of the server looks like."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)


@contextlib.contextmanager
def redis_server(directory: Path, **kwargs: Any) -> Iterator[RedisServer]:
    server = RedisServer(directory, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.kill()
