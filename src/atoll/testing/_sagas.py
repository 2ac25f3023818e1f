"""Testing sagas: the orchestrator for real, its participants scripted, time virtual.

:class:`SagaTestKit` runs an orchestrating service (its database, migrations, saga
engine and handlers, through the same batch handler the transport calls) in one task,
deterministically: nothing moves unless the test says so. Commands to other services
go to :class:`ScriptedParticipant` objects that answer as scripted (or hold the command
for the test to answer); replies come back as real envelopes (causation, correlation,
key) as a participant's ``ctx.reply`` would send them. Time is a
:class:`VirtualClock`: :meth:`SagaTestKit.advance` moves it and fires the deadlines
and retries that fall due.

::

    kit = SagaTestKit(engine, tmp_path)
    kit.participant("inventory").on(ReserveStock, lambda c: StockReserved(order_id=c.order_id))
    kit.participant("payments").on(ChargePayment, None)   # hold: the test decides
    async with kit:
        saga_id = await kit.start(place_order, Order(order_id="o1", amount=5))
        [charge] = kit.held("payments")
        await kit.advance(31)                              # the charge times out
        assert (await kit.instance(saga_id)).state == "COMPENSATED"
        assert kit.commands("inventory") == [ReserveStock(...), ReleaseStock(...)]
"""

from __future__ import annotations

import typing
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec

from atoll.determinism import RandomSource, VirtualClock
from atoll.messages import (
    Command,
    Envelope,
    Event,
    Message,
    MessageRegistry,
    Reply,
    decode_envelope,
    encode_envelope,
    encode_payload,
    utc_from_timestamp,
)
from atoll.persistence import Database, SQLiteDatabase
from atoll.sagas import Saga, SagaEngine, SagaView, Send
from atoll.service import ServiceRuntime
from atoll.transport import Ack, DeadLetter, Delivery, Retry, command_group, command_topic
from atoll.transport.memory import InMemoryTransport

C = TypeVar("C", bound=Command)
ReplyScript = Reply | Callable[[Any], Reply | None] | None


class RawCommand(Command, kw_only=True):
    """A command of a type the kit was not told about: its type and fields as sent.

    Script the participant (``kit.participant(name).on(CommandType, ...)``) or annotate
    the saga's command builders with their return type to get typed commands instead.
    """

    message_type = "atoll.testing.RawCommand"
    type: str
    fields: dict[str, Any]


class RawEvent(Event, kw_only=True):
    """An event of a type the kit does not know: its type and fields as published."""

    message_type = "atoll.testing.RawEvent"
    type: str
    fields: dict[str, Any]


_fields_decoder = msgspec.json.Decoder(dict[str, Any])


def command_types(definition: object) -> list[type[Command]]:
    """The command classes a saga's builders declare they return (by annotation)."""
    found: list[type[Command]] = []
    if not isinstance(definition, Saga):
        return found
    for flat in definition.steps:
        for action in (flat.step.action, flat.step.compensation):
            if not isinstance(action, Send):
                continue
            try:
                hints = typing.get_type_hints(action.command)
            except Exception:  # noqa: S112 - unannotated or unresolvable: script it instead
                continue
            returned = hints.get("return")
            if isinstance(returned, type) and issubclass(returned, Command):
                found.append(returned)
    return found


@dataclass(slots=True)
class SentCommand:
    """A command the orchestrator sent to a participant, and what became of it."""

    to: str
    command: Command
    envelope: Envelope
    replies: list[Reply] = field(default_factory=list)

    @property
    def saga_id(self) -> str:
        """The saga that sent it (its correlation id)."""
        return self.envelope.correlation_id


@dataclass(slots=True)
class _Rule:
    script: list[ReplyScript]
    after: float
    calls: int = 0


