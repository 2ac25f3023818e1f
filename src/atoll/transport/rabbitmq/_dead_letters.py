"""Dead letters in a RabbitMQ queue: parked with their reason in headers, listed safely.

Parking publishes the message to the namespace's dead-letter exchange with headers
naming its group, topic, key, reason, attempts and original routing key, waits for the
broker's confirm, and only then acknowledges the original delivery: a crash in between
parks it twice, and both copies carry the same record id (a hash of group and message
id), so they show as one record and are replayed or purged together.

Reading the queue means taking its messages; so every operation first takes a lock
(an exclusive queue, which the broker frees if its holder's connection dies), takes
every dead letter without acknowledging it, and gives back what it did not replay or
purge by closing its channel: a classic queue puts them back in their places. A crash
mid-operation gives everything back.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage

from atoll.transport._base import (
    DeadLetterRecord,
    DeadLetterStore,
    TransportError,
    TransportUnavailableError,
)
from atoll.transport.rabbitmq._connection import describe
from atoll.transport.rabbitmq._topology import Names, slot_of

if TYPE_CHECKING:
    from atoll.transport.rabbitmq._transport import RabbitMQTransport

H_DEAD_ID = "x-atoll-dead-id"
H_GROUP = "x-atoll-group"
H_TOPIC = "x-atoll-topic"
H_KEY = "x-atoll-key"
H_REASON = "x-atoll-reason"
H_ATTEMPTS = "x-atoll-attempts"
H_DEAD_AT = "x-atoll-dead-at"
H_ROUTING_KEY = "x-atoll-routing-key"

#: Reasons are kept whole up to this length (an error with a long traceback is cut).
_MAX_REASON = 8192


def record_id(group: str, message_id: str) -> str:
    """The id of the dead letter of ``message_id`` in ``group``: the same for every copy."""
    return hashlib.sha256(f"{group}\0{message_id}".encode("utf-8", "surrogatepass")).hexdigest()[
        :32
    ]


def text(value: object) -> str | None:
    """A header value as text, whatever another system put there."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return None


