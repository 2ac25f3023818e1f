"""The NATS JetStream transport."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.transport._base import (
    BatchHandler,
    DeadLetterStore,
    OutgoingMessage,
    RedeliveryPolicy,
    Transport,
    TransportError,
    TransportUnavailableError,
    command_group,
)
from atoll.transport.nats._consumer import NatsConsumer
from atoll.transport.nats._dead_letters import NatsDeadLetters
from atoll.transport.nats._link import (
    ERR_STREAM_EXISTS,
    ERR_STREAM_NOT_FOUND,
    ERR_SUBJECTS_OVERLAP,
    ERR_WRONG_LAST_SEQUENCE,
    Link,
    NatsApiError,
)
from atoll.transport.nats._names import Names, header_value, partition_of, token
from atoll.transport.nats._settings import NatsSettings

log = logging.getLogger("atoll.transport.nats")
#: Creating a stream that another process is creating at the same moment can fail
#: before that stream is visible; a few tries settle it.
_CREATE_ATTEMPTS = 5

DEFAULT_PARTITIONS = 16
DEFAULT_LEASE = 10.0
_SECOND = 1_000_000_000


class NatsTransport(Transport):
    """The :class:`~atoll.transport.Transport` contract on NATS JetStream.

    ``nats://[user:pass@]host:port?namespace=...`` (see ``docs/transports.md``). Topics
    fan out to groups when published (each subscribed group gets its own copy on
    ``atoll.<ns>.g.<group>.<partition>``); a group's partitions are work-queue subjects
    with one durable pull consumer each, owned by one member of the group at a time,
    which keeps each key in order. ``publish`` returns when the server confirmed every
    message (``Nats-Msg-Id`` suppresses a relay's re-publish).
    """

    messaging_system = "nats"

    def __init__(
        self,
        settings: NatsSettings | str,
        *,
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.settings = (
            settings if isinstance(settings, NatsSettings) else NatsSettings.from_url(settings)
        )
        self.clock: Clock = clock or SystemClock()
        self._random = random or RandomSource(clock=self.clock)
        self.names = Names(self.settings.namespace)
        #: Settled at :meth:`connect` from what the namespace was created with.
        self.partitions = self.settings.partitions or DEFAULT_PARTITIONS
        self.lease = self.settings.lease or DEFAULT_LEASE
        self._sub = Link(
            self.settings,
            name="atoll-consume",
            reconnect=True,
            clock=self.clock,
            on_reconnect=self._reconnected,
        )
        self._pub: Link | None = None
        self._pub_lock = asyncio.Lock()
        self._connected = False
        self._consumers: list[NatsConsumer] = []
        self._declared: set[tuple[str, str]] = set()
        self._groups_ready: set[str] = set()
        self._dead = NatsDeadLetters(self)
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_url(
        cls, url: str, *, clock: Clock | None = None, random: RandomSource | None = None
    ) -> NatsTransport:
        """The transport for a ``nats://`` URL (credentials may come from the environment)."""
        return cls(NatsSettings.from_url(url), clock=clock, random=random)

    def __repr__(self) -> str:
        return f"NatsTransport({self.settings.display!r})"

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self._dead

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (retrying for ``connect_timeout``), then create streams if missing."""
        if self._connected:
            return
        await self._sub.open(self.settings.connect_timeout)
        try:
            await self._ensure_streams()
        except BaseException:
            await self._sub.close()
            raise
        self._connected = True

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.stop()
        while self._background:
            await asyncio.wait(list(self._background))
        if self._pub is not None:
            await self._pub.close()
            self._pub = None
        await self._sub.close()
        self._connected = False

    async def delete_namespace(self) -> None:
        """Delete every stream of this namespace (messages, dead letters, coordination).

        For tests and for tearing a system down; it cannot be undone.
        """
        for stream in self.names.streams():
            try:
                await self._sub.api(f"STREAM.DELETE.{stream}")
            except NatsApiError as exc:
                if exc.code != ERR_STREAM_NOT_FOUND:
                    raise

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget(self, consumer: NatsConsumer) -> None:
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    async def _reconnected(self) -> None:
        for consumer in self._consumers:
            consumer.on_reconnect()

    async def _ensure_streams(self) -> None:
        """Create the namespace's streams (idempotent) and settle its fixed settings."""
        s, names = self.settings, self.names
        window = int(s.duplicate_window * _SECOND)
        lease = int((s.lease or DEFAULT_LEASE) * _SECOND)
        common: dict[str, Any] = {"storage": s.storage, "num_replicas": s.replicas}
        configs: dict[str, dict[str, Any]] = {
            names.stream: {
                "subjects": [names.messages_filter],
                "retention": "workqueue",
                "duplicate_window": window,
            },
            names.dlq_stream: {
                "subjects": [names.dlq_filter],
                "retention": "limits",
                "duplicate_window": window,
                "allow_direct": True,
            },
            names.meta_stream: {
                "subjects": [f"{names.prefix}.meta.>"],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "allow_direct": True,
            },
            names.coord_stream: {
                "subjects": [f"{names.prefix}.c.>"],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "max_age": lease,
                "duplicate_window": min(lease, window),
                "allow_direct": True,
            },
        }
        for stream, config in configs.items():
            info = await self._create_stream(stream, {"name": stream, **config, **common})
            if stream == names.coord_stream:
                self.lease = int(info["config"]["max_age"]) / _SECOND
        if s.lease is not None and abs(self.lease - s.lease) > 1e-3:
            log.warning(
                "%s: namespace %s was created with leases of %gs; using that, not lease=%g",
                s.display,
                s.namespace,
                self.lease,
                s.lease,
            )
        self.partitions = await self._partition_count()

    async def _create_stream(self, stream: str, request: dict[str, Any]) -> dict[str, Any]:
        """Create ``stream``, or take it as it is if another process created it first."""
        for _ in range(_CREATE_ATTEMPTS):
            try:
                info: dict[str, Any] = await self._sub.api(f"STREAM.CREATE.{stream}", request)
            except NatsApiError as exc:
                if exc.code not in (ERR_STREAM_EXISTS, ERR_SUBJECTS_OVERLAP):
                    raise
                # Created by another process (with other options, or at this very moment,
                # which the server reports as overlapping subjects): use it as it is.
                try:
                    info = await self._sub.api(f"STREAM.INFO.{stream}")
                except NatsApiError as missing:
                    if missing.code != ERR_STREAM_NOT_FOUND:
                        raise
                    failure = exc  # not visible yet, or the subjects are another stream's
                    await self.clock.sleep(0.05)
                    continue
            return info
        raise failure

    async def _partition_count(self) -> int:
        s, names = self.settings, self.names
        for _ in range(5):
            msg = await self._sub.direct_get(names.meta_stream, names.config_subject)
            if msg is None:
                wanted = s.partitions or DEFAULT_PARTITIONS
                try:
                    await self._sub.store(
                        names.config_subject,
                        json.dumps({"partitions": wanted}).encode(),
                        {"Nats-Expected-Last-Subject-Sequence": "0"},
                    )
                except NatsApiError as exc:
                    if exc.code == ERR_WRONG_LAST_SEQUENCE:
                        continue  # another process created it first: read theirs
                    raise
                return wanted
            stored = int(json.loads(msg.data)["partitions"])
            if s.partitions is not None and s.partitions != stored:
                raise TransportError(
                    f"{s.display}: namespace {s.namespace} has {stored} partitions, the URL"
                    f" asks for {s.partitions}; the partition count is fixed when a namespace"
                    " is created (per-key order depends on it)"
                )
            return stored
        raise TransportError(f"{s.display}: cannot read the settings of namespace {s.namespace}")

    # -- publishing -----------------------------------------------------------------------

    async def _publisher(self) -> Link:
        link = self._pub
        if link is not None and link.connected:
            return link
        async with self._pub_lock:
            link = self._pub
            if link is not None and link.connected:
                return link
            if link is not None:
                await link.close()
                self._pub = None
            link = Link(self.settings, name="atoll-publish", reconnect=False, clock=self.clock)
            await link.open_once(min(5.0, self.settings.connect_timeout))
            self._pub = link
            return link

    async def _subscribers(self, link: Link, topics: set[str]) -> dict[str, list[str]]:
        """The group tokens subscribed to each topic, read now (declarations are durable)."""
        names = self.names
        ordered = sorted(topics)
        found = await asyncio.gather(
            *(link.direct_get(names.meta_stream, names.subscription_subject(t)) for t in ordered)
        )
        result: dict[str, list[str]] = {}
        for topic, msg in zip(ordered, found, strict=True):
            groups = set(json.loads(msg.data)) if msg is not None else set()
            owner = command_group(topic)
            if owner is not None:
                groups.add(owner)  # a command waits for its service even before it declared
            result[topic] = sorted(token(g) for g in groups)
        return result

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish every message to every subscribed group; return once all are confirmed.

        Messages go out back to back on one connection and the PubAcks are awaited
        together. That connection never reconnects on its own (nats-py would replay its
        buffer on a new connection, which could store a later message of a key after an
        earlier one was lost), so what the server stored of a failed batch is a prefix of
        it, and the relay's retry stores the rest in order; ``Nats-Msg-Id`` makes the
        server drop what it already had.
        """
        if not messages:
            return
        link = await self._publisher()
        names = self.names
        subscribers = await self._subscribers(link, {m.topic for m in messages})
        sent: list[tuple[str, asyncio.Future[Any]]] = []
        try:
            for m in messages:
                groups = subscribers[m.topic]
                if not groups:
                    continue
                subject_partition = partition_of(m.key, m.message_id, self.partitions)
                common = {
                    "Atoll-Topic": header_value(m.topic),
                    "Atoll-Id": header_value(m.message_id),
                }
                if m.key is not None:
                    common["Atoll-Key"] = header_value(m.key)
                for gtok in groups:
                    subject = names.subject(gtok, subject_partition)
                    headers = {"Nats-Msg-Id": f"{common['Atoll-Id']}:{gtok}", **common}
                    sent.append((subject, await link.send(subject, m.body, headers)))
            async with asyncio.timeout(self.settings.publish_timeout):
                replies = await asyncio.gather(*(f for _, f in sent))
        except TimeoutError:
            link.forget([f for _, f in sent])
            raise TransportUnavailableError(
                f"NATS at {self.settings.display} did not confirm {len(sent)} messages within"
                f" {self.settings.publish_timeout:g}s"
            ) from None
        except BaseException:
            link.forget([f for _, f in sent])
            raise
        last: dict[str, int] = {}
        for (subject, _), reply in zip(sent, replies, strict=True):
            ack = link.pub_ack(reply, subject)
            seq = int(ack.get("seq", 0))
            if not ack.get("duplicate") and seq < last.get(subject, 0):
                log.error("NATS stored messages of %s out of publish order", subject)
            last[subject] = max(seq, last.get(subject, 0))

    # -- subscribing ----------------------------------------------------------------------

    async def declare(self, group: str, topics: Sequence[str]) -> None:
        await asyncio.gather(
            *(
                self._register(topic, group)
                for topic in topics
                if (topic, group) not in self._declared
            )
        )
        if group not in self._groups_ready:
            await self._create_consumers(group)
            self._groups_ready.add(group)

    async def _register(self, topic: str, group: str) -> None:
        """Add ``group`` to the topic's subscribers (compare-and-set on its last sequence)."""
        names = self.names
        subject = names.subscription_subject(topic)
        for _ in range(20):
            msg = await self._sub.direct_get(names.meta_stream, subject)
            groups: list[str] = [] if msg is None else json.loads(msg.data)
            if group in groups:
                break
            last = "0" if msg is None else (msg.headers or {}).get("Nats-Sequence", "0")
            try:
                await self._sub.store(
                    subject,
                    json.dumps(sorted([*groups, group])).encode(),
                    {"Nats-Expected-Last-Subject-Sequence": last},
                )
            except NatsApiError as exc:
                if exc.code == ERR_WRONG_LAST_SEQUENCE:
                    continue  # declared concurrently elsewhere: read again
                raise
            break
        else:
            raise TransportError(f"{self.settings.display}: could not record {group} on {topic}")
        self._declared.add((topic, group))

    async def _create_consumers(self, group: str) -> None:
        """One durable pull consumer per partition (idempotent; updates ack_wait)."""
        s, names = self.settings, self.names
        gtok = token(group)

        async def create(partition: int) -> None:
            name = names.consumer(gtok, partition)
            config = {
                "durable_name": name,
                "filter_subject": names.subject(gtok, partition),
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": int(s.ack_wait * _SECOND),
                # atoll parks after the group's max_attempts itself, keeping the reason;
                # a server limit would leave the message stuck, blocking its key.
                "max_deliver": -1,
                "max_ack_pending": s.max_ack_pending,
                # One pull at a time: the server refuses a second puller outright.
                "max_waiting": 1,
                "replay_policy": "instant",
            }
            await self._sub.api(
                f"CONSUMER.DURABLE.CREATE.{names.stream}.{name}",
                {"stream_name": names.stream, "config": config},
            )

        await asyncio.gather(*(create(p) for p in range(self.partitions)))

    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> NatsConsumer:
        await self.declare(group, topics)
        consumer = NatsConsumer(self, group, handler, policy or RedeliveryPolicy(), max_batch)
        self._consumers.append(consumer)
        try:
            await consumer.start()
        except BaseException:
            consumer.abandon()
            raise
        return consumer
