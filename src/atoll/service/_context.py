"""What handlers and HTTP routes use: their unit of work plus messaging."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from atoll.determinism import Clock, RandomSource
from atoll.messages import (
    Command,
    Envelope,
    Event,
    Message,
    Reply,
    encode_envelope,
    encode_payload,
    utc_from_timestamp,
)
from atoll.observability._tracing import inject_current
from atoll.persistence import Row, Session, UnitOfWork
from atoll.resilience import current_deadline, current_trace_headers
from atoll.transport import command_topic, event_topic

if TYPE_CHECKING:
    from atoll.service._service import Service


class Context(Session):
    """A unit of work of one service, with messaging.

    Queries (:meth:`execute`, :meth:`fetch_all`, ...) run in the unit of work's
    transaction; :meth:`send`, :meth:`publish` and :meth:`reply` write to the outbox in
    that same transaction. So the state change, the messages it causes and (in a
    message handler) the record that the incoming message was handled become durable
    together or not at all.

    Outgoing messages inherit the correlation id, trace context and deadline of the
    incoming message; their causation id is the incoming message's id. Their key
    defaults to the correlation id, so one business flow's messages stay in order.
    """

    __slots__ = (
        "_clock",
        "_propagate",
        "_random",
        "_service",
        "_trace_out",
        "_uow",
        "correlation_id",
        "deadline",
        "envelope",
        "message",
        "trace",
    )

    def __init__(
        self,
        service: Service,
        uow: UnitOfWork,
        *,
        clock: Clock,
        random: RandomSource,
        envelope: Envelope | None = None,
        message: Message | None = None,
        correlation_id: str | None = None,
        trace: dict[str, str] | None = None,
        deadline: datetime | None = None,
        propagate: bool = False,
        trace_out: dict[str, str] | Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._service = service
        self._propagate = propagate
        self._trace_out = trace_out
        self._uow = uow
        self._clock = clock
        self._random = random
        self.envelope = envelope
        self.message = message
        self.correlation_id = (
            envelope.correlation_id if envelope is not None else correlation_id or random.new_id()
        )
        self.trace = dict(envelope.trace) if envelope is not None else dict(trace or {})
        self.deadline = envelope.deadline if envelope is not None else deadline

    def derive(
        self,
        *,
        correlation_id: str,
        deadline: datetime | None,
        uow: UnitOfWork | None = None,
    ) -> Context:
        """A context on the same unit of work (or ``uow``) whose messages belong to another
        conversation: what sagas send. Tracing and causation are kept."""
        derived = Context(
            self._service,
            uow or self._uow,
            clock=self._clock,
            random=self._random,
            envelope=self.envelope,
            message=self.message,
            # Given, so that a context with no envelope makes no correlation id of its own.
            correlation_id=correlation_id,
            trace=self.trace,
            propagate=self._propagate,
            trace_out=self._trace_out,
        )
        # An envelope's correlation id and deadline take precedence in the constructor.
        derived.correlation_id = correlation_id
        derived.deadline = deadline
        return derived

    @property
    def service_name(self) -> str:
        """The name of the service this unit of work belongs to."""
        return self._service.name

    @property
    def clock(self) -> Clock:
        """The clock of the running service."""
        return self._clock

    @property
    def random(self) -> RandomSource:
        """The random source of the running service."""
        return self._random

    @property
    def unit_of_work(self) -> UnitOfWork:
        """The underlying unit of work (for libraries built on atoll)."""
        return self._uow

    # -- queries --------------------------------------------------------------------------

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._uow.execute(sql, *params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._uow.executemany(sql, rows)

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        return await self._uow.fetch_all(sql, *params)

    async def insert_at_commit(self, sql: str, *params: Any) -> None:
        await self._uow.insert_at_commit(sql, *params)

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        return await self._uow.fetch_one(sql, *params)

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this unit of work is durably committed."""
        self._uow.on_commit(callback)

    # -- messaging ------------------------------------------------------------------------

    def send(
        self,
        command: Command,
        *,
        to: str,
        key: str | None = None,
        delay: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Send ``command`` to service ``to``; return its message id.

        ``delay`` (seconds) holds it in the outbox until then: a durable timer.
        """
        if not isinstance(command, Command):
            raise TypeError(f"send() takes a Command, not {type(command).__name__}")
        return self._emit(
            command, topic=command_topic(to), destination=to, key=key, delay=delay, headers=headers
        )

    def publish(
        self,
        event: Event,
        *,
        key: str | None = None,
        delay: float | None = None,
        headers: dict[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish ``event`` to every service subscribed to its type; return its message id.

        ``message_id`` reuses an identity the event already has (an event-sourced service
        publishes each stored event under its event id, so consumers' inboxes and the
        event store agree on what is a duplicate); by default a new id is drawn.
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, not {type(event).__name__}")
        return self._emit(
            event,
            topic=event_topic(event.message_type),
            destination=event.message_type,
            key=key,
            delay=delay,
            headers=headers,
            message_id=message_id,
        )

    def reply(
        self,
        reply: Reply,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Send ``reply`` back to the service that sent the message being handled."""
        if not isinstance(reply, Reply):
            raise TypeError(f"reply() takes a Reply, not {type(reply).__name__}")
        if self.envelope is None:
            raise RuntimeError("reply() needs an incoming message; use send() from HTTP routes")
        target = self.envelope.reply_to or self.envelope.source
        return self._emit(
            reply,
            topic=command_topic(target),
            destination=target,
            key=key or self.envelope.key,
            delay=None,
            headers=headers,
        )

    def _emit(
        self,
        message: Message,
        *,
        topic: str,
        destination: str,
        key: str | None,
        delay: float | None,
        headers: dict[str, str] | None,
        message_id: str | None = None,
    ) -> str:
        now = self._clock.time()
        message_id = message_id or self._random.new_id()
        # With tracing on, a message carries the span that commits it (this request or
        # handler); without, it passes on the context it arrived with. Worked out once per
        # unit of work: every message it sends has the same parent.
        trace = self._trace_out
        if trace is None:
            trace = (inject_current() or self.trace) if self._propagate else self.trace
            self._trace_out = trace
        elif not isinstance(trace, dict):  # a handler's span: its headers, made once
            trace = self._trace_out = trace()
        deadline = self.deadline
        if deadline is None:
            current = current_deadline()  # an HTTP caller's X-Atoll-Deadline, for one
            deadline = None if current is None else current.to_datetime()
        envelope = Envelope(
            id=message_id,
            type=message.message_type,
            version=message.message_version,
            kind=message.message_kind,
            source=self._service.name,
            destination=destination,
            correlation_id=self.correlation_id,
            causation_id=self.envelope.id if self.envelope is not None else None,
            created_at=utc_from_timestamp(now),
            key=key if key is not None else self.correlation_id,
            deadline=deadline,
            trace=trace,
            headers=headers or {},
            payload=encode_payload(message),
        )
        self._uow.add_outgoing(
            message_id=message_id,
            topic=topic,
            key=envelope.key,
            body=encode_envelope(envelope),
            deliver_at=None if delay is None else now + delay,
            traceparent=trace.get("traceparent"),
        )
        return message_id


def outgoing_trace_headers() -> dict[str, str]:
    """Trace headers for a call to another service: the current OpenTelemetry span's
    context, or (with tracing off) the W3C headers the current request arrived with."""
    return inject_current() or dict(current_trace_headers())
