"""One role of the crash-test system in its own process, until SIGTERM.

``python -m atoll.testing._crash_worker ROLE TRANSPORT_URL DATABASE_URL COUNT``
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from atoll.persistence import database_from_url
from atoll.service import ServiceRuntime
from atoll.testing._crash_system import consumer, produce, producer
from atoll.transport import transport_from_url


async def main(role: str, transport_url: str, database_url: str, count: int) -> None:
    """Run the role; produce ``count`` messages if it is the producer."""
    here = Path.cwd()
    service = producer if role == "producer" else consumer
    runtime = ServiceRuntime(
        service,
        database=database_from_url(database_url, base_dir=here),
        transport=transport_from_url(transport_url, base_dir=here),
        max_batch=16,
        relay_batch=16,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await runtime.start()
    sys.stdout.write("started\n")
    sys.stdout.flush()
    if role == "producer":
        await produce(runtime, count)
    await stop.wait()
    await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
