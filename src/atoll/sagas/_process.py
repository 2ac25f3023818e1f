"""Choreography: a process manager follows a flow driven by events, not commands.

Services publish events; a process manager correlates them by a key (an order id)
into one instance with stored data, reacts (sends commands, publishes events), keeps
durable timers, and ends the instance ``COMPLETED`` or ``FAILED``. It is stored and
shown exactly like a saga (``atoll sagas list|show|abort``), with the same history.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

from atoll.messages import Command, Event
from atoll.sagas._definition import D, check_name
from atoll.sagas._errors import SagaDefinitionError
from atoll.sagas._state import SagaState, StepChange

if TYPE_CHECKING:
    from atoll.sagas._engine import SagaEngine
    from atoll.service import Context

E = TypeVar("E", bound=Event)
IfMissing = Literal["retry", "ignore"]


class ProcessProgress(msgspec.Struct, kw_only=True):
    """What a process instance stores besides its data: its key and timers."""

    key: str
    timers: dict[str, float] = msgspec.field(default_factory=dict)


class Flow(Generic[D]):
    """What a process manager's handlers get: the instance and a unit of work.

    ``data`` is the instance's data (change it in place or assign a new value);
    ``ctx`` is the unit of work handling the event or timer. :meth:`send` keys the
    command by the instance's key, so one flow's commands stay in order.
    """

    def __init__(
        self,
        instance_id: str,
        key: str,
        data: D | None,
        ctx: Context,
        *,
        timers: dict[str, float],
        now: float,
        state: SagaState,
    ) -> None:
        self.instance_id = instance_id
        self.key = key
        self._data = data
        self.ctx = ctx
        self.timers = timers
        self.now = now
        self.state = state
        self.error: str | None = None
        self.notes: list[StepChange] = []

    @property
    def data(self) -> D:
        """The instance's data."""
        if self._data is None:
            raise RuntimeError("the instance has no data yet: a start handler returns it")
        return self._data

    @data.setter
    def data(self, value: D) -> None:
        self._data = value

    def send(self, command: Command, *, to: str, delay: float | None = None) -> str:
        """Send ``command`` to service ``to``, keyed by this instance's key."""
        return self.ctx.send(command, to=to, key=self.key, delay=delay)

    def publish(self, event: Event) -> str:
        """Publish ``event``, keyed by this instance's key."""
        return self.ctx.publish(event, key=self.key)

    def schedule(self, timer: str, delay: float) -> None:
        """Fire the ``on_timer(timer)`` handler ``delay`` seconds from now (durably)."""
        self.timers[timer] = self.now + delay
        self.notes.append(StepChange(timer, "", "SCHEDULED", f"in {delay:g}s"))

    def cancel(self, timer: str) -> None:
        """Forget a scheduled timer."""
        if self.timers.pop(timer, None) is not None:
            self.notes.append(StepChange(timer, "SCHEDULED", "CANCELLED"))

    def complete(self, note: str = "") -> None:
        """End the instance: the flow reached its goal."""
        self.notes.append(StepChange("(process)", self.state.value, "COMPLETED", note))
        self.state = SagaState.COMPLETED

    def fail(self, reason: str) -> None:
        """End the instance: the flow cannot reach its goal."""
        self.notes.append(StepChange("(process)", self.state.value, "FAILED", reason))
        self.state = SagaState.FAILED
        self.error = reason


@dataclass(frozen=True, slots=True)
class EventRoute(Generic[D]):
    """How one event type reaches a process manager."""

    event_type: type[Event]
    key: Callable[[Any], str]
    handler: Callable[[Any, Flow[D]], Awaitable[Any]]
    starts: bool
    if_missing: IfMissing


