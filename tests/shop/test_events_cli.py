"""`atoll events` and `atoll projections` against the shop's event-sourced orders."""

import json
import os
import subprocess
import sys

from support import SHOP

sys.path.insert(0, str(SHOP))

from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from atoll.transport.memory import InMemoryTransport
from shop.messages import PricedItem
from shop.orders import orders, service


async def test_events_and_projections_commands(tmp_path):
    runtime = ServiceRuntime(
        service, database=SQLiteDatabase(tmp_path / "orders.db"), transport=InMemoryTransport()
    )
    await runtime.start()
    try:
        async with service.unit_of_work() as ctx:
            order = orders.create("o-cli")
            order.place("c9", [PricedItem("apple", 2, 50, "catalog")])
            await orders.save(order, ctx)
        runner = runtime.event_sourcing.runner("order-history")
        await wait_until(lambda: runner.handled >= 1, what="the projection to catch up")
    finally:
        await runtime.stop()

    environ = {**os.environ, "ATOLL__SYSTEM__DATA_DIR": str(tmp_path)}

    def atoll(*args):
        return subprocess.run(
            [sys.executable, "-m", "atoll", *args, "--config", str(SHOP / "atoll.toml")],
            capture_output=True,
            text=True,
            env=environ,
            timeout=60,
            check=False,
        )

    streams = atoll("events", "streams", "--json")
    assert streams.returncode == 0, streams.stderr
    assert json.loads(streams.stdout.splitlines()[0])["stream"] == "order-o-cli"
    shown = atoll("events", "show", "order-o-cli", "--json")
    event = json.loads(shown.stdout.splitlines()[0])
    assert event["type"] == "orders.OrderPlaced"
    assert event["data"]["customer_id"] == "c9"
    status = atoll("projections", "status", "--json")
    assert json.loads(status.stdout.splitlines()[0])["projection"] == "order-history"
    rebuilt = atoll("projections", "rebuild", "order-history")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt order-history: 1 event(s) applied" in rebuilt.stdout
    missing = atoll("projections", "rebuild", "nope")
    assert missing.returncode == 1
    assert "no projection 'nope'" in missing.stderr
