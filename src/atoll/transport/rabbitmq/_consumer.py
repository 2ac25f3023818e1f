"""A consumer of one group: its partition queues, per-key order, retries held in hand.

Each instance of a group consumes every partition queue of the group; the queues have
single active consumer, so one instance at a time gets a partition's messages, in
order. Within what it holds, the consumer hands out a key's messages one batch at a
time and never a later one while an earlier one is in flight or waiting for its retry
(``atoll.transport._claim.claimable``). A retry is held in the consumer, unacknowledged,
until its backoff has passed: the broker cannot give that message, or any later one of
its partition, to another instance meanwhile, so nothing of its key overtakes it.

Instances share partitions: when a consumer learns (from the consumer count of the
group's members queue) that it holds more than its share, it stops handing out new
messages of a surplus partition, waits until nothing of that partition is in flight or
waiting for a retry, and closes that partition's channel. The broker puts the untouched
messages back at the head of the queue and activates the next waiting instance in the
same step; the consumer then subscribes again, at the back of the line.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

from atoll._crash import crashpoint
from atoll.transport._base import (
    Ack,
    BatchHandler,
    DeadLetter,
    DeadLetterRecord,
    Delivery,
    Outcome,
    RedeliveryPolicy,
    TransportError,
    TransportUnavailableError,
)
from atoll.transport._claim import Candidate, call_handler, claimable
from atoll.transport.rabbitmq._connection import Link, describe
from atoll.transport.rabbitmq._dead_letters import (
    H_KEY,
    H_TOPIC,
    fallback_id,
    integer,
    record_id,
    text,
)
from atoll.transport.rabbitmq._topology import topic_of

if TYPE_CHECKING:
    from atoll.transport.rabbitmq._transport import RabbitMQTransport

log = logging.getLogger("atoll.transport.rabbitmq")

_BUSY = math.inf
#: Errors that mean the connection or a channel is gone: rebuild the session.
_LOST = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TransportUnavailableError,
)


@dataclass(slots=True, eq=False)
class _Partition:
    index: int
    queue: str
    channel: AbstractChannel | None = None
    #: Deliveries held from this partition, by delivery tag (ascending).
    entries: dict[int, _Entry] = field(default_factory=dict)
    #: This instance got a delivery since it subscribed: it is the active consumer.
    active: bool = False
    #: Being handed over to another instance: start nothing new from it.
    yielding: bool = False
    #: Not handed over again before this time (it came straight back last time).
    cooldown_until: float = 0.0


@dataclass(slots=True, eq=False)
class _Entry:
    seq: int
    partition: _Partition
    channel: AbstractChannel
    tag: int
    topic: str
    message_id: str
    key: str | None
    body: bytes
    routing_key: str
    #: Deliveries by the broker so far, this one included.
    deliveries: int
    #: Failed attempts handled here since the broker delivered it.
    failures: int = 0
    available_at: float = 0.0
    in_flight: bool = False
    #: The reason it must be parked, while the dead-letter publish has not succeeded.
    parking: str | None = None

    @property
    def attempt(self) -> int:
        return self.deliveries + self.failures

    @property
    def touched(self) -> bool:
        return self.failures > 0 or self.in_flight or self.parking is not None


def _broker_deliveries(message: DeliveredMessage, headers: dict[str, object]) -> int:
    """How many times the broker delivered this message, this time included.

    Quorum queues count returns in ``x-delivery-count`` (RabbitMQ 4 counts every
    acquisition in ``x-acquired-count``); classic queues only flag a redelivery.
    """
    count = integer(headers.get("x-acquired-count"))
    if count is None:
        count = integer(headers.get("x-delivery-count"))
    if count is None:
        count = 1 if message.redelivered else 0
    return count + 1


class RabbitMQConsumer:
    """One running instance of a group (see the module docstring)."""

    def __init__(
        self,
        transport: RabbitMQTransport,
        group: str,
        *,
        topics: Sequence[str],
        handler: BatchHandler,
        policy: RedeliveryPolicy,
        max_batch: int,
    ) -> None:
        self._t = transport
        self._group = group
        self._topics = list(topics)
        self._handler = handler
        self._policy = policy
        self._max_batch = max_batch
        settings = transport.settings
        self._prefetch = settings.prefetch or max(2 * max_batch, 32)
        self._link = Link(settings, f"consumer of {group}", transport.clock, transport._random)
        names = transport.names
        self._partitions = [
            _Partition(i, names.partition(group, i)) for i in range(settings.partitions)
        ]
        self._entries: dict[int, _Entry] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._broken: str | None = "not connected"
        self._connection: AbstractConnection | None = None
        self._control: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self._rebalance_due = False
        self._next_rebalance = 0.0
        self._park_retry_at = 0.0
        self._park_failures = 0
        #: In :meth:`_rebuild`: no batch is in hand, so stopping need not wait for it.
        self._rebuilding = False

    def __repr__(self) -> str:
        return f"RabbitMQConsumer({self._group!r})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to every partition (one attempt), then run."""
        where = self._t.settings.redacted
        try:
            await self._open_session()
        except aiormq.exceptions.AMQPChannelError as exc:
            await self._link.close()
            raise TransportError(
                f"RabbitMQ at {where}: subscribing group {self._group!r} failed:"
                f" {describe(exc, self._t.settings.password)}"
            ) from None
        except _LOST as exc:
            await self._link.close()
            if isinstance(exc, TransportError):
                raise
            raise TransportUnavailableError(
                f"RabbitMQ at {where}: subscribing group {self._group!r} failed, the"
                f" connection was lost ({describe(exc, self._t.settings.password)})"
            ) from None
        except BaseException:
            await self._link.close()
            raise
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop handing out messages, settle the batch in hand, close.

        Messages held but not handed out (or waiting for a retry) go back to the queue.
        """
        if not self._stopping:
            self._stopping = True
            self._stop.set()
            self._wake.set()
            if self._task is not None and self._rebuilding:
                # Reconnecting: nothing is held, so do not wait for a connection attempt.
                self._task.cancel()
        if self._task is not None:
            await asyncio.wait([self._task])
        await self._link.close()
        self._t._forget(self)

    def abandon(self) -> None:
        """Stop at once without settling, as a crash would: the connection is closed
        without acknowledging anything, so the broker delivers it all again."""
        self._stopping = True
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        self._t._forget(self)
        self._t._background(self._link.close())

    # -- the session: one connection, a channel per partition -----------------------------

    async def _open_session(self) -> None:
        await self._t._topology.group(self._group, self._topics)
        connection = await self._link.get()
        self._connection = connection
        connection.closing.add_done_callback(functools.partial(self._on_closed, connection))
        control = await connection.channel()
        members = await self._t._topology.members_queue(control, self._group)
        # One consumer per instance on the members queue: its count is the group's size.
        await control.basic_consume(members, _ignore, no_ack=True)
        self._control = control
        for partition in self._partitions:
            await self._subscribe(connection, partition)
        self._broken = None
        self._rebalance_due = True

    async def _subscribe(self, connection: AbstractConnection, partition: _Partition) -> None:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=self._prefetch)
        partition.channel = channel
        partition.active = False
        partition.yielding = False
        channel.closing.add_done_callback(functools.partial(self._on_channel_closed, channel))
        channel.on_consumer_cancel_callbacks.add(
            functools.partial(self._on_cancelled, partition, channel)
        )
        await channel.basic_consume(
            partition.queue, functools.partial(self._on_message, partition, channel)
        )

    def _on_closed(self, connection: AbstractConnection, closing: asyncio.Future[object]) -> None:
        if connection is not self._connection or self._stopping:
            return
        reason = "closed"
        if not closing.cancelled() and closing.exception() is not None:
            reason = describe(closing.exception() or Exception(), self._t.settings.password)
        self._break(reason)

    def _on_channel_closed(self, channel: AbstractChannel, closing: asyncio.Future[object]) -> None:
        if self._stopping or not any(p.channel is channel for p in self._partitions):
            return  # closed on purpose (a hand-over) or already replaced
        reason = "a channel closed"
        if not closing.cancelled() and closing.exception() is not None:
            reason = describe(closing.exception() or Exception(), self._t.settings.password)
        self._break(reason)

    def _on_cancelled(
        self, partition: _Partition, channel: AbstractChannel, _frame: aiormq.spec.Basic.Cancel
    ) -> None:
        if self._stopping or partition.channel is not channel:
            return
        # The broker ends a subscription when its queue is deleted: declare the group's
        # queues and bindings again and subscribe anew.
        self._t._topology.forget(self._group)
        self._break(f"the broker cancelled the subscription to {partition.queue}")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._link.lost(reason)
        self._wake.set()

    def _drop_all(self) -> None:
        """Forget everything held: the broker delivers it again once the channels close."""
        for partition in self._partitions:
            partition.channel = None
            partition.entries.clear()
            partition.active = False
            partition.yielding = False
        self._entries.clear()
        self._control = None
        self._connection = None

    async def _rebuild(self) -> None:
        """Reconnect and subscribe again, with backoff, until it works or we stop."""
        attempt = 0
        reported = None
        while not self._stopping:
            self._drop_all()
            await self._link.close()
            try:
                await self._open_session()
            except asyncio.CancelledError:
                raise
            except (TransportError, *_LOST) as exc:
                attempt += 1
                if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    # Its queues were deleted under it: declare the group again.
                    self._t._topology.forget(self._group)
                text = describe(exc, self._t.settings.password)
                if not isinstance(exc, TransportUnavailableError | ConnectionError):
                    # Not an outage (those are logged once by the link): say each new one.
                    if text != reported:
                        log.warning("consumer of %s cannot subscribe: %s", self._group, text)
                    reported = text
            else:
                log.info("consumer of %s is consuming again", self._group)
                return
            await self._pause(min(5.0, 0.1 * 2 ** min(attempt, 10)))

    async def _pause(self, cap: float) -> None:
        """Sleep a jittered while, or less if we are told to stop."""
        sleeper = asyncio.ensure_future(self._t.clock.sleep(self._t._random.uniform(cap / 2, cap)))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([sleeper, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    # -- receiving ------------------------------------------------------------------------

    async def _on_message(
        self, partition: _Partition, channel: AbstractChannel, message: DeliveredMessage
    ) -> None:
        if channel is not partition.channel:
            return  # a closed channel's delivery: the broker has taken it back
        props = message.header.properties
        headers: dict[str, object] = dict(props.headers or {})
        routing = message.routing_key or ""
        body = message.body
        tag = message.delivery_tag or 0
        entry = _Entry(
            seq=next(self._seq),
            partition=partition,
            channel=channel,
            tag=tag,
            topic=text(headers.get(H_TOPIC)) or topic_of(routing),
            message_id=props.message_id or fallback_id(body),
            key=text(headers.get(H_KEY)),
            body=body,
            routing_key=routing,
            deliveries=_broker_deliveries(message, headers),
        )
        partition.entries[tag] = entry
        self._entries[entry.seq] = entry
        if not partition.active:
            partition.active = True
            self._rebalance_due = True
        self._wake.set()

    def _claim(self) -> list[_Entry]:
        now = self._t.clock.monotonic()
        rows = []
        for e in self._entries.values():
            lease = _BUSY if e.in_flight or e.parking is not None else None
            if lease is None and e.partition.yielding and not e.touched:
                # Untouched messages of a partition being handed over stay for the next
                # instance; they still block their key.
                lease = _BUSY
            rows.append(Candidate(e.seq, e.key, e.available_at, lease))
        chosen = [self._entries[seq] for seq in claimable(rows, now, self._max_batch)]
        for entry in chosen:
            entry.in_flight = True
        return chosen

    def _delivery(self, entry: _Entry) -> Delivery:
        return Delivery(
            self._group,
            entry.topic,
            entry.message_id,
            entry.key,
            entry.body,
            entry.attempt,
            entry,
        )

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            if self._broken is not None:
                self._rebuilding = True
                try:
                    await self._rebuild()
                finally:
                    self._rebuilding = False
                continue
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except _LOST as exc:
                self._break(describe(exc, self._t.settings.password))
            except Exception as exc:  # a bug must not kill the consumer silently
                log.exception("consumer of %s failed; reconnecting", self._group)
                self._break(f"{type(exc).__name__}: {exc}")

    def _silent(self) -> bool:
        """Whether the broker has been silent so long that it may soon drop us.

        The broker gives what a dropped connection held to another instance; this one
        learns it later (aiormq waits three heartbeats). So it stops handing out messages
        after three quarters of the heartbeat timeout without a frame, and goes on when
        one arrives. (aiormq keeps the time of the last frame in a private attribute; if
        it is missing, the guard is off.)
        """
        last = getattr(self._connection, "_Connection__last_frame_time", None)
        if not isinstance(last, float):
            return False
        silence = asyncio.get_running_loop().time() - last
        return silence > 0.75 * self._t.settings.heartbeat

    async def _step(self) -> None:
        self._wake.clear()
        if self._silent():
            await self._pause(0.2)
            return
        await self._retry_parking()
        batch = self._claim()
        if batch:
            outcomes = await call_handler(self._handler, [self._delivery(e) for e in batch])
            crashpoint("consumer.before_ack")
            await self._settle(batch, outcomes)
        if self._stopping:
            return
        await self._rebalance()
        if not batch:
            await self._idle()

    async def _idle(self) -> None:
        clock = self._t.clock
        now = clock.monotonic()
        timeout = self._t.settings.rebalance_interval
        for e in self._entries.values():
            if not e.in_flight and e.parking is None and e.available_at > now:
                timeout = min(timeout, e.available_at - now)
        if any(e.parking is not None for e in self._entries.values()):
            timeout = min(timeout, max(0.0, self._park_retry_at - now))
        if self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(clock.sleep(timeout))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    # -- settling -------------------------------------------------------------------------

    def _stale(self, entry: _Entry) -> bool:
        return entry.channel is not entry.partition.channel or entry.seq not in self._entries

    async def _settle(self, batch: Sequence[_Entry], outcomes: Sequence[Outcome]) -> None:
        now = self._t.clock.monotonic()
        acks: list[_Entry] = []
        parks: list[_Entry] = []
        for entry, outcome in zip(batch, outcomes, strict=True):
            entry.in_flight = False
            if self._stale(entry):
                continue  # its channel is gone: the broker delivers it again
            if isinstance(outcome, Ack):
                acks.append(entry)
            elif isinstance(outcome, DeadLetter):
                entry.parking = outcome.reason
                parks.append(entry)
            elif not outcome.count:
                entry.available_at = now + (outcome.delay or 0.0)
            elif entry.attempt >= self._policy.max_attempts:
                entry.parking = outcome.error
                parks.append(entry)
            else:
                delay = outcome.delay
                if delay is None:
                    delay = self._policy.backoff(entry.attempt, self._t._random.random())
                entry.failures += 1
                entry.available_at = now + delay
        if parks:
            acks.extend(await self._park(parks))
        await self._ack(acks)

    async def _park(self, entries: Sequence[_Entry]) -> list[_Entry]:
        """Publish dead letters (confirmed); return the entries that may now be acked."""
        dead_at = self._t.clock.time()
        records = [
            (
                DeadLetterRecord(
                    id=record_id(self._group, e.message_id),
                    group=self._group,
                    topic=e.topic,
                    message_id=e.message_id,
                    key=e.key,
                    body=e.body,
                    reason=e.parking or "",
                    attempts=e.attempt,
                    dead_at=dead_at,
                ),
                e.routing_key,
            )
            for e in entries
        ]
        try:
            await self._t._park(records)
        except TransportError as exc:
            # Keep them (their keys stay blocked) and try again shortly.
            self._park_failures += 1
            cap = min(5.0, 0.1 * 2 ** min(self._park_failures, 10))
            self._park_retry_at = self._t.clock.monotonic() + self._t._random.uniform(0, cap)
            log.warning(
                "consumer of %s could not park %d message(s): %s (retrying)",
                self._group,
                len(entries),
                exc,
            )
            return []
        self._park_failures = 0
        for entry in entries:
            entry.parking = None
        return list(entries)

    async def _retry_parking(self) -> None:
        if self._t.clock.monotonic() < self._park_retry_at:
            return
        waiting = [e for e in self._entries.values() if e.parking is not None and not e.in_flight]
        if waiting:
            await self._ack(await self._park(waiting))

    async def _ack(self, entries: Sequence[_Entry]) -> None:
        """Acknowledge, with one ``multiple`` ack per partition for the leading run."""
        by_partition: dict[int, set[int]] = {}
        for entry in entries:
            if not self._stale(entry):
                by_partition.setdefault(entry.partition.index, set()).add(entry.tag)
        for index, tags in by_partition.items():
            partition = self._partitions[index]
            channel = partition.channel
            assert channel is not None
            leading = None
            for tag in partition.entries:  # ascending delivery tags
                if tag not in tags:
                    break
                leading = tag
            for tag in tags:
                entry = partition.entries.pop(tag)
                del self._entries[entry.seq]
            if leading is not None:
                await channel.basic_ack(leading, multiple=True, wait=False)
            for tag in sorted(tags):
                if leading is None or tag > leading:
                    await channel.basic_ack(tag, wait=False)

    # -- sharing partitions between instances ---------------------------------------------

    async def _rebalance(self) -> None:
        clock = self._t.clock
        now = clock.monotonic()
        if len(self._partitions) > 1 and (self._rebalance_due or now >= self._next_rebalance):
            self._rebalance_due = False
            self._next_rebalance = now + self._t.settings.rebalance_interval
            await self._choose_surplus(now)
        for partition in self._partitions:
            if partition.yielding and not any(e.touched for e in partition.entries.values()):
                await self._hand_over(partition)

    async def _choose_surplus(self, now: float) -> None:
        mine = [p for p in self._partitions if p.active and not p.yielding]
        if len(mine) <= 1 or self._control is None:
            return
        declared = await self._control.queue_declare(
            self._t.names.members(self._group), passive=True
        )
        instances = max(1, declared.consumer_count or 1)
        share = math.ceil(len(self._partitions) / instances)
        surplus = len(mine) - share
        if surplus <= 0:
            return
        candidates = sorted(
            (p for p in mine if p.cooldown_until <= now),
            key=lambda p: sum(1 for e in p.entries.values() if e.touched),
        )
        for partition in candidates[:surplus]:
            partition.yielding = True
            log.debug(
                "consumer of %s hands partition %d over (%d instances)",
                self._group,
                partition.index,
                instances,
            )

    async def _hand_over(self, partition: _Partition) -> None:
        """Close the partition's channel (the broker returns what we held to the head of
        the queue and activates the next instance), then wait in line again."""
        channel = partition.channel
        connection = self._connection
        if channel is None or connection is None:
            return
        for entry in partition.entries.values():
            del self._entries[entry.seq]
        partition.entries.clear()
        partition.channel = None
        partition.cooldown_until = (
            self._t.clock.monotonic() + 5 * self._t.settings.rebalance_interval
        )
        await channel.close()
        await self._subscribe(connection, partition)


async def _ignore(_message: DeliveredMessage) -> None:
    """Nothing is ever published to a members queue."""
