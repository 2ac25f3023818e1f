"""Event sourcing inside a service: its event store, repositories and projections.

A service that declares an aggregate (``service.repository(Order)``) or a projection
(``service.projection(OrderHistory())``) gets an event store on its own database when it
starts: :class:`~atoll.eventstore.SQLiteEventStore` on the embedded default,
:class:`~atoll.eventstore.PostgresEventStore` on PostgreSQL (sharing the service's
connection pool, so events commit in the same transaction as the outbox). Projections
run while the service runs, report their lag in ``/readyz`` and ``/metrics``, and stop
with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from atoll.service._service import ServiceNotRunningError

if TYPE_CHECKING:
    from atoll.eventstore import (
        Aggregate,
        EventCodec,
        EventStore,
        Projection,
        ProjectionRunner,
        Repository,
        SubjectKeys,
    )
    from atoll.persistence import Database
    from atoll.service._runtime import ServiceRuntime

A = TypeVar("A", bound="Aggregate")

#: A base64 AES-256 key that wraps every data subject's key in the database.
MASTER_KEY_ENV = "ATOLL_EVENTSTORE_MASTER_KEY"


class ServiceRepository(Generic[A]):
    """A repository declared with the service and bound to its event store at start.

    Every method of :class:`~atoll.eventstore.Repository` is available once the service
    runs (``load``, ``get``, ``create``, ``save``).
    """

    def __init__(self, service_name: str, aggregate: type[A]) -> None:
        self.service_name = service_name
        self.aggregate = aggregate
        self._bound: Repository[A] | None = None

    def bind(self, repository: Repository[A] | None) -> None:
        """Attach (or with ``None`` detach) the running service's repository."""
        self._bound = repository

    @property
    def bound(self) -> Repository[A]:
        """The repository of the running service."""
        if self._bound is None:
            raise ServiceNotRunningError(
                f"service {self.service_name!r} is not running: no {self.aggregate.__qualname__}"
                " repository yet"
            )
        return self._bound

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bound, name)


def event_store_for(database: Database) -> EventStore:
    """The event store that lives in ``database`` (its tables next to the service's)."""
    from atoll.eventstore import PostgresEventStore, SQLiteEventStore  # noqa: PLC0415
    from atoll.persistence import SQLiteDatabase  # noqa: PLC0415

    if isinstance(database, SQLiteDatabase):
        return SQLiteEventStore(database)
    from atoll.persistence.postgres import PostgresDatabase  # noqa: PLC0415

    if isinstance(database, PostgresDatabase):
        return PostgresEventStore(pool=database.pool, schema=database.schema or "public")
    raise TypeError(f"no event store for {type(database).__name__}")


class EventSourcing:
    """The event store, codec, repositories and projection runners of a running service."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self._runtime = runtime
        self.store: EventStore | None = None
        self.codec: EventCodec | None = None
        self.keys: SubjectKeys | None = None
        self.runners: list[ProjectionRunner] = []

    async def open(self) -> None:
        """Open the store on the service's database and bind the declared repositories."""
        from atoll.eventstore import EventCodec, Repository, SubjectKeys  # noqa: PLC0415

        service = self._runtime.service
        store = event_store_for(self._runtime.database)
        await store.open()
        master = os.environ.get(MASTER_KEY_ENV)
        keys = SubjectKeys(store, master_key=_decode_key(master) if master else None)
        codec = EventCodec(service.registry, keys=keys)
        self.store, self.codec, self.keys = store, codec, keys
        for declared in service.repositories:
            declared.bind(
                Repository(declared.aggregate, store, codec=codec, random=self._runtime.random)
            )

    async def start_projections(self) -> None:
        """Start a runner per declared projection (after the consumer is up)."""
        from atoll.eventstore import ProjectionRunner  # noqa: PLC0415

        assert self.store is not None
        for projection in self._runtime.service.projections:
            runner = ProjectionRunner(
                projection,
                self.store,
                codec=self.codec,
                registry=self._runtime.metrics.registry,
            )
            await runner.start()
            self.runners.append(runner)

    async def stop(self) -> None:
        """Stop the projections, unbind repositories, close the store."""
        for runner in self.runners:
            await runner.stop()
        self.runners = []
        for declared in self._runtime.service.repositories:
            declared.bind(None)
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def readiness(self) -> dict[str, Any]:
        """Projection lag for ``/readyz``."""
        from atoll.eventstore import projections_readiness  # noqa: PLC0415

        return await projections_readiness(self.runners)

    def runner(self, name: str) -> ProjectionRunner:
        """The runner of projection ``name``."""
        for runner in self.runners:
            if runner.name == name:
                return runner
        known = ", ".join(r.name for r in self.runners) or "none"
        raise KeyError(f"no projection {name!r} (known: {known})")


def _decode_key(text: str) -> bytes:
    import base64  # noqa: PLC0415 - cold path

    key = base64.b64decode(text)
    if len(key) != 32:
        raise ValueError(f"{MASTER_KEY_ENV} must be 32 bytes, base64-encoded")
    return key


def declared_projection_names(projections: Sequence[Projection]) -> list[str]:
    """Names of declared projections, checked unique."""
    names = [p.name for p in projections]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"projections declared twice: {sorted(duplicates)}")
    return names
