"""One upstream at run time: instances, balancing, and the ``atoll.resilience`` pipeline
that every exchange with it goes through.

The pipeline per upstream is built from its ``policy`` table with
``atoll.resilience.policy_from_config`` (timeout, attempt_timeout, retry, breaker,
bulkhead), with the gateway's own classifiers: the breaker counts 5xx answers, failed
connections and timeouts; retries happen only for idempotent methods (GET, HEAD,
OPTIONS, PUT, DELETE, or any request carrying an ``Idempotency-Key``), and a request
that is not idempotent is retried only when it provably never left (the connection
could not be opened). A streamed request body cannot be replayed, so it is never
retried. Each attempt picks an instance again, avoiding the one that just failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Mapping
from typing import Any

from atoll.config import ConfigError
from atoll.determinism import Clock, RandomSource
from atoll.gateway._config import UpstreamConfig
from atoll.gateway._server import Body
from atoll.gateway._tls import client_context
from atoll.gateway._upstream import (
    ActiveHealth,
    Balancer,
    Instance,
    PassiveHealth,
    PoolSettings,
    Response,
    UpstreamClosedError,
    UpstreamError,
    run_health_checks,
)
from atoll.resilience import (
    CircuitBreaker,
    Classifier,
    Pipeline,
    Timeout,
    current_deadline,
    policy_from_config,
    register_classifier,
)
from atoll.resilience._pipeline import ORDER as PIPELINE_ORDER

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def _is_5xx(result: object) -> bool:
    return isinstance(result, Response) and result.status >= 500


def _is_retryable_status(result: object) -> bool:
    return isinstance(result, Response) and result.status in (502, 503, 504)


def _nothing_sent(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.nothing_sent


#: The breaker's view of an upstream: 5xx answers, failed exchanges and timeouts.
GATEWAY = Classifier(
    "gateway", failure_types=(UpstreamError, TimeoutError), result_predicate=_is_5xx
)
#: What is retried for idempotent requests: failed exchanges, timeouts, 502/503/504.
GATEWAY_IDEMPOTENT = Classifier(
    "gateway-idempotent",
    failure_types=(UpstreamError, TimeoutError),
    result_predicate=_is_retryable_status,
)
#: What is retried for other requests: only a connection that could not be opened.
GATEWAY_UNSAFE = Classifier(
    "gateway-unsafe", failure_types=(UpstreamError,), exception_predicate=_nothing_sent
)
for _classifier in (GATEWAY, GATEWAY_IDEMPOTENT, GATEWAY_UNSAFE):
    register_classifier(_classifier)

#: The pipeline of an upstream without a ``policy`` table.
DEFAULT_TIMEOUT = 30.0


def build_pipeline(
    config: UpstreamConfig, *, source: str, clock: Clock | None, random: RandomSource | None
) -> Pipeline:
    """The upstream's pipeline from its ``policy`` table, with the gateway classifiers."""
    if config.policy is None:
        return Pipeline(
            name=config.name,
            timeout=Timeout(DEFAULT_TIMEOUT, name=f"{config.name}.timeout", clock=clock),
        )
    table: dict[str, Any] = copy.deepcopy(dict(config.policy))
    key = f"upstreams.{config.name}.policy"
    for section, classifier in (("breaker", "gateway"), ("retry", "gateway-idempotent")):
        part = table.get(section)
        if isinstance(part, dict):
            given = part.setdefault("classifier", classifier)
            if given not in ("gateway", "gateway-idempotent", "gateway-unsafe"):
                raise ConfigError(
                    source,
                    f"{key}.{section}.classifier",
                    "the gateway classifies upstream answers itself (5xx, timeouts, failed "
                    "connections); leave classifier out",
                )
    try:
        pipeline = policy_from_config(
            table, source=source, name=config.name, clock=clock, random=random
        )
    except ConfigError as exc:
        raise ConfigError(
            source, f"{key}.{exc.key.removeprefix(f'policies.{config.name}.')}", exc.problem
        ) from None
    if pipeline.timeout is None:
        pipeline = pipeline.replace(
            timeout=Timeout(DEFAULT_TIMEOUT, name=f"{config.name}.timeout", clock=clock)
        )
    return pipeline


