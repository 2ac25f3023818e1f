"""The Redis Streams transport: topics are streams, groups are consumer groups.

See ``docs/transports.md`` (Redis Streams) for the design and ``_scripts.py`` for the
key layout. In short: publishing appends to a topic's stream with ids from one clock per
namespace; each consumer runs one Lua script per batch that settles the previous batch
and claims the next (reclaiming deliveries of dead consumers with XAUTOCLAIM, taking due
retries, reading new entries with XREADGROUP) while keeping per-key order with a lock
per key and a queue of the entries waiting behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
    TransportError,
    TransportUnavailableError,
    command_group,
)
from atoll.transport._claim import call_handler
from atoll.transport.redis import _scripts
from atoll.transport.redis._settings import RedisSettings

log = logging.getLogger("atoll.transport")

T = TypeVar("T")

#: At most this many messages per publish script, so one script never runs long.
_PUBLISH_CHUNK = 1000

#: Errors after which the same call may succeed later (the server is down, restarting,
#: loading its data, a replica during failover, or out of memory).
_TRANSIENT = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    OSError,
)
_AUTH = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
    redis_errors.AuthenticationWrongNumberOfArgsError,
)

#: URLs whose durability has been checked in this process (one warning each).
_checked_durability: set[str] = set()


class _Token(msgspec.Struct, frozen=True):
    """What settling a delivery needs: its ref and the key its claim locked (raw)."""

    ref: str
    lock_key: bytes | None


def _decode(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


_U32 = struct.Struct(">I")
_TWO_U32 = struct.Struct(">II")


def _unpack_batch(blob: bytes) -> list[tuple[str, int, dict[bytes, bytes]]]:
    """The claim script's batch: per entry its ref, attempts and fields (see SETTLE_AND_CLAIM)."""
    entries = []
    pos, end = 0, len(blob)
    u32 = _U32.unpack_from
    while pos < end:
        (size,) = u32(blob, pos)
        ref = blob[pos + 4 : pos + 4 + size].decode("utf-8", "replace")
        pos += 4 + size
        attempts, count = _TWO_U32.unpack_from(blob, pos)
        pos += 8
        fields = {}
        for _ in range(count):
            (size,) = u32(blob, pos)
            name = blob[pos + 4 : pos + 4 + size]
            pos += 4 + size
            (size,) = u32(blob, pos)
            fields[name] = blob[pos + 4 : pos + 4 + size]
            pos += 4 + size
        entries.append((ref, attempts, fields))
    return entries


