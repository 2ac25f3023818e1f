"""A service's stop is not held up by a collector that is down: the trace export is
bounded as the log export (3 s) and the metrics push (3 s) are."""

import asyncio
import socket
import time

from opentelemetry.trace import SpanKind

from atoll import Service
from atoll.observability import Tracing
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.transport.memory import InMemoryTransport


async def test_stopping_a_service_whose_collector_is_down_is_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2")  # seconds, as the SDK reads it
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    port = closed.getsockname()[1]
    tracing = Tracing("down", endpoint=f"http://127.0.0.1:{port}/v1/traces")
    runtime = ServiceRuntime(
        Service("down"),
        database=SQLiteDatabase(tmp_path / "down.db"),
        transport=InMemoryTransport(),
        tracing=tracing,
    )
    await runtime.start()
    for n in range(2048):  # a busy service's queue when the collector went away
        with tracing.lean.span(
            "process x", parent=None, kind=SpanKind.CONSUMER, attributes={"n": n}
        ):
            pass
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.get_running_loop().create_task(tick())
    started = time.monotonic()
    await runtime.stop()
    took = time.monotonic() - started
    ticker.cancel()
    closed.close()
    # Measured: 4 s here, 36-40 s with the default 10 s exporter timeout, and the event
    # loop (every other service of `atoll run`) does not run at all meanwhile.
    # Bounded as the log export's and the metrics push's stops are (3 s), and the loop
    # (every other service of `atoll run`) runs meanwhile.
    assert took < 4.5, f"stop took {took:.1f} s, the event loop ticked {ticks} times"
    assert ticks >= 10, f"the event loop ticked {ticks} times in {took:.1f} s"
    tracing.shutdown()