class ScriptedParticipant:
    """A stand-in for another service: answers commands as scripted.

    ``on(CommandType, reply)``: ``reply`` is a :class:`Reply`, a function of the
    command returning a reply (or ``None`` to hold the command), or ``None``; a list
    of those is used in turn, its last entry repeating. ``after`` delays the reply by
    virtual seconds. A command with no rule is held: see :meth:`SagaTestKit.held`.
    """

    def __init__(self, name: str, registry: MessageRegistry) -> None:
        self.name = name
        self._registry = registry
        self._rules: dict[str, _Rule] = {}

    def on(
        self,
        command_type: type[C],
        reply: ReplyScript | Sequence[ReplyScript],
        *,
        after: float = 0.0,
    ) -> ScriptedParticipant:
        """Script the answer to ``command_type``."""
        self._registry.register(command_type)
        script = list(reply) if isinstance(reply, list | tuple) else [reply]
        self._rules[command_type.message_type] = _Rule(script, after)  # type: ignore[arg-type]
        return self

    def answer(self, command: Command) -> tuple[Reply | None, float]:
        """The scripted reply to ``command`` and its delay."""
        rule = self._rules.get(command.message_type)
        if rule is None:
            return None, 0.0
        entry = rule.script[min(rule.calls, len(rule.script) - 1)]
        rule.calls += 1
        reply = entry(command) if callable(entry) and not isinstance(entry, Reply) else entry
        if reply is not None and not isinstance(reply, Reply):
            raise TypeError(f"{self.name}: the script for {command.message_type} gave {reply!r}")
        return reply, rule.after


