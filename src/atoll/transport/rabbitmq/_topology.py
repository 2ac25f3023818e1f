"""Names of the exchanges and queues of a namespace, and declaring them idempotently.

Layout of namespace ``ns`` (see ``docs/transports.md``):

* ``ns.topics``: a durable direct exchange. A message on topic ``T`` with key ``K`` is
  published with routing key ``T@S``, ``S = crc32(K) % 16`` (the slot; keyless
  messages hash their id).
* ``ns.group.G.0`` .. ``ns.group.G.{P-1}``: group ``G``'s partition queues (quorum,
  single active consumer). Queue ``p`` is bound to ``T@S`` for every slot ``S`` with
  ``S % P == p`` and every topic ``T`` the group takes.
* ``ns.group.G.members``: one consumer per running instance of ``G`` (never gets
  messages): its consumer count tells instances how to share the partitions.
* ``ns.dead``: a fanout exchange and the classic queue behind it holding the dead
  letters; ``ns.dead.lock``: an exclusive queue that serialises dead-letter operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiormq
from aiormq.abc import AbstractChannel

from atoll.transport._base import TransportError, TransportUnavailableError
from atoll.transport.rabbitmq._connection import Link, describe
from atoll.transport.rabbitmq._settings import SLOTS, RabbitMQSettings

T = TypeVar("T")

#: The broker's limit for exchange and queue names and routing keys (AMQP short strings).
_MAX_NAME = 255
#: A group's members queue disappears this long after its last instance stopped.
_MEMBERS_EXPIRE_MS = 600_000


def slot_of(key: str | None, message_id: str) -> int:
    """The slot of a message: by its key (so a key keeps one queue), else by its id."""
    data = (key if key is not None else message_id).encode("utf-8", "surrogatepass")
    return zlib.crc32(data) % SLOTS


def routing_key(topic: str, slot: int) -> str:
    """The routing key of a message on ``topic`` in ``slot``."""
    return f"{topic}@{slot}"


def topic_of(routing: str) -> str:
    """The topic part of a routing key made by :func:`routing_key`."""
    topic, at, slot = routing.rpartition("@")
    return topic if at and slot.isdigit() else routing


class Names:
    """The exchange and queue names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.exchange = f"{namespace}.topics"
        self.dead_exchange = f"{namespace}.dead"
        self.dead_queue = f"{namespace}.dead"
        self.dead_lock = f"{namespace}.dead.lock"
        self._group_prefix = f"{namespace}.group."

    def partition(self, group: str, index: int) -> str:
        """The queue of partition ``index`` of ``group``."""
        return f"{self._group_prefix}{group}.{index}"

    def members(self, group: str) -> str:
        """The queue whose consumers are the running instances of ``group``."""
        return f"{self._group_prefix}{group}.members"

    def group_of(self, queue: str) -> str | None:
        """The group whose partition queue is ``queue``, if it is one."""
        if not queue.startswith(self._group_prefix):
            return None
        group, dot, index = queue[len(self._group_prefix) :].rpartition(".")
        return group if dot and index.isdigit() else None

    def check(self, group: str, topics: Sequence[str]) -> None:
        """Raise if a name would exceed the broker's limits."""
        if len(self.members(group).encode()) > _MAX_NAME:
            raise TransportError(f"group name {group[:40]!r}... is too long for RabbitMQ")
        for topic in topics:
            if len(routing_key(topic, SLOTS - 1).encode()) > _MAX_NAME:
                raise TransportError(f"topic {topic[:40]!r}... is too long for RabbitMQ")