class _RedisConsumer:
    def __init__(
        self,
        transport: RedisTransport,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy,
        max_batch: int,
    ) -> None:
        t = transport
        self._t = t
        self._group = group
        self._handler = handler
        self._policy = policy
        self._max_batch = max_batch
        self.name = f"{socket.gethostname()}:{os.getpid()}:{t._random.new_id()[-12:]}"
        self._topic_of = {t._topic_key(topic): topic for topic in topics}
        self.streams = [*self._topic_of, t._direct_key(group)]
        self.prefix = t._group_prefix(group)
        self.wake_key = self.prefix + "wake"
        self._tops: dict[str, bytes] = {}
        self._foreign: dict[object, str] = {}
        self._stopping = False
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_trim = -math.inf

    @property
    def group(self) -> str:
        return self._group

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        self._t._forget(self)
        with contextlib.suppress(Exception):
            await self._t._retire(self)

    def abandon(self) -> None:
        """Die without settling (a simulated crash): leases lapse after ``lease`` seconds."""
        self._stopping = True
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()
        self._t._forget(self)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        t = self._t
        settle: tuple[Sequence[Delivery], Sequence[Outcome]] | None = None
        failures = 0
        while True:
            stopping = self._stopping
            if stopping and settle is None:
                return
            try:
                batch, next_due, more = await t._settle_and_claim(
                    self, settle, 0 if stopping else self._max_batch
                )
            except Exception as exc:
                failures += 1
                t._log_failure(f"consumer {self._group}", exc)
                if stopping and failures >= 3:
                    assert settle is not None
                    log.warning(
                        "consumer %s stops without settling %d deliveries; they go to"
                        " another consumer once their lease (%gs) lapses",
                        self._group,
                        len(settle[0]),
                        t.settings.lease,
                    )
                    return
                await self._pause(t._random.uniform(0.5, 1.0) * min(5.0, 0.05 * 2**failures))
                continue
            if failures:
                t._log_recovered(f"consumer {self._group}")
            failures = 0
            settle = None
            if stopping:
                return
            await self._maybe_trim()
            if not batch:
                if not more:
                    await self._wait(next_due)
                continue
            outcomes = await self._handle(batch)
            crashpoint("consumer.before_ack")
            settle = (batch, outcomes)

    async def _handle(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        mine: list[Delivery] = []
        for i, d in enumerate(batch):
            reason = self._foreign.pop(d.token, None)
            if reason is not None:
                log.warning("consumer %s: dead-lettering %s", self._group, reason)
                outcomes[i] = DeadLetter(reason=reason)
            else:
                mine.append(d)
        if mine:
            renew = asyncio.get_running_loop().create_task(self._renew(mine))
            try:
                handled = list(await call_handler(self._handler, mine))
            finally:
                renew.cancel()
            it = iter(handled)
            outcomes = [o if o is not None else next(it) for o in outcomes]
        return [o for o in outcomes if o is not None]

    async def _renew(self, batch: Sequence[Delivery]) -> None:
        """Keep the leases of a batch whose handler takes long (a third of a lease each)."""
        t = self._t
        refs = [d.token.ref for d in batch if isinstance(d.token, _Token)]
        while True:
            await t.clock.sleep(t.settings.lease / 3)
            try:
                await t._renew(self._group, self.name, refs)
            except Exception as exc:
                t._log_failure(f"consumer {self._group} renewing leases", exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the consumer is told to stop."""
        sleeper = asyncio.ensure_future(self._t.clock.sleep(seconds))
        stopper = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([sleeper, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _wait(self, next_due_ms: int) -> None:
        """Block until a stream gets a new entry, the next retry is due, or a poll is due."""
        t = self._t
        timeout = min(t.settings.poll_interval, t.settings.lease / 2)
        if next_due_ms >= 0:
            timeout = min(timeout, next_due_ms / 1000)
        block_ms = int(timeout * 1000)
        if block_ms < 1:
            return
        streams = {key: self._tops.get(key, b"$") for key in [*self.streams, self.wake_key]}
        reader = asyncio.ensure_future(t._block(streams, block_ms))
        stopper = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([reader, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(BaseException):
                await reader  # errors show up in the next claim, which backs off

    async def _maybe_trim(self) -> None:
        t = self._t
        now = t.clock.monotonic()
        if now - self._last_trim < t.settings.trim_interval:
            return
        self._last_trim = now
        await t._trim(self.streams)

    # -- decoding -------------------------------------------------------------------------

    def decode(self, blob: bytes, tops: Sequence[bytes]) -> list[Delivery]:
        """Deliveries from the claim script's batch; remember foreign entries' reasons."""
        self._tops = {_decode(tops[i]): tops[i + 1] for i in range(0, len(tops), 2)}
        batch = []
        for ref, attempts, fields in _unpack_batch(blob):
            stream, _, entry_id = ref.rpartition("|")
            lock_key = fields.get(b"key")
            token = _Token(ref, lock_key)
            topic = self._topic_of.get(stream)
            if topic is None:  # the group's own stream: replayed dead letters
                topic = _decode(fields.get(b"topic", stream.encode()))
            body, message_id = fields.get(b"body"), fields.get(b"id")
            if body is None or message_id is None:
                names = ", ".join(sorted(_decode(f) for f in fields))
                self._foreign[token] = (
                    f"not an atoll message: entry {entry_id} of stream {stream} has fields"
                    f" ({names}); atoll entries have 'id' and 'body' (and 'key')"
                )
                body = msgspec.json.encode({_decode(k): _decode(v) for k, v in fields.items()})
                batch.append(
                    Delivery(self._group, topic, entry_id, None, body, int(attempts), token)
                )
                continue
            key = None if lock_key is None else _decode(lock_key)
            batch.append(
                Delivery(self._group, topic, _decode(message_id), key, body, int(attempts), token)
            )
        return batch


class _RedisDeadLetters(DeadLetterStore):
    def __init__(self, transport: RedisTransport) -> None:
        self._t = transport

    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        t = self._t
        index = t._dlq + (":all" if group is None else f":g:{group}")

        async def work(client: Any) -> list[DeadLetterRecord]:
            ids = await client.zrange(index, 0, max(0, limit - 1))
            if not ids or limit <= 0:
                return []
            pipe = client.pipeline(transaction=False)
            for record_id in ids:
                pipe.hgetall(f"{t._dlq}:r:{_decode(record_id)}")
            rows = await pipe.execute()
            return [
                _record(_decode(record_id), row)
                for record_id, row in zip(ids, rows, strict=True)
                if row
            ]

        return await t._run("listing dead letters", work)

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        t = self._t

        async def work(client: Any) -> DeadLetterRecord | None:
            row = await client.hgetall(f"{t._dlq}:r:{record_id}")
            return _record(record_id, row) if row else None

        return await t._run(f"reading dead letter {record_id}", work)

    async def replay(self, record_id: str) -> bool:
        t = self._t

        async def work(_client: Any) -> bool:
            return bool(await t._scripts["replay"](args=[t.settings.namespace, record_id]))

        return await t._run(f"replaying dead letter {record_id}", work)

    async def purge(self, record_id: str) -> bool:
        t = self._t

        async def work(_client: Any) -> bool:
            return bool(await t._scripts["purge"](args=[t.settings.namespace, record_id]))

        return await t._run(f"purging dead letter {record_id}", work)


def _record(record_id: str, row: dict[bytes, bytes]) -> DeadLetterRecord:
    key = row.get(b"key")
    return DeadLetterRecord(
        id=record_id,
        group=_decode(row[b"group"]),
        topic=_decode(row[b"topic"]),
        message_id=_decode(row[b"message_id"]),
        key=None if key is None else _decode(key),
        body=row[b"body"],
        reason=_decode(row[b"reason"]),
        attempts=int(row[b"attempts"]),
        dead_at=float(row[b"dead_at"]),
    )


class RedisTransport(Transport):
    """Redis Streams with consumer groups, shared by processes on any machine.

    Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync everysec``
    (a crash of the Redis process loses nothing it acknowledged; a power loss up to a
    second) or ``always`` (nothing), and ``maxmemory-policy noeviction``. Without an
    append-only file a restart of Redis loses every message not yet handled; the
    transport says so in its log when it connects.
    """

    messaging_system = "redis"

    def __init__(
        self,
        settings: RedisSettings,
        *,
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self._random = random or RandomSource(clock=self.clock)
        ns = settings.namespace
        self._dlq = f"{ns}:dlq"
        self._clock_key = f"{ns}:clock"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._consumers: list[_RedisConsumer] = []
        self._dead = _RedisDeadLetters(self)
        self._trimmed_at: dict[str, float] = {}
        self._logged: dict[str, str] = {}

    @classmethod
    def from_url(
        cls, url: str, *, clock: Clock | None = None, random: RandomSource | None = None
    ) -> RedisTransport:
        """A transport for ``redis://`` or ``rediss://`` (see :meth:`RedisSettings.from_url`)."""
        return cls(RedisSettings.from_url(url), clock=clock, random=random)

    def __repr__(self) -> str:
        return f"RedisTransport({self.settings.display_url!r})"

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self._dead

    # -- names ----------------------------------------------------------------------------

    def _topic_key(self, topic: str) -> str:
        return f"{self.settings.namespace}:t:{topic}"

    def _direct_key(self, group: str) -> str:
        return f"{self.settings.namespace}:d:{group}"

    def _group_prefix(self, group: str) -> str:
        return f"{self.settings.namespace}:g:{group}:"

    # -- connection -----------------------------------------------------------------------

    def _new_client(self) -> Any:
        s = self.settings
        options: dict[str, Any] = {}
        if s.tls:
            options = {
                "ssl": True,
                "ssl_ca_certs": s.tls_ca,
                "ssl_certfile": s.tls_cert,
                "ssl_keyfile": s.tls_key,
            }
        return Redis(
            host=s.host,
            port=s.port,
            db=s.db,
            username=s.username,
            password=s.password,
            socket_timeout=s.socket_timeout,
            socket_connect_timeout=min(s.socket_timeout, 5.0),
            # One quick retry hides a pooled connection that died while idle (a server
            # restart); longer outages are the callers' to back off from.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
            client_name="atoll",
            **options,
        )

    async def connect(self) -> None:
        """Connect, retrying an unreachable server with backoff for ``connect_timeout``.

        A wrong password (WRONGPASS, NOAUTH) fails at once: retrying cannot fix it.
        """
        if self._client is not None:
            return
        s = self.settings
        client = self._new_client()
        deadline = self.clock.monotonic() + s.connect_timeout
        attempt = 0
        reported: str | None = None
        while True:
            try:
                await client.ping()
                break
            except _AUTH as exc:
                await client.aclose()
                raise self._auth_error(exc) from None
            except _TRANSIENT as exc:
                attempt += 1
                text = _describe(exc)
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    await client.aclose()
                    raise TransportUnavailableError(
                        f"Redis at {s.display_url} is unreachable: {text}"
                        f" (tried {attempt} times over {s.connect_timeout:g}s)"
                    ) from None
                if text != reported:
                    log.warning(
                        "cannot reach Redis at %s: %s; retrying with backoff for up to %gs",
                        s.display_url,
                        text,
                        s.connect_timeout,
                    )
                    reported = text
                await self.clock.sleep(
                    min(remaining, self._random.uniform(0.5, 1.0) * min(5.0, 0.1 * 2**attempt))
                )
            except redis_errors.RedisError as exc:
                await client.aclose()
                raise TransportError(f"Redis at {s.display_url}: {_describe(exc)}") from None
        if reported is not None:
            log.info("reached Redis at %s", s.display_url)
        self._scripts = {
            "settle_and_claim": client.register_script(_scripts.SETTLE_AND_CLAIM),
            "publish": client.register_script(_scripts.PUBLISH),
            "renew": client.register_script(_scripts.RENEW),
            "trim": client.register_script(_scripts.TRIM),
            "retire": client.register_script(_scripts.RETIRE),
            "replay": client.register_script(_scripts.REPLAY),
            "purge": client.register_script(_scripts.PURGE),
        }
        self._client = client
        try:
            await self._check_durability()
        except BaseException:
            self._client = None
            await client.aclose()
            raise

    async def _check_durability(self) -> None:
        """Say once per URL if the server's configuration can lose acknowledged messages."""
        url = self.settings.display_url
        if url in _checked_durability:
            return
        _checked_durability.add(url)
        try:
            config: dict[str, str] = {}
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                config.update(
                    {
                        _decode(k): _decode(v)
                        for k, v in (await self._client.config_get(name)).items()
                    }
                )
        except redis_errors.RedisError:
            return  # CONFIG is often disabled on managed servers; nothing to check then
        if config.get("appendonly") != "yes":
            log.warning(
                "Redis at %s keeps its data only in memory (appendonly no): a restart of the"
                " server loses every message not yet handled. atoll needs appendonly yes"
                " with appendfsync everysec or always",
                url,
            )
        elif config.get("appendfsync") == "no":
            log.warning(
                "Redis at %s does not fsync its append-only file (appendfsync no): a power"
                " loss can lose acknowledged messages",
                url,
            )
        policy = config.get("maxmemory-policy")
        if policy is not None and policy != "noeviction":
            log.warning(
                "Redis at %s may evict keys when full (maxmemory-policy %s): streams could"
                " be lost; atoll needs noeviction",
                url,
                policy,
            )

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _forget(self, consumer: _RedisConsumer) -> None:
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    # -- calling Redis --------------------------------------------------------------------

    def _auth_error(self, exc: BaseException) -> TransportError:
        s = self.settings
        if isinstance(exc, redis_errors.AuthenticationError):
            if s.password is None:
                what = "NOAUTH: the server wants a password and none was given"
            else:
                who = f"user {s.username!r}" if s.username else "the default user"
                what = f"WRONGPASS: the password for {who} is wrong, or the user is disabled"
        else:
            what = "NOPERM: the user may not run the commands atoll needs"
        return TransportError(
            f"Redis at {s.display_url} refused the credentials ({what}; the server said"
            f" {_describe(exc)}): check the user name and the password (in the URL,"
            " password_file or password_env)"
        )

    async def _run(self, what: str, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work(client)``, mapping driver errors to transport errors naming the URL."""
        client = self._client
        if client is None:
            raise TransportUnavailableError(f"{self!r} is not connected")
        try:
            result: T = await work(client)
        except _AUTH as exc:
            raise self._auth_error(exc) from None
        except _TRANSIENT as exc:
            raise TransportUnavailableError(
                f"Redis at {self.settings.display_url}: {what} failed: {_describe(exc)}"
            ) from None
        except redis_errors.RedisError as exc:
            raise TransportError(
                f"Redis at {self.settings.display_url}: {what} failed: {_describe(exc)}"
            ) from None
        return result

    def _log_failure(self, what: str, exc: BaseException) -> None:
        # One line per change of error, not one per retry.
        text = f"{type(exc).__name__}: {exc}"
        if self._logged.get(what) != text:
            self._logged[what] = text
            log.warning("%s failed: %s (retrying)", what, text)

    def _log_recovered(self, what: str) -> None:
        if self._logged.pop(what, None) is not None:
            log.info("%s works again", what)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        script = self._scripts.get("publish")
        streams: set[str] = set()
        for start in range(0, len(messages), _PUBLISH_CHUNK):
            args: list[str | bytes | int] = [
                self._clock_key,
                len(messages[start : start + _PUBLISH_CHUNK]),
            ]
            for m in messages[start : start + _PUBLISH_CHUNK]:
                stream = self._topic_key(m.topic)
                streams.add(stream)
                args += [
                    stream,
                    command_group(m.topic) or "",
                    m.message_id,
                    b"" if m.key is None else b"=" + m.key.encode(),
                    m.body,
                ]

            async def work(_client: Any, args: list[str | bytes | int] = args) -> None:
                assert script is not None
                await script(args=args)

            await self._run(f"publishing {len(args) // 5} messages", work)
        await self._trim(streams)

    # -- subscribing ----------------------------------------------------------------------

    async def declare(self, group: str, topics: Sequence[str]) -> None:
        async def work(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for topic in topics:
                # A service's own command topic starts from 0: commands sent before the
                # group existed are its. A subscription to events starts now.
                start = "0" if command_group(topic) == group else "$"
                pipe.xgroup_create(self._topic_key(topic), group, id=start, mkstream=True)
            pipe.xgroup_create(self._direct_key(group), group, id="0", mkstream=True)
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                    raise result

        await self._run(f"declaring group {group}", work)

    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> _RedisConsumer:
        await self.declare(group, topics)
        consumer = _RedisConsumer(
            self, group, topics, handler, policy=policy or RedeliveryPolicy(), max_batch=max_batch
        )
        consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def _settle_and_claim(
        self,
        consumer: _RedisConsumer,
        settle: tuple[Sequence[Delivery], Sequence[Outcome]] | None,
        limit: int,
    ) -> tuple[list[Delivery], int, bool]:
        s = self.settings
        args: list[str | bytes | int] = [
            consumer.prefix,
            consumer.group,
            consumer.name,
            int(s.lease * 1000),
            limit,
            self._dlq,
            repr(self.clock.time()),
            consumer.wake_key,
            len(consumer.streams),
            *consumer.streams,
        ]
        acks: list[str | bytes | int] = []
        holds: list[str | bytes | int] = []
        parks: list[str | bytes | int] = []
        if settle is not None:
            policy = consumer._policy
            for delivery, outcome in zip(settle[0], settle[1], strict=True):
                token = delivery.token
                assert isinstance(token, _Token)
                lock = b"" if token.lock_key is None else b"=" + token.lock_key
                if isinstance(outcome, Ack):
                    acks += [token.ref, lock]
                    continue
                if isinstance(outcome, DeadLetter):
                    reason = outcome.reason
                elif not outcome.count:
                    holds += [
                        token.ref,
                        lock,
                        int((outcome.delay or 0.0) * 1000),
                        delivery.attempt - 1,
                    ]
                    continue
                elif delivery.attempt < policy.max_attempts:
                    delay = outcome.delay
                    if delay is None:
                        delay = policy.backoff(delivery.attempt, self._random.random())
                    assert delay is not None
                    holds += [token.ref, lock, int(delay * 1000), delivery.attempt]
                    continue
                else:
                    reason = outcome.error
                key = b"" if delivery.key is None else b"=" + delivery.key.encode()
                parks += [
                    token.ref,
                    lock,
                    delivery.attempt,
                    reason,
                    self._random.new_id(),
                    delivery.topic,
                    delivery.message_id,
                    key,
                    delivery.body,
                ]
        args += [len(acks) // 2, *acks, len(holds) // 4, *holds, len(parks) // 9, *parks]
        script = self._scripts["settle_and_claim"]

        async def work(_client: Any) -> list[Any]:
            result: list[Any] = await script(args=args)
            return result

        raw, next_due, more, tops = await self._run(
            f"consumer {consumer.group} settling and claiming", work
        )
        return consumer.decode(raw, tops), int(next_due), bool(more)

    async def _block(self, streams: dict[str, bytes], block_ms: int) -> None:
        await self._run("waiting for entries", lambda c: c.xread(streams, count=1, block=block_ms))

    async def _renew(self, group: str, consumer: str, refs: Sequence[str]) -> None:
        script = self._scripts["renew"]
        await self._run("renewing leases", lambda _c: script(args=[group, consumer, *refs]))

    async def _retire(self, consumer: _RedisConsumer) -> None:
        script = self._scripts["retire"]
        await self._run(
            "retiring a consumer",
            lambda _c: script(args=[consumer.group, consumer.name, *consumer.streams]),
        )

    async def _trim(self, streams: Sequence[str] | set[str]) -> None:
        """Trim ``streams`` that were not trimmed for ``trim_interval``; never fails."""
        now = self.clock.monotonic()
        due = [
            s
            for s in streams
            if now - self._trimmed_at.get(s, -math.inf) >= self.settings.trim_interval
        ]
        if not due:
            return
        for stream in due:
            self._trimmed_at[stream] = now
            try:
                await self._trim_stream(stream)
            except TransportError as exc:
                self._log_failure(f"trimming {stream}", exc)

    async def _trim_stream(self, stream: str) -> int:
        script = self._scripts["trim"]
        forget_ms = int(max(60.0, 10 * self.settings.lease) * 1000)
        args = [self.settings.namespace, stream, forget_ms]
        removed: int = await self._run(f"trimming {stream}", lambda _c: script(args=args))
        return removed

    # -- introspection --------------------------------------------------------------------

    async def stream_length(self, topic: str) -> int:
        """Entries kept in ``topic``'s stream (handy in tests and for monitoring)."""
        length: int = await self._run(
            "reading a stream length", lambda c: c.xlen(self._topic_key(topic))
        )
        return length

    async def trim(self, topic: str) -> int:
        """Trim ``topic``'s stream now; the number of entries removed."""
        return await self._trim_stream(self._topic_key(topic))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
