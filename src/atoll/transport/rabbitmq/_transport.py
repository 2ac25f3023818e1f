"""The RabbitMQ transport: durable, confirmed publishing; partitioned, ordered consuming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple

import aiormq

from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.transport._base import (
    BatchHandler,
    DeadLetterRecord,
    DeadLetterStore,
    OutgoingMessage,
    RedeliveryPolicy,
    Transport,
    TransportError,
    TransportUnavailableError,
    command_group,
)
from atoll.transport.rabbitmq._connection import Link, describe
from atoll.transport.rabbitmq._consumer import RabbitMQConsumer
from atoll.transport.rabbitmq._dead_letters import H_KEY, H_TOPIC, RabbitMQDeadLetters, dead_headers
from atoll.transport.rabbitmq._settings import RabbitMQSettings
from atoll.transport.rabbitmq._topology import Names, Topology, routing_key, slot_of

_PERSISTENT = 2


class _Publish(NamedTuple):
    exchange: str
    routing_key: str
    body: bytes
    properties: aiormq.spec.Basic.Properties
    mandatory: bool


def _properties(message_id: str, headers: dict[str, Any]) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        delivery_mode=_PERSISTENT, message_id=message_id, headers=headers
    )


class RabbitMQTransport(Transport):
    """Every point of the :class:`Transport` contract on RabbitMQ (3.8 or later).

    * Publishing: persistent messages on a direct exchange per namespace, each routed
      to a slot by a hash of its key; :meth:`publish` pipelines a batch and returns once
      the broker confirmed all of it (publisher confirms).
    * Groups: a few partition queues per group (quorum queues with single active
      consumer), each bound to the group's topics for its share of the slots; a
      command topic's group is declared on first publish, so commands wait for it.
    * Consuming: one connection per consumer and a channel per partition with its own
      prefetch; per-key order and retries are kept in the consumer; instances share a
      group's partitions (see :mod:`atoll.transport.rabbitmq._consumer`).
    * Dead letters: a queue per namespace behind a dead-letter exchange, records in
      headers (see :mod:`atoll.transport.rabbitmq._dead_letters`).

    ``docs/transports.md`` has the design and the URL options.
    """

    messaging_system = "rabbitmq"

    shared_between_processes = True

    def __init__(
        self,
        settings: RabbitMQSettings,
        *,
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self._random = random or RandomSource(clock=self.clock)
        self.names = Names(settings.namespace)
        self._link = Link(settings, "publisher", self.clock, self._random)
        self._topology = Topology(settings, self.names, self._link)
        self._channel: aiormq.Channel | None = None
        self._channel_lock = asyncio.Lock()
        self._consumers: list[RabbitMQConsumer] = []
        self._pending: set[asyncio.Task[Any]] = set()
        self._dead = RabbitMQDeadLetters(self)

    @classmethod
    def from_url(
        cls, url: str, *, clock: Clock | None = None, random: RandomSource | None = None
    ) -> RabbitMQTransport:
        """A transport for ``amqp://user:pass@host:port/vhost?options`` (or ``amqps://``)."""
        return cls(RabbitMQSettings.from_url(url), clock=clock, random=random)

    def __repr__(self) -> str:
        return f"RabbitMQTransport({self.settings.redacted!r})"

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self._dead

    # -- connection -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (retrying an unreachable broker with backoff) and declare the namespace.

        A refusal (wrong credentials, unknown virtual host, TLS) raises at once.
        """
        await self._link.wait()
        await self._topology.namespace()

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.stop()
        self._consumers.clear()
        if self._pending:
            await asyncio.wait(list(self._pending))
        await self._topology.close()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
        await self._link.close()

    def _forget(self, consumer: RabbitMQConsumer) -> None:
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    def _background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        topology = self._topology
        await topology.namespace()  # once per process, or again after it went missing
        for message in messages:
            owner = command_group(message.topic)
            if owner is not None and not topology.known(owner, message.topic):
                # A command waits for its service even if that service never ran.
                await topology.group(owner, [message.topic])
        exchange = self.names.exchange
        batch = []
        for m in messages:
            headers: dict[str, Any] = {H_TOPIC: m.topic}
            if m.key is not None:
                headers[H_KEY] = m.key
            route = routing_key(m.topic, slot_of(m.key, m.message_id))
            batch.append(
                _Publish(exchange, route, m.body, _properties(m.message_id, headers), False)
            )
        await self._send(batch, f"publishing {len(messages)} message(s)")

    async def _park(self, records: Sequence[tuple[DeadLetterRecord, str]]) -> None:
        """Put dead letters in the namespace's dead-letter queue (confirmed)."""
        await self._topology.namespace()
        exchange = self.names.dead_exchange
        await self._send(
            [
                _Publish(
                    exchange,
                    "",
                    record.body,
                    _properties(record.message_id, dead_headers(record, route)),
                    True,
                )
                for record, route in records
            ],
            f"parking {len(records)} dead letter(s)",
        )

    async def _replay(self, record: DeadLetterRecord, slot: int) -> None:
        """Deliver a dead letter's message again, to its group only (confirmed)."""
        partitions = await self._topology.group(record.group, [])
        queue = self.names.partition(record.group, slot % partitions)
        headers: dict[str, Any] = {H_TOPIC: record.topic}
        if record.key is not None:
            headers[H_KEY] = record.key
        await self._send(
            [_Publish("", queue, record.body, _properties(record.message_id, headers), True)],
            f"replaying dead letter {record.id} to {queue}",
        )

    async def _confirming_channel(self) -> aiormq.Channel:
        async with self._channel_lock:
            channel = self._channel
            if channel is None or channel.is_closed:
                connection = await self._link.get()
                opened = await connection.channel(publisher_confirms=True)
                assert isinstance(opened, aiormq.Channel)  # for basic_publish(wait=...)
                channel = self._channel = opened
            return channel

    async def _send(self, batch: Sequence[_Publish], what: str) -> None:
        """Publish ``batch`` in order, pipelined, and wait for every confirm."""
        where = self.settings.redacted
        try:
            channel = await self._confirming_channel()
        except aiormq.exceptions.AMQPError as exc:
            raise TransportUnavailableError(
                f"RabbitMQ at {where}: {what} failed: {describe(exc, self.settings.password)}"
            ) from None
        loop = asyncio.get_running_loop()
        # Tasks take the channel's lock in creation order, so frames go out in order.
        tasks = [
            loop.create_task(
                channel.basic_publish(
                    p.body,
                    exchange=p.exchange,
                    routing_key=p.routing_key,
                    properties=p.properties,
                    mandatory=p.mandatory,
                    # Queue the frames and return to the confirm: waiting for each
                    # socket write under the channel's lock would serialise the batch.
                    wait=False,
                )
            )
            for p in batch
        ]
        try:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.publish_timeout)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            self._channel = None
            raise TransportUnavailableError(
                f"RabbitMQ at {where}: {what}: no confirm within"
                f" {self.settings.publish_timeout:.0f}s (is a memory or disk alarm blocking"
                " publishers?)"
            )
        for task in tasks:
            failure = task.exception()
            if failure is not None:
                raise self._publish_error(failure, what) from None

    def _publish_error(self, exc: BaseException, what: str) -> TransportError:
        where = self.settings.redacted
        reason = describe(exc, self.settings.password)
        if isinstance(exc, aiormq.exceptions.PublishError):
            return TransportError(f"RabbitMQ at {where}: {what}: returned unroutable ({reason})")
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return TransportUnavailableError(f"RabbitMQ at {where}: {what}: refused ({reason})")
        self._channel = None
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            self._topology.forget_namespace()
            return TransportError(f"RabbitMQ at {where}: {what}: {reason}")
        return TransportUnavailableError(
            f"RabbitMQ at {where}: {what} failed, the connection was lost ({reason})"
        )

    # -- consuming ------------------------------------------------------------------------

    async def declare(self, group: str, topics: Sequence[str]) -> None:
        await self._topology.group(group, topics)

    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> RabbitMQConsumer:
        consumer = RabbitMQConsumer(
            self,
            group,
            topics=topics,
            handler=handler,
            policy=policy or RedeliveryPolicy(),
            max_batch=max_batch,
        )
        await consumer.start()
        self._consumers.append(consumer)
        return consumer
