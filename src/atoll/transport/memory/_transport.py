"""An in-memory transport with the full delivery contract, for tests and single-process mode."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from atoll._crash import crashpoint
from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.transport._base import (
    Ack,
    BatchHandler,
    DeadLetter,
    DeadLetterRecord,
    DeadLetterStore,
    Delivery,
    Outcome,
    OutgoingMessage,
    RedeliveryPolicy,
    Transport,
    command_group,
)
from atoll.transport._claim import Candidate, call_handler, claimable


@dataclass(slots=True)
class _Entry:
    seq: int
    message: OutgoingMessage
    attempts: int = 0
    available_at: float = 0.0
    lease_owner: int | None = None
    lease_until: float | None = None
    last_error: str = ""


@dataclass(slots=True)
class _Group:
    name: str
    policy: RedeliveryPolicy
    entries: dict[int, _Entry] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class _InMemoryConsumer:
    def __init__(
        self,
        transport: InMemoryTransport,
        group: _Group,
        handler: BatchHandler,
        max_batch: int,
        consumer_id: int,
    ) -> None:
        self._transport = transport
        self._group = group
        self._handler = handler
        self._max_batch = max_batch
        self._id = consumer_id
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        self._group.wake.set()
        await asyncio.wait([self._task])
        if self in self._transport._consumers:
            self._transport._consumers.remove(self)

    def abandon(self) -> None:
        """Die without settling (a simulated crash): leases lapse as if the process died."""
        self._task.cancel()

    async def _run(self) -> None:
        clock = self._transport.clock
        try:
            while not self._stopping:
                batch = self._transport._claim(self._group, self._id, self._max_batch)
                if not batch:
                    self._group.wake.clear()
                    await self._transport._sleep_until_due(self._group)
                    continue
                try:
                    outcomes = await call_handler(self._handler, batch)
                except asyncio.CancelledError:
                    self._transport._release(self._group, self._id)
                    raise
                crashpoint("consumer.before_ack")
                self._transport._settle(self._group, batch, outcomes, clock.time())
        finally:
            self._transport._release(self._group, self._id)


class _InMemoryDeadLetters(DeadLetterStore):
    def __init__(self, transport: InMemoryTransport) -> None:
        self._transport = transport
        self.records: dict[str, DeadLetterRecord] = {}

    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        found = [r for r in self.records.values() if group is None or r.group == group]
        return found[:limit]

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        return self.records.get(record_id)

    async def replay(self, record_id: str) -> bool:
        record = self.records.pop(record_id, None)
        if record is None:
            return False
        group = self._transport._groups[record.group]
        self._transport._enqueue(
            group, OutgoingMessage(record.topic, record.message_id, record.key, record.body)
        )
        return True

    async def purge(self, record_id: str) -> bool:
        return self.records.pop(record_id, None) is not None


class InMemoryTransport(Transport):
    """Every contract point of :class:`Transport`, kept in this process's memory.

    Nothing survives the process: use it for tests and ``atoll up --single-process``.
    Duplicates by message id are suppressed for ``dedup_window`` seconds.
    """

    shared_between_processes = False

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        random: RandomSource | None = None,
        dedup_window: float = 120.0,
        lease: float = 30.0,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self._random = random or RandomSource(clock=self.clock)
        self._dedup_window = dedup_window
        self._lease = lease
        self._seq = itertools.count(1)
        self._consumer_ids = itertools.count(1)
        self._groups: dict[str, _Group] = {}
        self._topics: dict[str, set[str]] = {}
        self._seen: dict[str, float] = {}
        self._consumers: list[_InMemoryConsumer] = []
        self._dead = _InMemoryDeadLetters(self)

    async def connect(self) -> None:
        return

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.stop()

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self._dead

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        now = self.clock.monotonic()
        if len(self._seen) > 10_000:
            horizon = now - self._dedup_window
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
        for message in messages:
            seen_at = self._seen.get(message.message_id)
            if seen_at is not None and now - seen_at < self._dedup_window:
                continue
            self._seen[message.message_id] = now
            owner = command_group(message.topic)
            if owner is not None:
                self._group_state(owner, None)
                self._topics.setdefault(message.topic, set()).add(owner)
            for group_name in self._topics.get(message.topic, ()):
                self._enqueue(self._groups[group_name], message)
        await asyncio.sleep(0)

    def _enqueue(self, group: _Group, message: OutgoingMessage) -> None:
        seq = next(self._seq)
        group.entries[seq] = _Entry(seq=seq, message=message, available_at=0.0)
        group.wake.set()

    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> _InMemoryConsumer:
        await self.declare(group, topics)
        state = self._group_state(group, policy)
        consumer = _InMemoryConsumer(self, state, handler, max_batch, next(self._consumer_ids))
        self._consumers.append(consumer)
        return consumer

    def _group_state(self, group: str, policy: RedeliveryPolicy | None) -> _Group:
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group(group, policy or RedeliveryPolicy())
        elif policy is not None:
            state.policy = policy
        return state

    async def declare(self, group: str, topics: Sequence[str]) -> None:
        self._group_state(group, None)
        for topic in topics:
            self._topics.setdefault(topic, set()).add(group)

    def _claim(self, group: _Group, consumer_id: int, limit: int) -> list[Delivery]:
        now = self.clock.time()
        rows = (
            Candidate(e.seq, e.message.key, e.available_at, e.lease_until)
            for e in group.entries.values()
        )
        batch = []
        for seq in claimable(rows, now, limit):
            entry = group.entries[seq]
            entry.attempts += 1
            entry.lease_owner = consumer_id
            entry.lease_until = now + self._lease
            m = entry.message
            batch.append(
                Delivery(group.name, m.topic, m.message_id, m.key, m.body, entry.attempts, seq)
            )
        return batch

    def _release(self, group: _Group, consumer_id: int) -> None:
        for entry in group.entries.values():
            if entry.lease_owner == consumer_id:
                entry.lease_owner = None
                entry.lease_until = None
        group.wake.set()

    def _settle(
        self, group: _Group, batch: Sequence[Delivery], outcomes: Sequence[Outcome], now: float
    ) -> None:
        for delivery, outcome in zip(batch, outcomes, strict=True):
            seq = delivery.token
            assert isinstance(seq, int)
            entry = group.entries.get(seq)
            if entry is None:
                continue
            entry.lease_owner = None
            entry.lease_until = None
            if isinstance(outcome, Ack):
                del group.entries[seq]
            elif isinstance(outcome, DeadLetter):
                self._park(group, entry, outcome.reason, now)
            elif not outcome.count:
                entry.attempts -= 1
                entry.available_at = now + (outcome.delay or 0.0)
            elif entry.attempts >= group.policy.max_attempts:
                self._park(group, entry, outcome.error, now)
            else:
                entry.last_error = outcome.error
                delay = outcome.delay
                if delay is None:
                    delay = group.policy.backoff(entry.attempts, self._random.random())
                entry.available_at = now + delay
        group.wake.set()

    def _park(self, group: _Group, entry: _Entry, reason: str, now: float) -> None:
        del group.entries[entry.seq]
        m = entry.message
        record_id = self._random.new_id()
        self._dead.records[record_id] = DeadLetterRecord(
            id=record_id,
            group=group.name,
            topic=m.topic,
            message_id=m.message_id,
            key=m.key,
            body=m.body,
            reason=reason,
            attempts=entry.attempts,
            dead_at=now,
        )

    async def _sleep_until_due(self, group: _Group) -> None:
        now = self.clock.time()
        due = [
            max(e.available_at, e.lease_until or 0.0)
            for e in group.entries.values()
            if e.available_at > now or (e.lease_until is not None and e.lease_until > now)
        ]
        timeout = min(due) - now if due else 1.0
        sleeper = asyncio.ensure_future(self.clock.sleep(min(timeout, 1.0)))
        waiter = asyncio.ensure_future(group.wake.wait())
        try:
            await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()

    def pending(self, group: str) -> int:
        """Messages waiting for ``group`` (in flight included): handy in tests."""
        state = self._groups.get(group)
        return 0 if state is None else len(state.entries)
