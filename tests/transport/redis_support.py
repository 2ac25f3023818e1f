"""Helpers for the Redis transport tests: namespaces, cleanup, own servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own, on a free port, that the test may kill."""

    def __init__(self, directory: Path, *, appendonly: bool = True, extra: tuple[str, ...] = ()):
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.directory),
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                    if client.ping():
                        return
                except_exit = self.process.poll()
                if except_exit is not None:
                    raise RuntimeError(f"redis-server exited with {except_exit}")
                import time  # noqa: PLC0415

                time.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        except redis.AuthenticationError:
            return  # it runs, and wants a password
        finally:
            client.close()

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
def redis_server(directory: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(directory, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.kill()