class ProcessManager(Generic[D]):
    """A flow driven by events, with stored state, timers and a deadline.

    ::

        fulfilment = ProcessManager("fulfilment", Fulfilment, timeout=3600)

        @fulfilment.starts(OrderPlaced, key=lambda e: e.order_id)
        async def placed(event: OrderPlaced, flow: Flow[Fulfilment]) -> Fulfilment:
            return Fulfilment(order_id=event.order_id)

        @fulfilment.on(PaymentCaptured, key=lambda e: e.order_id)
        async def paid(event: PaymentCaptured, flow: Flow[Fulfilment]) -> None:
            flow.data.paid = True
            if flow.data.shipped:
                flow.complete()

    An event for a key with no instance that does not start one is retried (it may
    have overtaken the start event) and dead-lettered when attempts run out, unless
    its route says ``if_missing="ignore"``. An event for an ended instance is recorded
    and ignored. When ``timeout`` passes, ``on_deadline`` runs (by default the
    instance fails).
    """

    kind = "process"

    def __init__(
        self, name: str, data: type[D], *, version: int = 1, timeout: float | None = None
    ) -> None:
        self.name = check_name("process", name)
        if not (isinstance(data, type) and issubclass(data, msgspec.Struct)):
            raise SagaDefinitionError(
                f"process {name!r}: data must be a msgspec.Struct class, not {data!r}"
            )
        if not isinstance(version, int) or version < 1:
            raise SagaDefinitionError(f"process {name!r}: version must be an int >= 1")
        if timeout is not None and timeout <= 0:
            raise SagaDefinitionError(f"process {name!r}: timeout must be > 0")
        self.data_type = data
        self.version = version
        self.timeout = timeout
        self.decoder: msgspec.json.Decoder[D] = msgspec.json.Decoder(data)
        self.routes: dict[str, EventRoute[D]] = {}
        self.timer_handlers: dict[str, Callable[[Flow[D]], Awaitable[None]]] = {}
        self.deadline_handler: Callable[[Flow[D]], Awaitable[None]] | None = None
        self._engines: list[SagaEngine] = []

    def __repr__(self) -> str:
        return f"ProcessManager({self.name!r}, version={self.version})"

    def _route(
        self,
        event_type: type[E],
        key: Callable[[E], str],
        *,
        starts: bool,
        if_missing: IfMissing,
    ) -> Callable[[Callable[[E, Flow[D]], Awaitable[Any]]], Callable[[E, Flow[D]], Awaitable[Any]]]:
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise SagaDefinitionError(
                f"process {self.name!r}: {event_type!r} is not an Event class"
            )
        if event_type.message_type in self.routes:
            raise SagaDefinitionError(
                f"process {self.name!r} already handles {event_type.message_type!r}"
            )
        if not callable(key):
            raise SagaDefinitionError(f"process {self.name!r}: key must be a callable event -> str")

        def decorator(
            fn: Callable[[E, Flow[D]], Awaitable[Any]],
        ) -> Callable[[E, Flow[D]], Awaitable[Any]]:
            self.routes[event_type.message_type] = EventRoute(
                event_type, key, fn, starts, if_missing
            )
            for engine in self._engines:
                engine._subscribe(event_type, self.name)
            return fn

        return decorator

    def starts(
        self, event_type: type[E], *, key: Callable[[E], str]
    ) -> Callable[[Callable[[E, Flow[D]], Awaitable[D]]], Callable[[E, Flow[D]], Awaitable[D]]]:
        """Register the handler that starts an instance; it returns the initial data."""
        return self._route(event_type, key, starts=True, if_missing="ignore")

    def on(
        self,
        event_type: type[E],
        *,
        key: Callable[[E], str],
        if_missing: IfMissing = "retry",
    ) -> Callable[
        [Callable[[E, Flow[D]], Awaitable[None]]], Callable[[E, Flow[D]], Awaitable[None]]
    ]:
        """Register the handler of an event for a running instance."""
        if if_missing not in ("retry", "ignore"):
            raise SagaDefinitionError(f"process {self.name!r}: if_missing must be retry or ignore")
        return self._route(event_type, key, starts=False, if_missing=if_missing)

    def on_timer(
        self, timer: str
    ) -> Callable[[Callable[[Flow[D]], Awaitable[None]]], Callable[[Flow[D]], Awaitable[None]]]:
        """Register what happens when a timer set with ``flow.schedule(timer, ...)`` fires."""
        check_name("timer", timer)

        def decorator(
            fn: Callable[[Flow[D]], Awaitable[None]],
        ) -> Callable[[Flow[D]], Awaitable[None]]:
            self.timer_handlers[timer] = fn
            return fn

        return decorator

    def on_deadline(
        self, fn: Callable[[Flow[D]], Awaitable[None]]
    ) -> Callable[[Flow[D]], Awaitable[None]]:
        """Register what happens when the process's ``timeout`` passes (default: fail)."""
        self.deadline_handler = fn
        return fn

    def instance_id(self, key: str) -> str:
        """The id under which the instance for ``key`` is stored."""
        return f"{self.name}:{key}"