class SagaTestKit:
    """Runs one orchestrating service's sagas against scripted participants.

    Use as ``async with kit:`` (or :meth:`open`/:meth:`close`). The orchestrator's
    database is a SQLite file in ``directory``; :meth:`restart` closes it and opens it
    again in a new runtime, as a crash and restart would (queued messages survive, as
    they would in a transport). ``database(clock)`` makes another database instead
    (e.g. PostgreSQL), opened anew at each :meth:`restart`.
    """

    def __init__(
        self,
        engine: SagaEngine,
        directory: Path,
        *,
        clock: VirtualClock | None = None,
        seed: int = 0,
        database: Callable[[VirtualClock], Database] | None = None,
    ) -> None:
        self.engine = engine
        self._database = database
        self.service = engine.service
        self.directory = Path(directory)
        self.clock = clock or VirtualClock()
        self.random = RandomSource(seed, clock=self.clock)
        self.runtime: ServiceRuntime | None = None
        #: Every command sent to a participant, in order.
        self.sent: list[SentCommand] = []
        #: Every event the orchestrator published, in order.
        self.published: list[Event] = []
        #: Messages to the orchestrator that were dead-lettered, with the reason.
        self.dead_letters: list[tuple[Envelope, str]] = []
        self._registry = MessageRegistry()
        for definition in engine.definitions:
            for command_type in command_types(definition):
                self._registry.register(command_type)
        self._participants: dict[str, ScriptedParticipant] = {}
        self._inbound: deque[tuple[Envelope, int]] = deque()
        self._delayed: list[tuple[float, int, Envelope]] = []
        self._held: list[SentCommand] = []
        self._seen_commands: set[str] = set()
        self._counter = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the orchestrator's database, migrate it, run its start hooks."""
        self.engine.manual_timers = True
        database = (
            self._database(self.clock)
            if self._database is not None
            else SQLiteDatabase(
                self.directory / f"{self.service.name}.db", synchronous="OFF", clock=self.clock
            )
        )
        runtime = ServiceRuntime(
            self.service,
            database=database,
            transport=InMemoryTransport(clock=self.clock, random=self.random),
            clock=self.clock,
            random=self.random,
            owns_transport=False,
        )
        await database.open()
        for name, statements in self.service.migrations:
            await database.migrate(name, statements)
        self.service.attach(runtime)
        for hook in self.service.start_hooks:
            await hook(runtime)
        runtime.state = "ready"
        self.runtime = runtime

    async def close(self) -> None:
        """Stop the orchestrator (its stop hooks run) and close its database."""
        runtime, self.runtime = self.runtime, None
        if runtime is None:
            return
        for hook in self.service.stop_hooks:
            await hook(runtime)
        runtime.state = "stopped"
        self.service.attach(None)
        await runtime.database.close()
        self.engine.manual_timers = False

    async def restart(self) -> None:
        """Close the orchestrator and open it again on the same database file."""
        await self.close()
        await self.open()

    def _runtime(self) -> ServiceRuntime:
        if self.runtime is None:
            raise RuntimeError("the kit is not open: use `async with kit:`")
        return self.runtime

    # -- participants ---------------------------------------------------------------------

    def participant(self, name: str) -> ScriptedParticipant:
        """The scripted stand-in for service ``name`` (created on first use)."""
        found = self._participants.get(name)
        if found is None:
            found = self._participants[name] = ScriptedParticipant(name, self._registry)
        return found

    def commands(self, to: str | None = None) -> list[Command]:
        """The commands sent (to service ``to``), in order."""
        return [s.command for s in self.sent if to is None or s.to == to]

    def held(self, to: str | None = None) -> list[SentCommand]:
        """Commands sent that no script answered, oldest first."""
        return [s for s in self._held if to is None or s.to == to]

    # -- driving --------------------------------------------------------------------------

    async def start(self, saga: Saga[Any] | str, data: Any, *, saga_id: str | None = None) -> str:
        """Start a saga in a unit of work of the orchestrator, then run until quiet."""
        async with self._runtime().unit_of_work() as ctx:
            started = await self.engine.start(ctx, saga, data, saga_id=saga_id)
        await self.run()
        return started

    async def reply(self, sent: SentCommand, reply: Reply, *, run: bool = True) -> None:
        """Answer ``sent`` as its participant would with ``ctx.reply(reply)``."""
        sent.replies.append(reply)
        if sent in self._held:
            self._held.remove(sent)
        self._queue(self._reply_envelope(sent, reply))
        if run:
            await self.run()

    async def publish(
        self,
        event: Event,
        *,
        source: str = "outside",
        key: str | None = None,
        correlation_id: str | None = None,
        run: bool = True,
    ) -> None:
        """Deliver ``event`` to the orchestrator as if another service published it."""
        message_id = self.random.new_id()
        self._queue(
            Envelope(
                id=message_id,
                type=event.message_type,
                version=event.message_version,
                kind="event",
                source=source,
                destination=event.message_type,
                correlation_id=correlation_id or message_id,
                created_at=utc_from_timestamp(self.clock.time()),
                key=key,
                payload=encode_payload(event),
            )
        )
        if run:
            await self.run()

    async def run(self, *, limit: int = 100_000) -> None:
        """Move messages (outbox to participants, replies to the orchestrator) until quiet."""
        for _ in range(limit):
            if await self.relay():
                continue
            if self._inbound:
                await self.deliver_next()
                continue
            return
        raise AssertionError(f"still busy after {limit} steps: is something looping?")

    async def relay(self) -> int:
        """Take what is due from the orchestrator's outbox; return how many records."""
        database = self._runtime().database
        records = await database.outbox_fetch(1000)
        if not records:
            return 0
        await database.outbox_delete([r.seq for r in records])
        for record in records:
            self._route(decode_envelope(record.body), record.topic)
        return len(records)

    async def deliver_next(self) -> None:
        """Hand the oldest queued message to the orchestrator's batch handler."""
        envelope, attempt = self._inbound.popleft()
        try:
            await self.deliver(envelope, attempt)
        except BaseException:
            # A (simulated) crash: the message was not settled, so it is delivered again.
            self._inbound.appendleft((envelope, attempt))
            raise

    async def deliver_batch(self) -> None:
        """Hand every queued message to the orchestrator in one batch (one transaction)."""
        batch = list(self._inbound)
        self._inbound.clear()
        deliveries = [self._delivery(envelope, attempt) for envelope, attempt in batch]
        outcomes = await self._runtime()._handle_batch(deliveries)
        for (envelope, attempt), outcome in zip(batch, outcomes, strict=True):
            self._settle(envelope, attempt, outcome)

    def _delivery(self, envelope: Envelope, attempt: int) -> Delivery:
        return Delivery(
            self.service.name,
            command_topic(self.service.name)
            if envelope.kind != "event"
            else f"event.{envelope.type}",
            envelope.id,
            envelope.key,
            encode_envelope(envelope),
            attempt,
        )

    def _settle(self, envelope: Envelope, attempt: int, outcome: object) -> None:
        if isinstance(outcome, DeadLetter):
            self.dead_letters.append((envelope, outcome.reason))
        elif isinstance(outcome, Retry):
            if attempt >= self.service.redelivery.max_attempts:
                self.dead_letters.append((envelope, outcome.error))
            else:
                self._inbound.append((envelope, attempt + (1 if outcome.count else 0)))
        else:
            assert isinstance(outcome, Ack)

    async def deliver(self, envelope: Envelope, attempt: int = 1) -> None:
        """Hand ``envelope`` to the orchestrator as a delivery of its transport would."""
        [outcome] = await self._runtime()._handle_batch([self._delivery(envelope, attempt)])
        self._settle(envelope, attempt, outcome)

    async def advance(self, seconds: float) -> None:
        """Move virtual time on, firing deadlines, retries and delayed replies on the way."""
        runtime = self._runtime()
        target = self.clock.monotonic() + seconds
        while True:
            await self.run()
            now = self.clock.time()
            offset = self.clock.time() - self.clock.monotonic()
            async with runtime.database.read() as session:
                wake = await session.fetch_value(
                    "SELECT min(wake_at) FROM atoll_sagas WHERE wake_at IS NOT NULL"
                )
            nexts = [float(wake)] if wake is not None else []
            if self._delayed:
                nexts.append(min(d[0] for d in self._delayed))
            scheduled = await runtime.database.outbox_next_scheduled()
            if scheduled is not None:
                nexts.append(scheduled)
            step_to = min(nexts) if nexts else None
            if step_to is None or step_to - offset > target:
                break
            if step_to > now:
                await self.clock.advance(step_to - now)
            await self._fire()
        remaining = target - self.clock.monotonic()
        if remaining > 0:
            await self.clock.advance(remaining)
        await self._fire()

    async def _fire(self) -> None:
        now = self.clock.time()
        due = sorted(d for d in self._delayed if d[0] <= now)
        for item in due:
            self._delayed.remove(item)
            self._queue(item[2])
        await self.engine.fire_due(self._runtime())
        await self.run()

    # -- reading --------------------------------------------------------------------------

    async def instance(self, saga_id: str) -> SagaView:
        """The instance with its steps and history."""
        self._runtime()
        return await self.engine.view(saga_id)

    async def states(self) -> dict[str, str]:
        """Every instance's state by id."""
        async with self._runtime().database.read() as session:
            rows = await session.fetch_all("SELECT saga_id, state FROM atoll_sagas")
        return {r[0]: r[1] for r in rows}

    # -- internals ------------------------------------------------------------------------

    def _queue(self, envelope: Envelope) -> None:
        self._inbound.append((envelope, 1))

    def _route(self, envelope: Envelope, topic: str) -> None:
        target = command_group(topic)
        if target == self.service.name:
            self._queue(envelope)
            return
        if target is None:
            self._record_event(envelope)
            return
        if envelope.id in self._seen_commands:
            return  # the participant's inbox drops a duplicate
        self._seen_commands.add(envelope.id)
        participant = self.participant(target)
        command = self._decode(envelope)
        assert isinstance(command, Command)
        sent = SentCommand(target, command, envelope)
        self.sent.append(sent)
        reply, after = participant.answer(command)
        if reply is None:
            self._held.append(sent)
            return
        sent.replies.append(reply)
        reply_envelope = self._reply_envelope(sent, reply)
        if after > 0:
            self._counter += 1
            self._delayed.append((self.clock.time() + after, self._counter, reply_envelope))
        else:
            self._queue(reply_envelope)

    def _record_event(self, envelope: Envelope) -> None:
        event = self._decode(envelope)
        if not isinstance(event, Event):
            event = RawEvent(type=envelope.type, fields=_fields_decoder.decode(envelope.payload))
        self.published.append(event)
        if envelope.type in self.service.handlers:
            self._queue(envelope)

    def _decode(self, envelope: Envelope) -> Message:
        for registry in (self._registry, self.service.registry):
            if envelope.type in registry:
                return registry.decode(envelope)
        return RawCommand(type=envelope.type, fields=_fields_decoder.decode(envelope.payload))

    def _reply_envelope(self, sent: SentCommand, reply: Reply) -> Envelope:
        command = sent.envelope
        return Envelope(
            id=self.random.new_id(),
            type=reply.message_type,
            version=reply.message_version,
            kind="reply",
            source=sent.to,
            destination=command.reply_to or command.source,
            correlation_id=command.correlation_id,
            causation_id=command.id,
            created_at=utc_from_timestamp(self.clock.time()),
            key=command.key,
            deadline=command.deadline,
            trace=command.trace,
            payload=encode_payload(reply),
        )
