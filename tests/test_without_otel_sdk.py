"""atoll works without its ``otel`` extra (the OpenTelemetry SDK, exporter and
instrumentations): it imports, and a service handles a message with tracing off.

Run in a child process whose importer refuses those packages, as if never installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                "opentelemetry.instrumentation")):
                raise ImportError(f"{name} is not installed")
            return None

    sys.meta_path.insert(0, Refuse())

    import atoll, atoll.cli, atoll.eventstore, atoll.gateway, atoll.messaging, atoll.sagas
    from atoll import Command, Context, Service
    from atoll.observability import OTEL_AVAILABLE, Tracing
    from atoll.persistence import SQLiteDatabase
    from atoll.service import ServiceRuntime
    from atoll.testing import wait_until
    from atoll.transport.sqlite import SQLiteTransport

    assert not OTEL_AVAILABLE
    assert not Tracing("x", endpoint="http://127.0.0.1:4318/v1/traces").enabled

    class Ping(Command):
        message_type = "nootel.Ping"
        n: int

    worker = Service("worker")
    seen = []

    @worker.handles(Ping)
    async def on_ping(ping: Ping, ctx: Context) -> None:
        seen.append(ping.n)

    async def main(tmp: str) -> None:
        transport = SQLiteTransport(f"{tmp}/bus.db", poll_interval=0.05)
        runtime = ServiceRuntime(
            worker, database=SQLiteDatabase(f"{tmp}/worker.db"), transport=transport
        )
        await runtime.start()
        try:
            async with worker.unit_of_work() as ctx:
                ctx.send(Ping(n=7), to="worker")
            await wait_until(lambda: seen == [7], what="the message handled")
        finally:
            await runtime.stop()

    asyncio.run(main(sys.argv[1]))
    print("handled", seen)
    """
)


def test_atoll_runs_without_the_opentelemetry_sdk(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "handled [7]" in result.stdout