class Call:
    """One request to an upstream, possibly tried several times."""

    __slots__ = (
        "attempts",
        "body",
        "common",
        "head_only",
        "last",
        "parent",
        "request_line",
        "responses",
        "stream",
        "stream_limit",
    )

    def __init__(
        self,
        request_line: bytes,
        common: bytes,
        body: bytes | None,
        stream: Body | None,
        *,
        head_only: bool = False,
        stream_limit: int | None = None,
    ) -> None:
        self.request_line = request_line
        self.common = common
        self.body = body
        self.stream = stream
        self.head_only = head_only
        self.stream_limit = stream_limit
        self.last: Instance | None = None
        self.responses: list[Response] = []
        #: The gateway's SERVER span (tracing on): each attempt is a CLIENT span under it.
        self.parent: Any = None
        self.attempts = 0


class BodyTooLargeError(Exception):
    """A streamed request body went over the limit."""


def _counter_names(kind: type) -> tuple[str, ...]:
    """The ``*_total`` counters a policy class keeps (in its ``__slots__``)."""
    return tuple(
        name
        for klass in kind.__mro__
        for name in getattr(klass, "__slots__", ())
        if name.endswith("_total") and not name.startswith("_")  # _max_total: a setting
    )


class UpstreamRuntime:
    """An upstream with its instances, balancer, health checks and pipelines."""

    def __init__(
        self, config: UpstreamConfig, *, source: str, clock: Clock, random: RandomSource
    ) -> None:
        self.config = config
        self.name = config.name
        self.clock = clock
        pool = PoolSettings(
            max_idle=config.pool.max_idle,
            idle_timeout=config.pool.idle_timeout,
            connect_timeout=config.pool.connect_timeout,
            read_timeout=config.pool.read_timeout,
        )
        passive = PassiveHealth(failures=config.passive.failures, ejection=config.passive.ejection)
        tls = (
            client_context(config.tls, f"upstreams.{config.name}.tls", source)
            if config.tls is not None
            else None
        )
        self.instances = [
            Instance(
                host,
                port,
                pool=pool,
                passive=passive,
                clock=clock,
                tls=tls,
                server_name=config.tls.server_name if config.tls is not None else None,
                weight=config.weights[index] if config.weights else 1,
            )
            for index, (host, port) in enumerate(config.targets)
        ]
        self.balancer = Balancer(self.instances, config.balance)
        self.pipeline = build_pipeline(config, source=source, clock=clock, random=random)
        retry = self.pipeline.retry
        self.unsafe_pipeline = (
            self.pipeline
            if retry is None
            else self.pipeline.replace(retry=retry.with_classifier(GATEWAY_UNSAFE))
        )
        self.stream_pipeline = self.pipeline if retry is None else self.pipeline.replace(retry=None)
        self._health_task: asyncio.Task[None] | None = None
        #: The gateway's lean tracer (tracing on): each attempt is then a CLIENT span.
        self.tracer: Any = None
        self.requests_total = 0
        self.failures_total = 0

    def carry_counts(self, previous: UpstreamRuntime) -> None:
        """Go on from the counters of the upstream this one replaces (a reload changed
        its settings): Prometheus counters must not fall back to zero while the process
        runs, or ``rate()`` loses what came before. Instances are matched by address."""
        self.requests_total += previous.requests_total
        self.failures_total += previous.failures_total
        ejections = {i.address: i.ejections_total for i in previous.instances}
        for instance in self.instances:
            instance.ejections_total += ejections.get(instance.address, 0)
        # And its policies' (atoll_breaker_calls_total, atoll_retry_retries_total...):
        # each new policy goes on from the one of its kind it replaces.
        for slot in PIPELINE_ORDER:
            policy: Any = getattr(self.pipeline, slot, None)
            old: Any = getattr(previous.pipeline, slot, None)
            kind: type = type(policy)
            if policy is not None and kind is type(old):
                for name in _counter_names(kind):
                    setattr(policy, name, getattr(policy, name) + getattr(old, name))

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The upstream's circuit breaker, if it has one."""
        return self.pipeline.breaker

    def start(self) -> None:
        """Start the active health checks, if configured."""
        health = self.config.health
        if health is not None and self._health_task is None:
            settings = ActiveHealth(
                path=health.path,
                interval=health.interval,
                timeout=health.timeout,
                healthy_threshold=health.healthy_threshold,
                unhealthy_threshold=health.unhealthy_threshold,
            )
            self._health_task = asyncio.get_running_loop().create_task(
                run_health_checks(self.instances, settings, self.clock, lambda: None)
            )

    async def stop(self) -> None:
        """Stop health checks and close idle connections."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for instance in self.instances:
            instance.close_idle()
        await self.pipeline.breaker.aclose() if self.pipeline.breaker is not None else None

    async def exchange(self, call: Call, method: bytes, idempotent: bool) -> Response:
        """The response to ``call`` through the pipeline; superseded attempts discarded."""
        self.requests_total += 1
        if call.stream is not None:
            pipeline = self.stream_pipeline
        elif idempotent:
            pipeline = self.pipeline
        else:
            pipeline = self.unsafe_pipeline
        attempt = (
            self._attempt if call.parent is None or self.tracer is None else self._traced_attempt
        )
        try:
            response = await pipeline.call(attempt, call, idempotent)
        except BaseException:
            self.failures_total += 1
            for stale in call.responses:
                stale.discard()
            raise
        if len(call.responses) > 1:
            for stale in call.responses:
                if stale is not response:
                    stale.discard()
        if response.status >= 500:
            self.failures_total += 1
        del method
        return response

    async def _traced_attempt(self, call: Call, idempotent: bool) -> Response:
        """:meth:`_attempt` as a CLIENT span under the gateway's SERVER span (OpenTelemetry's
        HTTP client conventions); the upstream request carries the CLIENT span's context."""
        from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: PLC0415

        call.attempts += 1
        method, target, _ = call.request_line.split(b" ", 2)
        attributes: dict[str, Any] = {
            "http.request.method": method.decode("latin-1"),
            "atoll.gateway.upstream": self.name,
        }
        if call.attempts > 1:
            attributes["http.request.resend_count"] = call.attempts - 1
        span = self.tracer.span(
            method.decode("latin-1"),
            parent=call.parent.get_span_context(),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        trace = [(k.encode(), v.encode()) for k, v in span.headers().items()]
        span.__enter__()
        try:
            response = await self._attempt(call, idempotent, trace)
        except BaseException as exc:
            _set_target(span, call, target)
            span.set_attribute("error.type", type(exc).__qualname__)
            span.__exit__(type(exc), exc, exc.__traceback__)
            raise
        _set_target(span, call, target)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_attribute("error.type", str(response.status))
            span.set_status(Status(StatusCode.ERROR))
        span.__exit__(None, None, None)
        return response

    async def _attempt(
        self, call: Call, idempotent: bool, trace: list[tuple[bytes, bytes]] | None = None
    ) -> Response:
        instance = self.balancer.pick(call.last)
        call.last = instance
        instance.requests_total += 1
        try:
            if call.stream is None:
                # The common case inline: a pooled connection, one write, one await.
                conn = instance.take_idle() or await instance.connect_fresh()
                data = self._head(instance, call, trace)
                try:
                    response = await conn.send(data, head_only=call.head_only)
                except UpstreamClosedError:
                    conn.abort()
                    if not (conn.reused and idempotent):
                        raise
                    # A pooled connection the instance closed as we used it: once more, fresh.
                    fresh = await instance.connect_fresh()
                    try:
                        response = await fresh.send(data, head_only=call.head_only)
                    except BaseException:
                        fresh.abort()
                        raise
                except BaseException:
                    conn.abort()
                    raise
            else:
                response = await self._send_streaming(instance, call, trace)
        except UpstreamError:
            instance.failed()
            raise
        except asyncio.CancelledError:
            # The timeout's cancellation (its deadline passed), not the client going away:
            # an instance that takes connections and never answers is ejected too.
            deadline = current_deadline()
            if deadline is not None and deadline.expired:
                instance.failed()
            raise
        if response.status >= 500:
            instance.failed()
        else:
            instance.succeeded()
        call.responses.append(response)
        return response

    def _head(
        self, instance: Instance, call: Call, trace: list[tuple[bytes, bytes]] | None
    ) -> bytes:
        host = instance.host_header
        parts = [call.request_line, b"host: ", host, b"\r\n", call.common]
        deadline = current_deadline()
        if deadline is not None:
            parts += [b"x-atoll-deadline: ", deadline.to_header().encode(), b"\r\n"]
        if trace is not None:
            for name, value in trace:
                parts += [name, b": ", value, b"\r\n"]
        if call.stream is not None:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif call.body:
            parts += [b"content-length: ", str(len(call.body)).encode(), b"\r\n\r\n", call.body]
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    async def _send_streaming(
        self, instance: Instance, call: Call, trace: list[tuple[bytes, bytes]] | None
    ) -> Response:
        """Send the head, then copy the body while waiting for the answer (never retried)."""
        assert call.stream is not None
        conn = await instance.connect()
        pump: asyncio.Task[None] | None = None
        waiter: asyncio.Future[Response] | None = None
        try:
            waiter = conn.send(self._head(instance, call, trace), head_only=call.head_only)
            conn.sending_body = True
            pump = asyncio.get_running_loop().create_task(
                _pump(call.stream, conn, call.stream_limit)
            )
            done, _ = await asyncio.wait((waiter, pump), return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                # The body's failure first: a body over the limit aborts the connection,
                # which fails the waiter too, often before this task wakes up.
                pump.result()
                return await waiter
            response = waiter.result()
        except BaseException:
            if pump is not None:
                pump.cancel()
            if waiter is not None:
                if not waiter.done():
                    # Nobody will await it now: closing the connection must not fail it
                    # (an exception nobody reads is logged as an error when collected).
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()  # read: the body's error is the one raised
            conn.abort()
            raise
        # The instance answered before the whole body was sent. The copy goes on (an
        # instance may stream its answer as the body arrives; the connection is not pooled
        # until it ends, see UpstreamConnection.sending_body). Whatever the copy ends with
        # is no longer anyone's business: read, so it is not logged as lost.
        pump.add_done_callback(_read_outcome)
        return response


def _set_target(span: Any, call: Call, target: bytes) -> None:
    """The instance an attempt went to, on its CLIENT span (picked once it started)."""
    instance = call.last
    if instance is not None:
        span.set_attribute("server.address", instance.host)
        span.set_attribute("server.port", instance.port)
        # Without the query, as the access log and the SERVER span have it: a query may
        # carry a credential (?token=, a signed URL's signature), and traces are exported.
        path = target.partition(b"?")[0].decode("latin-1")
        span.set_attribute("url.full", f"http://{instance.address}{path}")


def _read_outcome(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _pump(body: Body, conn: Any, limit: int | None) -> None:
    """Copy a request body to the instance in chunked encoding, with flow control."""
    while (chunk := await body.chunk()) is not None:
        if limit is not None and body.received > limit:
            conn.abort()
            raise BodyTooLargeError
        if chunk:
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        writable = conn.writable
        if writable is not None:
            await writable
    conn.write(b"0\r\n\r\n")
    conn.sending_body = False


def upstreams_changed(
    old: Mapping[str, UpstreamConfig], new: Mapping[str, UpstreamConfig]
) -> set[str]:
    """Names whose configuration differs (or is new)."""
    return {name for name, config in new.items() if old.get(name) != config}