def integer(value: object) -> int | None:
    """A header value as a non-negative integer, if it is one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def fallback_id(body: bytes) -> str:
    """An id for a message that came without one (from another system)."""
    return "amqp-" + hashlib.sha256(body).hexdigest()[:24]


def dead_headers(record: DeadLetterRecord, original_routing_key: str) -> dict[str, Any]:
    """The headers that describe a parked message."""
    headers: dict[str, Any] = {
        H_DEAD_ID: record.id,
        H_GROUP: record.group,
        H_TOPIC: record.topic,
        H_REASON: record.reason[:_MAX_REASON],
        H_ATTEMPTS: record.attempts,
        H_DEAD_AT: record.dead_at,
        H_ROUTING_KEY: original_routing_key,
    }
    if record.key is not None:
        headers[H_KEY] = record.key
    return headers


def parse_dead_letter(
    names: Names, headers: Mapping[str, Any], message_id: str | None, body: bytes
) -> DeadLetterRecord:
    """The record a message of the dead-letter queue stands for.

    Messages parked by atoll carry their record in headers; messages the broker
    dead-lettered itself (a policy's limit, an expired message) carry ``x-death``;
    anything else is shown as it is, so that it can be purged.
    """
    mid = message_id or fallback_id(body)
    topic = text(headers.get(H_TOPIC)) or ""
    key = text(headers.get(H_KEY))
    rid = text(headers.get(H_DEAD_ID))
    if rid is not None:
        dead_at = headers.get(H_DEAD_AT)
        return DeadLetterRecord(
            id=rid,
            group=text(headers.get(H_GROUP)) or "",
            topic=topic,
            message_id=mid,
            key=key,
            body=body,
            reason=text(headers.get(H_REASON)) or "",
            attempts=integer(headers.get(H_ATTEMPTS)) or 0,
            dead_at=float(dead_at) if isinstance(dead_at, int | float) else 0.0,
        )
    deaths = headers.get("x-death")
    death: Mapping[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        death = deaths[0]
    queue = text(death.get("queue")) or ""
    group = names.group_of(queue) or ""
    when = death.get("time")
    dead_at = when.timestamp() if isinstance(when, dt.datetime) else 0.0
    if death:
        why = text(death.get("reason")) or "unknown"
        reason = f"dead-lettered by RabbitMQ from queue {queue} ({why})"
    else:
        reason = "a message in the dead-letter queue that atoll did not park"
    attempts = integer(headers.get("x-acquired-count"))
    if attempts is None:
        attempts = integer(headers.get("x-delivery-count")) or 0
    return DeadLetterRecord(
        id=hashlib.sha256(f"{queue}\0{mid}\0{dead_at}".encode(errors="replace")).hexdigest()[:32],
        group=group,
        topic=topic,
        message_id=mid,
        key=key,
        body=body,
        reason=reason,
        attempts=attempts,
        dead_at=dead_at,
    )


@dataclass(slots=True)
class _Held:
    record: DeadLetterRecord
    tags: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Snapshot:
    channel: AbstractChannel
    records: dict[str, _Held]

    def ordered(self) -> list[DeadLetterRecord]:
        return sorted((h.record for h in self.records.values()), key=lambda r: (r.dead_at, r.id))

    async def remove(self, record_id: str) -> None:
        """Acknowledge every copy of ``record_id`` (done when the channel closes)."""
        for tag in self.records[record_id].tags:
            await self.channel.basic_ack(tag)


class RabbitMQDeadLetters(DeadLetterStore):
    """The dead letters of one namespace (see the module docstring for how it is safe)."""

    def __init__(self, transport: RabbitMQTransport) -> None:
        self._t = transport
        self._local = asyncio.Lock()

    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        async with self._snapshot() as snapshot:
            found = [r for r in snapshot.ordered() if group is None or r.group == group]
        return found[:limit]

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        async with self._snapshot() as snapshot:
            held = snapshot.records.get(record_id)
        return None if held is None else held.record

    async def replay(self, record_id: str) -> bool:
        async with self._snapshot() as snapshot:
            held = snapshot.records.get(record_id)
            if held is None:
                return False
            record = held.record
            if not record.group:
                raise TransportError(
                    f"dead letter {record_id} names no group to replay it to"
                    f" ({record.reason}); purge it instead"
                )
            # Delivered first, removed second: a crash between leaves the record and a
            # delivery of the same message id, which the group's inbox drops if it is
            # replayed again. The reverse order could lose it.
            await self._t._replay(record, slot_of(record.key, record.message_id))
            await snapshot.remove(record_id)
        return True

    async def purge(self, record_id: str) -> bool:
        async with self._snapshot() as snapshot:
            if record_id not in snapshot.records:
                return False
            await snapshot.remove(record_id)
        return True

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[_Snapshot]:
        """Every dead letter, held (unacknowledged) on a channel of this process."""
        t = self._t
        await t.connect()
        try:
            async with self._held(t) as snapshot:
                yield snapshot
        except aiormq.exceptions.AMQPChannelError as exc:
            t._topology.forget_namespace()  # declare it again next time, if it went missing
            raise TransportError(
                f"RabbitMQ at {t.settings.redacted}: reading the dead letters of namespace"
                f" {t.names.namespace!r} failed: {describe(exc, t.settings.password)}"
            ) from None
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            raise TransportUnavailableError(
                f"RabbitMQ at {t.settings.redacted}: reading the dead letters failed, the"
                f" connection was lost ({describe(exc, t.settings.password)})"
            ) from None

    @contextlib.asynccontextmanager
    async def _held(self, t: RabbitMQTransport) -> AsyncIterator[_Snapshot]:
        async with self._local:
            connection = await t._link.get()
            lock = await self._acquire(connection)
            try:
                channel = await connection.channel()
                try:
                    messages = await self._take_all(channel)
                    records: dict[str, _Held] = {}
                    for message in messages:
                        props = message.header.properties
                        record = parse_dead_letter(
                            t.names, props.headers or {}, props.message_id, message.body
                        )
                        held = records.get(record.id)
                        if held is None or record.dead_at < held.record.dead_at:
                            tags = held.tags if held is not None else []
                            held = records[record.id] = _Held(record, tags)
                        held.tags.append(message.delivery_tag or 0)
                    yield _Snapshot(channel, records)
                finally:
                    # Whatever was not acknowledged goes back to the queue, in its place.
                    with contextlib.suppress(Exception):
                        await channel.close()
            finally:
                with contextlib.suppress(Exception):
                    await lock.queue_delete(t.names.dead_lock)
                with contextlib.suppress(Exception):
                    await lock.close()

    async def _acquire(self, connection: aiormq.abc.AbstractConnection) -> AbstractChannel:
        """Take the namespace's dead-letter lock: an exclusive queue, held until deleted."""
        t = self._t
        deadline = t.clock.monotonic() + t.settings.lock_timeout
        while True:
            channel = await connection.channel()
            try:
                await channel.queue_declare(t.names.dead_lock, exclusive=True)
            except aiormq.exceptions.ChannelLockedResource:
                if t.clock.monotonic() >= deadline:
                    raise TransportError(
                        f"the dead letters of namespace {t.names.namespace!r} at"
                        f" {t.settings.redacted} are busy: another process has held them"
                        f" for {t.settings.lock_timeout:.0f}s"
                    ) from None
                await t.clock.sleep(t._random.uniform(0.01, 0.05))
                continue
            return channel

    async def _take_all(self, channel: AbstractChannel) -> builtins.list[DeliveredMessage]:
        t = self._t
        declared = await channel.queue_declare(t.names.dead_queue, passive=True)
        count = declared.message_count or 0
        messages: builtins.list[DeliveredMessage] = []
        if not count:
            return messages
        enough = asyncio.Event()

        async def take(message: DeliveredMessage) -> None:
            messages.append(message)
            if len(messages) >= count:
                enough.set()

        consuming = await channel.basic_consume(t.names.dead_queue, take)
        try:
            async with asyncio.timeout(t.settings.lock_timeout):
                await enough.wait()
        except TimeoutError:
            raise TransportError(
                f"read {len(messages)} of {count} dead letters of namespace"
                f" {t.names.namespace!r} at {t.settings.redacted} within"
                f" {t.settings.lock_timeout:.0f}s; does something else consume"
                f" {t.names.dead_queue}?"
            ) from None
        finally:
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.basic_cancel(consuming.consumer_tag or "")
        return messages
