"""Running a service: lifecycle, the consumer, the relay and readiness."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry

from atoll._crash import crashpoint
from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.messages import Envelope, Message, MessageError, decode_envelope
from atoll.messaging._relay import OutboxRelay
from atoll.observability import ServiceMetrics, Tracing, attributes
from atoll.observability._logs import message_context
from atoll.observability._metric_export import (
    MetricExport,
    otlp_metrics_endpoint,
    service_resource,
)
from atoll.observability._tracing import (
    SpanKind,
    parse_traceparent,
    trace_breaker_changes,
)
from atoll.persistence import Database, TransientDatabaseError
from atoll.resilience import (
    Deadline,
    ServiceClient,
    deadline_scope,
    install_metrics,
)
from atoll.service._context import Context, outgoing_trace_headers
from atoll.service._eventsourcing import EventSourcing
from atoll.service._http import instrument_client, instrument_http
from atoll.service._service import HandlerSpec, MessageRejected, Service
from atoll.transport import (
    Ack,
    Consumer,
    DeadLetter,
    Delivery,
    Outcome,
    Retry,
    Transport,
)

try:
    from opentelemetry import context as otel_context
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    _W3C_BAGGAGE = W3CBaggagePropagator()
except ImportError:  # pragma: no cover - no otel extra: no lean spans, no baggage to adopt
    pass

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger("atoll.service")

State = Literal["created", "starting", "ready", "stopping", "stopped", "failed"]


@dataclass(slots=True)
class RuntimeStats:
    """Counters of one running service, for readiness details and metrics."""

    handled: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    redeliveries: int = 0
    #: (message type, outcome) -> count, for metrics.
    by_type: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True, slots=True)
class _Decoded:
    index: int
    delivery: Delivery
    envelope: Envelope
    message: Message
    spec: HandlerSpec


class ServiceRuntime:
    """Runs one :class:`Service`: its database, outbox relay, consumer and health.

    Lifecycle: :meth:`start` opens the database, applies migrations, runs start hooks,
    connects the transport, starts the relay and then the consumer, and only then reports
    ready. :meth:`stop` reports not ready at once, stops taking new messages, waits (up
    to ``drain_timeout``) for the batch in hand to be handled and settled, flushes the
    outbox once more, and closes.
    """

    def __init__(
        self,
        service: Service,
        *,
        database: Database,
        transport: Transport,
        clock: Clock | None = None,
        random: RandomSource | None = None,
        owns_transport: bool = True,
        max_batch: int = 100,
        relay_batch: int = 500,
        relay_poll_interval: float = 1.0,
        relay_lease_ttl: float = 6.0,
        tracing: Tracing | None = None,
        metrics_registry: CollectorRegistry | None = None,
        client: ServiceClient | None = None,
        drain_timeout: float = 30.0,
        inbox_retention: float = 7 * 86_400.0,
    ) -> None:
        self.service = service
        self.database = database
        self.transport = transport
        self.clock: Clock = clock or SystemClock()
        self.random = random or RandomSource(clock=self.clock)
        self.state: State = "created"
        self.stats = RuntimeStats()
        self.tracing = (
            tracing
            if tracing is not None
            else Tracing(service.name, clock=self.clock, random=self.random)
        )
        #: A Tracing the caller gave stays theirs: a stop flushes it, and shutting it
        #: down is the caller's (so a runtime started again still traces).
        self._owns_tracing = tracing is None
        self._owns_transport = owns_transport
        self._max_batch = max_batch
        self._drain_timeout = drain_timeout
        self._inbox_retention = inbox_retention
        self._consumer: Consumer | None = None
        self._maintenance: asyncio.Task[None] | None = None
        #: Pushes the metrics registry over OTLP when the standard variables name an
        #: endpoint (see ``atoll.observability._metric_export``).
        self.metric_export: MetricExport | None = None
        self.relay = OutboxRelay(
            service.name,
            database,
            transport,
            clock=self.clock,
            random=self.random,
            batch_size=relay_batch,
            poll_interval=relay_poll_interval,
            lease_ttl=relay_lease_ttl,
            tracer=self.tracing.tracer,
        )
        self.metrics = ServiceMetrics(self, metrics_registry)
        self.event_sourcing = EventSourcing(self)
        #: Calls to other services by name, through their resilience policies.
        self.client = client or ServiceClient(
            {}, clock=self.clock, random=self.random, trace_headers=outgoing_trace_headers
        )
        install_metrics(self.client.registry, self.metrics.registry)
        self.client.registry.on_breaker(trace_breaker_changes)

    def __repr__(self) -> str:
        return f"ServiceRuntime({self.service.name!r}, state={self.state!r})"

    @property
    def ready(self) -> bool:
        """Whether the service takes work: started and not stopping."""
        return self.state == "ready"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; raise (and stay not ready) if any part fails."""
        if self.state not in ("created", "stopped"):
            raise RuntimeError(f"cannot start {self!r}")
        self.state = "starting"
        self.service.attach(self)
        if self.tracing.enabled:
            instrument_http(self.service, self.tracing)
            instrument_client(self.client.http, self.tracing)
        try:
            await self.database.open()
            for name, statements in self.service.migrations:
                await self.database.migrate(name, statements)
            if self.service.event_sourced:
                await self.event_sourcing.open()
            for hook in self.service.start_hooks:
                await hook(self)
            await self.transport.connect()
            topics = self.topics()
            await self.transport.declare(self.service.name, topics)
            self.relay.start()
            self._consumer = await self.transport.subscribe(
                self.service.name,
                topics,
                self._handle_batch,
                policy=self.service.redelivery,
                max_batch=self._max_batch,
            )
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
            if self.service.event_sourced:
                await self.event_sourcing.start_projections()
            self._start_metric_export()
        except BaseException:
            self.state = "failed"
            await self._close_quietly()
            raise
        self.state = "ready"
        log.info("service %s ready", self.service.name)

    def _start_metric_export(self) -> None:
        endpoint = otlp_metrics_endpoint()
        if endpoint is None or self.metric_export is not None:
            return
        try:
            export = MetricExport(
                service_resource(self.service.name),
                self.metrics.registry.collect,
                refresh=self.metrics.refresh,
                endpoint=endpoint,
                clock=self.clock,
            )
        except Exception as exc:  # no otel extra, a bad exporter variable: /metrics still serves
            log.warning("service %s: metrics are not pushed over OTLP: %s", self.service.name, exc)
            return
        export.start()
        self.metric_export = export

    def topics(self) -> list[str]:
        """The topics this service consumes: its command topic and its event types."""
        return self.service.topics()

    async def stop_consuming(self) -> None:
        """Report not ready and stop taking messages; wait for the batch in hand.

        HTTP routes keep working until :meth:`stop`, so in-flight requests can finish.
        """
        if self.state in ("stopped", "created"):
            return
        self.state = "stopping"
        if self._maintenance is not None:
            self._maintenance.cancel()
        await self._run_stop_hooks()
        for runner in self.event_sourcing.runners:
            await runner.stop()
        if self._consumer is not None:
            try:
                await asyncio.wait_for(self._consumer.stop(), self._drain_timeout)
            except TimeoutError:
                log.warning(
                    "service %s: handlers still running after %.0fs; their messages will be"
                    " redelivered",
                    self.service.name,
                    self._drain_timeout,
                )
            self._consumer = None

    async def stop(self) -> None:
        """Stop taking work, drain what is in hand, flush the outbox, close."""
        if self.state in ("stopped", "created"):
            return
        await self.stop_consuming()
        await self.relay.stop()
        await self._close_quietly()
        await self.client.aclose()
        if self.metric_export is not None:
            await self.metric_export.stop()
            self.metric_export = None
        # Off the loop: a flush to a collector that is down takes up to its bound (3 s),
        # and the loop runs the process's other services meanwhile.
        await asyncio.to_thread(self.tracing.shutdown if self._owns_tracing else self.tracing.flush)
        self.state = "stopped"
        self.service.attach(None)

    async def abandon(self) -> None:
        """Stop at once without draining, settling or flushing: what a crash leaves behind.

        For crash tests in one process. Leases held by the consumer lapse; outbox records
        stay; the next runtime on the same database carries on from there.
        """
        self.state = "stopped"
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.metric_export is not None:
            self.metric_export.abandon()
            self.metric_export = None
        await self._run_stop_hooks()
        self.relay.abandon()
        abandon = getattr(self._consumer, "abandon", None)
        if abandon is not None:
            abandon()
        self._consumer = None
        await self._close_quietly()
        self.service.attach(None)

    async def _run_stop_hooks(self) -> None:
        for hook in self.service.stop_hooks:
            try:
                await hook(self)
            except Exception as exc:
                log.warning("service %s: a stop hook failed: %r", self.service.name, exc)

    async def _close_quietly(self) -> None:
        try:
            await self.event_sourcing.stop()
        except Exception as exc:
            log.warning("closing the event store failed: %s", exc)
        if self._owns_transport:
            try:
                await self.transport.close()
            except Exception as exc:
                log.warning("closing the transport failed: %s", exc)
        try:
            await self.database.close()
        except Exception as exc:
            log.warning("closing the database failed: %s", exc)

    async def _maintain(self) -> None:
        """Prune the inbox of records older than the retention, once an hour."""
        while True:
            try:
                await self.database.prune_inbox(self.clock.time() - self._inbox_retention)
            except Exception as exc:
                log.warning("service %s: pruning the inbox failed: %s", self.service.name, exc)
            await self.clock.sleep(3600.0)

    # -- units of work --------------------------------------------------------------------

    @asynccontextmanager
    async def unit_of_work(
        self,
        *,
        correlation_id: str | None = None,
        trace: dict[str, str] | None = None,
        deadline: datetime | None = None,
    ) -> AsyncIterator[Context]:
        """A unit of work with messaging (see :class:`Context`)."""
        async with self.database.unit_of_work() as uow:
            yield Context(
                self.service,
                uow,
                clock=self.clock,
                random=self.random,
                correlation_id=correlation_id,
                trace=trace,
                deadline=deadline,
                propagate=self.tracing.enabled,
            )

    # -- consuming ------------------------------------------------------------------------

    def _decode(self, index: int, delivery: Delivery) -> _Decoded | DeadLetter:
        try:
            envelope = decode_envelope(delivery.body)
        except MessageError as exc:
            return DeadLetter(reason=str(exc))
        spec = self.service.handlers.get(envelope.type)
        if spec is None:
            return DeadLetter(
                reason=f"service {self.service.name!r} has no handler for message type"
                f" {envelope.type!r} (v{envelope.version}, from {envelope.source!r})"
            )
        try:
            message = self.service.registry.decode(envelope)
        except MessageError as exc:
            return DeadLetter(reason=str(exc))
        if envelope.deadline is not None and envelope.deadline.timestamp() <= self.clock.time():
            # The sender has stopped waiting; doing the work now would only surprise it.
            return DeadLetter(
                reason=f"deadline {envelope.deadline.isoformat()} passed before handling"
            )
        return _Decoded(index, delivery, envelope, message, spec)

    def _decode_batch(self, deliveries: Sequence[Delivery]) -> tuple[list[Outcome], list[_Decoded]]:
        """Dead-letter what cannot be decoded; the rest is acknowledged unless it fails."""
        outcomes: list[Outcome] = []
        decoded: list[_Decoded] = []
        for index, delivery in enumerate(deliveries):
            item = self._decode(index, delivery)
            if isinstance(item, DeadLetter):
                log.warning(
                    "service %s: dead-lettering message %s: %s",
                    self.service.name,
                    delivery.message_id,
                    item.reason,
                )
                self.stats.dead_lettered += 1
                outcomes.append(item)
            else:
                outcomes.append(Ack())
                decoded.append(item)
        return outcomes, decoded

    async def _handle_batch(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Handle a batch in one transaction, each message in its own savepoint.

        A message whose handler raises is rolled back alone and retried; later messages
        with the same key are put back untried, so the key's order holds. Outcomes are
        returned only after the batch's commit is durable; if the commit fails, every
        message is retried and nothing was kept.
        """
        self.stats.batches += 1
        outcomes, decoded = self._decode_batch(deliveries)
        if not decoded:
            return outcomes
        failed_keys: set[str] = set()
        handled = duplicates = exhausted = 0
        max_attempts = self.service.redelivery.max_attempts
        try:
            async with self.database.batch():
                for item in decoded:
                    key = item.delivery.key
                    if key is not None and key in failed_keys:
                        outcomes[item.index] = Retry(
                            error="held behind an earlier failure", count=False
                        )
                        continue
                    try:
                        if await self._handle_one(item):
                            handled += 1
                        else:
                            duplicates += 1
                        crashpoint("consumer.mid_batch")
                    except TransientDatabaseError:
                        # The database failed, not the handler: the whole batch's
                        # transaction is suspect, so give it all back untried.
                        raise
                    except MessageRejected as exc:
                        self.stats.dead_lettered += 1
                        log.warning(
                            "service %s: dead-lettering message %s: %s",
                            self.service.name,
                            item.delivery.message_id,
                            exc.reason,
                        )
                        outcomes[item.index] = DeadLetter(reason=exc.reason)
                    except Exception as exc:
                        self.stats.failed += 1
                        if key is not None:
                            failed_keys.add(key)
                        # The transport parks a counted retry of the last attempt (as
                        # its _settle does); counted here once the batch commits.
                        last = item.delivery.attempt >= max_attempts
                        exhausted += last
                        log.warning(
                            "service %s: handler for %s failed on attempt %d%s: %r",
                            self.service.name,
                            item.envelope.type,
                            item.delivery.attempt,
                            " (the last: dead-lettering it)" if last else "",
                            exc,
                        )
                        outcomes[item.index] = Retry(error=f"{type(exc).__name__}: {exc}")
        except TransientDatabaseError as exc:
            log.warning("service %s: batch not committed: %s", self.service.name, exc)
            return [
                o if isinstance(o, DeadLetter) else Retry(error=str(exc), delay=0.5, count=False)
                for o in outcomes
            ]
        self.stats.handled += handled
        self.stats.duplicates += duplicates
        self.stats.dead_lettered += exhausted
        return outcomes

    async def _handle_one(self, item: _Decoded) -> bool:
        """Run one handler in its own unit of work; ``False`` if it was a duplicate.

        Traced as a ``process`` span whose parent is the span that committed the message,
        under the message's deadline, timed into the handler histogram, and logged with
        its correlation and message ids.
        """
        envelope = item.envelope
        if item.delivery.attempt > 1:
            self.stats.redeliveries += 1
        started = self.clock.monotonic()
        outcome = "failed"
        token = message_context.set((envelope.correlation_id, envelope.id))
        try:
            if envelope.deadline is None:
                handled = await self._traced(item)
            else:
                with deadline_scope(Deadline.from_datetime(envelope.deadline, clock=self.clock)):
                    handled = await self._traced(item)
            outcome = "handled" if handled else "duplicate"
            return handled
        finally:
            message_context.reset(token)
            self.stats.by_type[(envelope.type, outcome)] += 1
            self.metrics.handler_timer(envelope.type).observe(self.clock.monotonic() - started)

    async def _traced(self, item: _Decoded) -> bool:
        lean = self.tracing.lean
        envelope = item.envelope
        if lean is None:
            return await self._run_handler(item, envelope.trace)
        # The message's baggage is current while its handler runs, for the handler and
        # the HTTP calls it makes; parsed only when there is some (most have none).
        incoming = envelope.trace.get("baggage")
        token = (
            None
            if incoming is None
            else otel_context.attach(_W3C_BAGGAGE.extract({"baggage": incoming}))
        )
        try:
            with lean.span(
                f"process {envelope.type}",
                parent=parse_traceparent(envelope.trace),
                kind=SpanKind.CONSUMER,
                attributes=self._span_attributes(item),
            ) as span:
                # What this handler sends carries this span (and the incoming baggage):
                # the headers are worked out if it sends something (most send nothing).
                handled = await self._run_handler(item, partial(span.propagated, envelope.trace))
                if not handled:
                    span.set_attribute(attributes.OUTCOME, "duplicate")
        finally:
            if token is not None:
                otel_context.detach(token)
        return handled

    def _span_attributes(self, item: _Decoded) -> dict[str, AttributeValue]:
        envelope = item.envelope
        return {
            attributes.MESSAGING_SYSTEM: self.transport.messaging_system,
            attributes.MESSAGING_OPERATION_TYPE: "process",
            attributes.MESSAGING_DESTINATION: item.delivery.topic,
            attributes.MESSAGING_MESSAGE_ID: envelope.id,
            attributes.MESSAGING_CONVERSATION_ID: envelope.correlation_id,
            attributes.MESSAGING_CONSUMER_GROUP: self.service.name,
            attributes.MESSAGING_DELIVERY_ATTEMPT: item.delivery.attempt,
            attributes.MESSAGE_TYPE: envelope.type,
        }

    async def _run_handler(
        self, item: _Decoded, trace_out: dict[str, str] | Callable[[], dict[str, str]]
    ) -> bool:
        async with self.database.unit_of_work() as uow:
            if not await uow.claim_inbox(self.service.name, item.envelope.id):
                return False
            ctx = Context(
                self.service,
                uow,
                clock=self.clock,
                random=self.random,
                envelope=item.envelope,
                message=item.message,
                trace_out=trace_out,
            )
            await item.spec.handler(item.message, ctx)
        return True

    # -- health ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Readiness details for ``/readyz``."""
        details: dict[str, Any] = {"service": self.service.name, "status": self.state}
        try:
            count, oldest, _ = await self.database.outbox_stats()
            details["outbox"] = {
                "pending": count,
                "oldest_age_seconds": None if oldest is None else self.clock.time() - oldest,
            }
        except Exception as exc:
            details["outbox"] = {"error": str(exc)}
        details["relay"] = {"published": self.relay.published, "last_error": self.relay.last_error}
        if self.event_sourcing.runners:
            details["projections"] = await self.event_sourcing.readiness()
        details["consumer"] = {
            "handled": self.stats.handled,
            "duplicates": self.stats.duplicates,
            "failed": self.stats.failed,
            "dead_lettered": self.stats.dead_lettered,
        }
        return details