class Topology:
    """Declares the namespace, groups and bindings, each at most once per process.

    Everything is durable and declared with the same arguments every time, so any
    process may declare anything again (idempotent). A group keeps the partition count
    it was created with; a process configured with another count is refused with a
    clear error rather than binding slots to the wrong queues.
    """

    def __init__(self, settings: RabbitMQSettings, names: Names, link: Link) -> None:
        self.settings = settings
        self.names = names
        self._link = link
        self._lock = asyncio.Lock()
        self._channel: AbstractChannel | None = None
        self._namespace_ready = False
        self._groups: set[str] = set()
        self._bound: set[tuple[str, str]] = set()

    def partition_arguments(self) -> dict[str, Any]:
        """Arguments of every partition queue."""
        return {
            "x-queue-type": self.settings.queue_type,
            "x-single-active-consumer": True,
            # Whatever the broker itself dead-letters (a policy's delivery limit or
            # length limit, an expired message) lands with the dead letters, not nowhere.
            "x-dead-letter-exchange": self.names.dead_exchange,
        }

    async def _open_channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed:
            connection = await self._link.get()
            channel = self._channel = await connection.channel()
        return channel

    async def _call(self, what: str, operation: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """Run ``operation`` on the topology channel, mapping broker errors."""
        channel = await self._open_channel()
        try:
            return await operation(channel)
        except aiormq.exceptions.AMQPChannelError as exc:
            self._channel = None
            raise TransportError(
                f"RabbitMQ at {self.settings.redacted}: {what} failed:"
                f" {describe(exc, self.settings.password)}"
            ) from None
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            self._channel = None
            raise TransportUnavailableError(
                f"RabbitMQ at {self.settings.redacted}: {what} failed:"
                f" {describe(exc, self.settings.password)}"
            ) from None

    async def _exists(self, queue: str) -> bool:
        """Whether ``queue`` exists (a failed passive declare closes its channel)."""

        async def probe(channel: AbstractChannel) -> bool:
            try:
                await channel.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._channel = None
                return False
            return True

        return await self._call(f"checking queue {queue}", probe)

    async def namespace(self) -> None:
        """Declare the namespace's exchange and its dead-letter exchange and queue."""
        if self._namespace_ready:
            return
        names = self.names

        async def declare(channel: AbstractChannel) -> None:
            await channel.exchange_declare(names.exchange, exchange_type="direct", durable=True)
            await channel.exchange_declare(
                names.dead_exchange, exchange_type="fanout", durable=True
            )
            # Classic: listing dead letters hands them out and takes them back; a classic
            # queue keeps their places and has no delivery limit to run into.
            await channel.queue_declare(
                names.dead_queue, durable=True, arguments={"x-queue-type": "classic"}
            )
            await channel.queue_bind(names.dead_queue, names.dead_exchange, routing_key="")

        async with self._lock:
            if not self._namespace_ready:
                await self._call(f"declaring namespace {names.namespace!r}", declare)
                self._namespace_ready = True

    def known(self, group: str, topic: str) -> bool:
        """Whether this process already declared ``group``'s binding to ``topic``."""
        return (group, topic) in self._bound

    def forget(self, group: str) -> None:
        """Declare ``group`` again next time (its queues were found missing)."""
        self._groups.discard(group)
        self._bound = {b for b in self._bound if b[0] != group}

    def forget_namespace(self) -> None:
        """Declare everything again next time (the exchange was found missing)."""
        self._namespace_ready = False
        self._groups.clear()
        self._bound.clear()

    async def group(self, group: str, topics: Sequence[str]) -> int:
        """Declare ``group``'s partition queues and bind them to ``topics``.

        Returns the group's partition count.
        """
        partitions = self.settings.partitions
        if group in self._groups and all((group, t) in self._bound for t in topics):
            return partitions
        self.names.check(group, topics)
        await self.namespace()
        async with self._lock:
            if group not in self._groups:
                await self._partitions(group)
                self._groups.add(group)
            for topic in topics:
                if (group, topic) not in self._bound:
                    await self._bind(group, topic)
                    self._bound.add((group, topic))
        return partitions

    async def _partitions(self, group: str) -> None:
        """Create (or check) the group's partition queues; refuse a different count.

        Queues are created from the last to the first, so whoever sees the first one
        knows its creator made all of them: a group with fewer queues is told apart from
        one being created right now by another process. A group with more queues is
        checked for after declaring, which also catches two processes creating one
        group at once with different counts (the one with fewer fails before binding).
        """
        names, count = self.names, self.settings.partitions
        existed = await self._exists(names.partition(group, 0))
        if existed and count > 1 and not await self._exists(names.partition(group, count - 1)):
            raise self._mismatch(group, "fewer")
        arguments = self.partition_arguments()

        async def declare(channel: AbstractChannel) -> None:
            for index in reversed(range(count)):
                await channel.queue_declare(
                    names.partition(group, index), durable=True, arguments=arguments
                )

        await self._call(f"declaring the queues of group {group!r}", declare)
        if count < SLOTS and await self._exists(names.partition(group, count)):
            raise self._mismatch(group, "more")

    def _mismatch(self, group: str, which: str) -> TransportError:
        return TransportError(
            f"RabbitMQ at {self.settings.redacted}: group {group!r} in namespace"
            f" {self.names.namespace!r} was created with {which} than"
            f" partitions={self.settings.partitions} queues; every process of a system must"
            " use the same partitions option (delete the group's queues to change it)"
        )

    async def _bind(self, group: str, topic: str) -> None:
        names, count = self.names, self.settings.partitions

        async def bind(channel: AbstractChannel) -> None:
            for slot in range(SLOTS):
                await channel.queue_bind(
                    names.partition(group, slot % count),
                    names.exchange,
                    routing_key=routing_key(topic, slot),
                )

        await self._call(f"binding group {group!r} to topic {topic!r}", bind)

    async def members_queue(self, channel: AbstractChannel, group: str) -> str:
        """Declare (on ``channel``) the queue whose consumers are ``group``'s instances."""
        queue = self.names.members(group)
        await channel.queue_declare(
            queue,
            durable=True,
            arguments={"x-queue-type": "classic", "x-expires": _MEMBERS_EXPIRE_MS},
        )
        return queue

    async def close(self) -> None:
        """Close the topology channel."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
