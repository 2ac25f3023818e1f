"""The outbox relay: committed messages from a service's outbox to the transport."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from atoll._crash import crashpoint
from atoll.determinism import Clock, RandomSource
from atoll.observability import attributes
from atoll.observability._tracing import SpanKind, link_from_traceparent
from atoll.persistence import Database, OutboxRecord
from atoll.transport import OutgoingMessage, Transport

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

#: Links per publish span (OpenTelemetry's default limit is 128).
MAX_LINKS = 128

log = logging.getLogger("atoll.relay")


class OutboxRelay:
    """Publishes a service's committed outbox records, oldest commit first.

    Guarantees: a record is deleted only after :meth:`Transport.publish` returned for it
    (the transport confirmed it), so a crash at any point re-publishes at worst; the
    message id is the one written at commit, so consumers' inboxes drop the duplicate.
    Records are published in outbox order, which is commit order, so every key keeps
    its order. Only the holder of the ``relay:<service>`` lease publishes, so several
    instances sharing a database do not publish the same records twice in the normal
    path. While the transport is down, records wait and the relay backs off with
    jitter (``backoff_cap`` at most).

    It wakes when a local commit adds records (a hint) and polls every
    ``poll_interval`` seconds for anything else (other processes, scheduled messages).
    """

    def __init__(
        self,
        name: str,
        database: Database,
        transport: Transport,
        *,
        clock: Clock,
        random: RandomSource,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        backoff_cap: float = 10.0,
        lease_ttl: float = 6.0,
        tracer: Tracer | None = None,
    ) -> None:
        self.name = name
        self._tracer = tracer
        self._db = database
        self._transport = transport
        self._clock = clock
        self._random = random
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._backoff_cap = backoff_cap
        self._lease_ttl = lease_ttl
        # The pid lets a database on this machine free the lease of a dead process.
        self._owner = f"{os.getpid()}:{random.new_id()}"
        self._lease_name = f"relay:{name}"
        self._lease_until = 0.0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.failures = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._stopping = False  # started again after a stop: it publishes again
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop after a last pass over what is due, so a clean shutdown leaves nothing behind."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        try:
            await self.flush()
        except Exception as exc:
            log.warning("relay %s could not flush at shutdown: %s", self.name, exc)
        await self._db.release_lease(self._lease_name, self._owner)

    async def _publish_traced(
        self, records: list[OutboxRecord], messages: list[OutgoingMessage]
    ) -> None:
        """One ``publish`` span per batch, linked to the span that committed each message."""
        assert self._tracer is not None
        links = [
            link
            for link in (link_from_traceparent(r.traceparent) for r in records[:MAX_LINKS])
            if link is not None
        ]
        span_attributes: dict[str, str | int] = {
            attributes.MESSAGING_SYSTEM: self._transport.messaging_system,
            attributes.MESSAGING_OPERATION_TYPE: "send",
            attributes.MESSAGING_OPERATION_NAME: "publish",
            attributes.MESSAGING_BATCH_COUNT: len(messages),
            attributes.SERVICE: self.name,
        }
        # Semantic conventions: "{operation} {destination}" when the batch has one
        # destination, the operation alone when it has several.
        name = "publish"
        topics = {m.topic for m in messages}
        if len(topics) == 1:
            [topic] = topics
            span_attributes[attributes.MESSAGING_DESTINATION] = topic
            name = f"publish {topic}"
        with self._tracer.start_as_current_span(
            name, kind=SpanKind.PRODUCER, links=links, attributes=span_attributes
        ):
            await self._transport.publish(messages)

    def abandon(self) -> None:
        """Stop at once, as a crash would (for crash tests)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    @property
    def crashed(self) -> BaseException | None:
        """What ended the relay's task, if it ended abnormally."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def _hold_lease(self) -> bool:
        now = self._clock.monotonic()
        if now < self._lease_until - self._lease_ttl / 3:
            return True
        if await self._db.try_lease(self._lease_name, self._owner, self._lease_ttl):
            self._lease_until = now + self._lease_ttl
            return True
        self._lease_until = 0.0
        return False

    async def flush(self) -> int:
        """Publish everything due now; return how many records were published."""
        total = 0
        while True:
            if not await self._hold_lease():
                return total
            records = await self._db.outbox_fetch(self._batch_size)
            if not records:
                return total
            crashpoint("relay.before_publish")
            messages = [OutgoingMessage(r.topic, r.message_id, r.key, r.body) for r in records]
            if self._tracer is None:
                await self._transport.publish(messages)
            else:
                await self._publish_traced(records, messages)
            crashpoint("relay.after_publish")
            await self._db.outbox_delete([r.seq for r in records])
            total += len(records)
            self.published += len(records)
            if len(records) < self._batch_size:
                return total

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await self.flush()
                if attempt:
                    log.info("relay %s publishes again", self.name)
                attempt = 0
                self.last_error = None
                scheduled = await self._db.outbox_next_scheduled()
                timeout = self._poll_interval
                if scheduled is not None:
                    timeout = max(0.0, min(timeout, scheduled - self._clock.time()))
                await self._db.wait_for_outbox(timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Nothing the database or the transport does may end the relay: records
                # wait in the outbox and the relay tries again, backing off with jitter.
                attempt += 1
                self.failures += 1
                text = f"{type(exc).__name__}: {exc}"
                if text != self.last_error:
                    count, _, _ = await _safe_stats(self._db)
                    log.warning(
                        "relay %s cannot publish (%s); the outbox holds %s messages, retrying",
                        self.name,
                        text,
                        count,
                    )
                self.last_error = text
                cap = min(self._backoff_cap, 0.05 * 2**attempt)
                await self._clock.sleep(self._random.uniform(0, cap))


async def _safe_stats(db: Database) -> tuple[int, float | None, float | None]:
    try:
        return await db.outbox_stats()
    except Exception:
        return (-1, None, None)
