from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from atoll.observability.collector import CollectorApp, Retention, create_collector_app
from atoll.observability.collector._app import listen_socket


@dataclass
class LiveCollector:
    """A collector served by uvicorn on a free port, in a thread of its own."""

    app: CollectorApp
    url: str
    loop: asyncio.AbstractEventLoop

    @property
    def traces_url(self) -> str:
        return f"{self.url}/v1/traces"

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (the store belongs to it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=10)

    def wait_for_spans(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stored = self.get("/api/stats").json()["spans"]
            if stored >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{stored} spans stored after {timeout} s, wanted {count}")
            time.sleep(0.02)


@contextlib.contextmanager
def serve_in_thread(app: CollectorApp) -> Iterator[LiveCollector]:
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []
    errors: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="collector-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if errors or not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the collector did not start: {errors}")
        time.sleep(0.01)
    try:
        yield LiveCollector(app, f"http://127.0.0.1:{port}", loops[0])
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "the collector did not shut down"
        assert not errors, errors


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


@pytest.fixture
def live(db_path: Path) -> Iterator[LiveCollector]:
    app = create_collector_app(db_path, max_body_bytes=2 * 1024 * 1024)
    with serve_in_thread(app) as collector:
        yield collector


@pytest.fixture
def make_app(db_path: Path) -> Callable[..., CollectorApp]:
    def make(**options: Any) -> CollectorApp:
        options.setdefault("retention", Retention(max_age=3600, max_spans=100_000))
        return create_collector_app(db_path, **options)

    return make


@pytest.fixture
async def app(make_app: Callable[..., CollectorApp]) -> AsyncIterator[CollectorApp]:
    async with make_app(max_body_bytes=256 * 1024) as started:
        yield started


@pytest.fixture
async def client(app: CollectorApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://collector") as http:
        yield http
