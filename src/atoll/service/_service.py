"""Declaring a service: its messages, handlers, schema and HTTP API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI

from atoll._errors import AtollError
from atoll.messages import Command, Event, Message, MessageRegistry, Reply
from atoll.service._context import Context
from atoll.service._http import install_http_defaults
from atoll.transport import RedeliveryPolicy, command_topic, event_topic

if TYPE_CHECKING:
    from atoll.eventstore import Aggregate, EventStore, Projection
    from atoll.resilience import ServiceClient
    from atoll.service._eventsourcing import ServiceRepository
    from atoll.service._runtime import ServiceRuntime

M = TypeVar("M", bound=Message)
A = TypeVar("A", bound="Aggregate")
Handler = Callable[[M, Context], Awaitable[None]]
StartHook = Callable[["ServiceRuntime"], Awaitable[None]]
StopHook = Callable[["ServiceRuntime"], Awaitable[None]]
_AnyHandler = Callable[[Any, Context], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A handler registered for one message type."""

    message_type: str
    message_class: type[Message]
    handler: _AnyHandler
    is_event: bool


class ServiceNotRunningError(RuntimeError):
    """The service is declared but no runtime is serving it in this process."""


class MessageRejected(AtollError):  # noqa: N818 - it names what happened to the message
    """Raise from a handler when the message can never be handled: it is dead-lettered now.

    The handler's unit of work is rolled back and the message goes to dead letters at
    once with ``reason`` (no redelivery attempts are spent on it), where operators see
    it with ``atoll dlq``. For input that is wrong rather than a failure that may pass,
    e.g. a reply that answers nothing this service asked.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Service:
    """A service: its own database, the messages it handles and its HTTP API.

    Declare it at module level and let ``atoll up`` (or :class:`ServiceRuntime`) run it::

        inventory = Service("inventory", schema=["CREATE TABLE IF NOT EXISTS stock (...)"])

        @inventory.handles(ReserveStock)
        async def reserve(command: ReserveStock, ctx: Context) -> None:
            ...
            ctx.reply(StockReserved(order_id=command.order_id))

        @inventory.http.get("/stock/{sku}")
        async def stock(sku: str) -> dict[str, int]:
            async with inventory.read() as db:
                ...

    ``handles`` takes commands and replies addressed to this service; ``subscribes``
    takes events published by any service. Each message type has one handler.
    """

    def __init__(
        self,
        name: str,
        *,
        schema: Sequence[str] = (),
        redelivery: RedeliveryPolicy | None = None,
        title: str | None = None,
        version: str = "1",
    ) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"service name {name!r} must be letters, digits, '-' or '_'")
        self.name = name
        self.registry = MessageRegistry()
        self.handlers: dict[str, HandlerSpec] = {}
        self.migrations: list[tuple[str, list[str]]] = []
        if schema:
            self.migrations.append((f"{name}:schema", list(schema)))
        self.redelivery = redelivery or RedeliveryPolicy()
        self.start_hooks: list[StartHook] = []
        self.stop_hooks: list[StopHook] = []
        self.repositories: list[ServiceRepository[Any]] = []
        self.projections: list[Projection] = []
        self.event_sourced = False
        self.http = FastAPI(title=title or name, version=version)
        self._runtime: ServiceRuntime | None = None
        install_http_defaults(self.http, self)

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    # -- declarations ---------------------------------------------------------------------

    def handles(self, message_class: type[M]) -> Callable[[Handler[M]], Handler[M]]:
        """Register the handler of a command or reply addressed to this service."""
        if not issubclass(message_class, Command | Reply):
            raise TypeError(
                f"handles() takes a Command or Reply class; use subscribes() for "
                f"{message_class.__qualname__}"
            )
        return self._register(message_class, is_event=False)

    def subscribes(self, message_class: type[M]) -> Callable[[Handler[M]], Handler[M]]:
        """Register the handler of an event, published by any service."""
        if not issubclass(message_class, Event):
            raise TypeError(f"subscribes() takes an Event class, not {message_class.__qualname__}")
        return self._register(message_class, is_event=True)

    def _register(
        self, message_class: type[M], *, is_event: bool
    ) -> Callable[[Handler[M]], Handler[M]]:
        def decorator(fn: Handler[M]) -> Handler[M]:
            if message_class.message_type in self.handlers:
                raise ValueError(
                    f"service {self.name!r} already handles {message_class.message_type!r}"
                )
            self.registry.register(message_class)
            self.handlers[message_class.message_type] = HandlerSpec(
                message_class.message_type, message_class, fn, is_event
            )
            return fn

        return decorator

    def migration(self, name: str, statements: Sequence[str]) -> None:
        """Add a schema migration, applied once, in declaration order, at start."""
        self.migrations.append((f"{self.name}:{name}", list(statements)))

    def repository(self, aggregate: type[A]) -> ServiceRepository[A]:
        """Declare an event-sourced aggregate; its repository works once the service runs.

        The service then gets an event store on its own database, and ``save(agg, ctx)``
        appends the aggregate's events in the handler's unit of work and publishes each of
        them through the outbox in that same transaction.
        """
        from atoll.service._eventsourcing import ServiceRepository  # noqa: PLC0415

        declared = ServiceRepository(self.name, aggregate)
        self.repositories.append(declared)
        self.event_sourced = True
        return declared

    def projection(self, projection: Projection) -> Projection:
        """Run ``projection`` over this service's event store while the service runs."""
        if any(p.name == projection.name for p in self.projections):
            raise ValueError(f"service {self.name!r} already has a projection {projection.name!r}")
        self.projections.append(projection)
        self.event_sourced = True
        return projection

    def on_start(self, hook: StartHook) -> StartHook:
        """Run ``hook(runtime)`` at start, after migrations and before consuming."""
        self.start_hooks.append(hook)
        return hook

    def on_stop(self, hook: StopHook) -> StopHook:
        """Run ``hook(runtime)`` when the service stops taking work (or is abandoned).

        For background work started by an :meth:`on_start` hook: stop it here, promptly;
        the database is still open.
        """
        self.stop_hooks.append(hook)
        return hook

    def topics(self) -> list[str]:
        """The topics this service consumes: its command topic and its event types."""
        return [command_topic(self.name)] + [event_topic(t) for t in self.event_types]

    @property
    def event_types(self) -> list[str]:
        """The event types this service subscribes to."""
        return [spec.message_type for spec in self.handlers.values() if spec.is_event]

    # -- use while running ----------------------------------------------------------------

    @property
    def runtime(self) -> ServiceRuntime:
        """The runtime serving this service in this process."""
        if self._runtime is None:
            raise ServiceNotRunningError(f"service {self.name!r} is not running in this process")
        return self._runtime

    def attach(self, runtime: ServiceRuntime | None) -> None:
        """Bind (or with ``None`` unbind) the runtime serving this service."""
        self._runtime = runtime

    @asynccontextmanager
    async def unit_of_work(
        self, *, correlation_id: str | None = None, trace: dict[str, str] | None = None
    ) -> AsyncIterator[Context]:
        """Open a unit of work with messaging, for HTTP routes and hooks."""
        async with self.runtime.unit_of_work(correlation_id=correlation_id, trace=trace) as ctx:
            yield ctx

    @property
    def event_store(self) -> EventStore:
        """The event store on this service's database (event-sourced services)."""
        store = self.runtime.event_sourcing.store
        if store is None:
            raise ServiceNotRunningError(f"service {self.name!r} has no event store")
        return store

    @property
    def client(self) -> ServiceClient:
        """Calls to other services by name, through their resilience policies."""
        return self.runtime.client

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        """A read-only session on this service's database."""
        async with self.runtime.database.read() as session:
            yield session
