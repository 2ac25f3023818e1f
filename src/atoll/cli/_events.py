"""``atoll events`` and ``atoll projections``: look into a service's event store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from atoll.cli._run import import_service
from atoll.config import ConfigError, LoadedConfig

if TYPE_CHECKING:
    from atoll.eventstore import EventCodec, EventStore
    from atoll.service import Service

T = TypeVar("T")


def event_sourced_service(loaded: LoadedConfig, name: str | None) -> Service:
    """The named service, or the only event-sourced one; it must be event-sourced."""
    if name is not None:
        service = import_service(loaded, name)
        if not service.event_sourced:
            raise ConfigError(str(loaded.path), f"services.{name}", "is not event-sourced")
        return service
    found = [
        s for s in (import_service(loaded, n) for n in loaded.config.services) if s.event_sourced
    ]
    if len(found) != 1:
        names = ", ".join(s.name for s in found) or "none"
        raise ConfigError(
            str(loaded.path),
            "services",
            f"name one event-sourced service with --service (event-sourced: {names})",
        )
    return found[0]


@contextlib.asynccontextmanager
async def open_store(
    loaded: LoadedConfig, service: Service
) -> AsyncIterator[tuple[EventStore, EventCodec]]:
    """The service's event store (from its database URL) and a codec for its events."""
    from atoll.eventstore import EventCodec, SubjectKeys  # noqa: PLC0415
    from atoll.eventstore._admin import store_from_url  # noqa: PLC0415

    store = store_from_url(loaded.database_url(service.name), base_dir=loaded.data_dir)
    await store.open()
    try:
        codec = EventCodec(service.registry, keys=SubjectKeys(store))
        for repository in service.repositories:
            codec.register(*repository.aggregate.event_types())
        for projection in service.projections:
            codec.register(*projection.event_types())
        yield store, codec
    finally:
        await store.close()


def with_store(
    loaded: LoadedConfig,
    service_name: str | None,
    fn: Callable[[Service, EventStore, EventCodec], Awaitable[T]],
) -> T:
    """Run ``fn`` with the service's store."""
    service = event_sourced_service(loaded, service_name)

    async def main() -> T:
        async with open_store(loaded, service) as (store, codec):
            return await fn(service, store, codec)

    return asyncio.run(main())


def projection_named(service: Service, name: str) -> Any:
    """The projection ``name`` declared by ``service``."""
    for projection in service.projections:
        if projection.name == name:
            return projection
    known = ", ".join(p.name for p in service.projections) or "none"
    raise KeyError(f"service {service.name!r} has no projection {name!r} (known: {known})")
