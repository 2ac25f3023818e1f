"""``atoll dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from atoll.config import LoadedConfig
from atoll.transport import DeadLetterStore, transport_from_url

T = TypeVar("T")


@contextlib.asynccontextmanager
async def dead_letter_store(loaded: LoadedConfig) -> AsyncIterator[DeadLetterStore]:
    """The dead-letter store of the system's transport."""
    transport = transport_from_url(
        loaded.config.system.transport,
        base_dir=loaded.data_dir,
        synchronous=loaded.config.system.sqlite_synchronous,
    )
    await transport.connect()
    try:
        yield transport.dead_letters
    finally:
        await transport.close()


def with_store(loaded: LoadedConfig, fn: Callable[[DeadLetterStore], Awaitable[T]]) -> T:
    """Run ``fn`` against the dead-letter store."""

    async def main() -> T:
        async with dead_letter_store(loaded) as store:
            return await fn(store)

    return asyncio.run(main())


def timestamp(seconds: float) -> str:
    """A readable UTC time."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
