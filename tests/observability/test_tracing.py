import gc
import json
import logging

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Command, Context, Reply, Service
from atoll.observability import Tracing, _tracing, configure_logging
from atoll.persistence import SQLiteDatabase
from atoll.resilience import HTTP, CircuitBreaker, Pipeline, ServiceClient
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from support import System


class Ask(Command):
    message_type = "trace.Ask"
    n: int


class Answer(Reply):
    message_type = "trace.Answer"
    n: int


def services():
    front = Service("front", schema=["CREATE TABLE answers (n INTEGER)"])
    back = Service("back")

    @front.http.post("/ask/{n}")
    async def ask(n: int) -> dict[str, int]:
        async with front.unit_of_work() as ctx:
            ctx.send(Ask(n=n), to="back")
        return {"n": n}

    @back.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        logging.getLogger("test.back").info("answering %s", ask.n)
        ctx.reply(Answer(n=ask.n))

    @front.handles(Answer)
    async def on_answer(answer: Answer, ctx: Context) -> None:
        await ctx.execute("INSERT INTO answers (n) VALUES (?)", answer.n)

    return front, back


@pytest.fixture
async def traced(tmp_path):
    exporter = InMemorySpanExporter()
    system = System(tmp_path)
    await system.transport.connect()
    front, back = services()
    runtimes = []
    for service in (front, back):
        runtime = ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=system.transport,
            owns_transport=False,
            tracing=Tracing(service.name, exporter=exporter),
        )
        await runtime.start()
        runtimes.append(runtime)
    yield front, runtimes, exporter
    for runtime in runtimes:
        await runtime.stop()
    await system.transport.close()


def flush(runtimes):
    for runtime in runtimes:
        runtime.tracing.processor.force_flush()


async def test_one_trace_crosses_http_the_outbox_the_transport_and_both_handlers(traced):
    front, runtimes, exporter = traced
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # messaging.system names the transport's broker (RabbitMQ's says "rabbitmq").
    runtimes[0].transport.messaging_system = "testbroker"
    transport = httpx.ASGITransport(app=front.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        response = await client.post("/ask/7", headers={"traceparent": parent})
    assert response.status_code == 200

    async def answered():
        async with runtimes[0].database.read() as db:
            return await db.fetch_value("SELECT count(*) FROM answers") == 1

    await wait_until(answered, what="the answer")
    await wait_until(
        lambda: (flush(runtimes), len(exporter.get_finished_spans()) >= 5)[1], what="spans"
    )
    spans = exporter.get_finished_spans()
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    process_ask = by_name["process trace.Ask"][0]
    process_answer = by_name["process trace.Answer"][0]
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    # The incoming W3C context is continued, through the outbox, to both handlers.
    assert server.context.trace_id == trace_id
    assert process_ask.context.trace_id == trace_id
    assert process_answer.context.trace_id == trace_id
    assert process_ask.parent.span_id == server.context.span_id
    assert process_answer.parent.span_id == process_ask.context.span_id
    assert process_ask.resource.attributes["service.name"] == "back"
    assert process_ask.kind == SpanKind.CONSUMER
    assert process_ask.attributes["messaging.consumer.group.name"] == "back"
    assert process_ask.attributes["messaging.destination.name"] == "service.back"
    assert process_ask.attributes["messaging.operation.type"] == "process"
    assert process_ask.attributes["messaging.system"] == "testbroker"
    # The relay's publish span links to the span that committed the message.
    publishes = [s for s in spans if s.name.split()[0] == "publish"]
    assert publishes
    for publish in publishes:
        assert publish.attributes["messaging.system"] == "testbroker"
        assert publish.attributes["messaging.operation.name"] == "publish"
        topic = publish.attributes.get("messaging.destination.name")
        assert publish.name == (f"publish {topic}" if topic else "publish")
    linked = {link.context.span_id for span in publishes for link in span.links}
    assert server.context.span_id in linked
    assert process_ask.context.span_id in linked
    assert all(p.kind == SpanKind.PRODUCER for p in publishes)
    # Health probes are not traced.
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        await client.get("/readyz")
    flush(runtimes)
    assert not [s for s in exporter.get_finished_spans() if "readyz" in s.name]


async def test_handler_logs_carry_trace_span_and_correlation_ids(traced, capsys):
    front, runtimes, _ = traced
    configure_logging(service="back", fmt="json", level="INFO")
    try:
        async with front.unit_of_work(correlation_id="corr-42") as ctx:
            ctx.send(Ask(n=1), to="back")

        async def answered():
            async with runtimes[0].database.read() as db:
                return await db.fetch_value("SELECT count(*) FROM answers") == 1

        await wait_until(answered, what="the answer")
    finally:
        logging.getLogger().handlers.clear()
    line = next(line for line in capsys.readouterr().err.splitlines() if "answering 1" in line)
    record = json.loads(line)
    assert record["correlation_id"] == "corr-42"
    assert len(record["trace_id"]) == 32
    assert len(record["span_id"]) == 16
    assert record["service"] == "back"


async def test_an_unreachable_collector_neither_slows_nor_fails_work(tmp_path):
    system = System(tmp_path)
    await system.transport.connect()
    front, back = services()
    runtimes = []
    for service in (front, back):
        runtime = ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=system.transport,
            owns_transport=False,
            tracing=Tracing(
                service.name, endpoint="http://127.0.0.1:9/v1/traces", max_queue_size=8
            ),
        )
        await runtime.start()
        runtimes.append(runtime)
    try:
        transport = httpx.ASGITransport(app=front.http)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            for n in range(60):
                response = await client.post(f"/ask/{n}")
                assert response.status_code == 200

        async def answered():
            async with runtimes[0].database.read() as db:
                return await db.fetch_value("SELECT count(*) FROM answers") == 60

        await wait_until(answered, timeout=20, what="every answer despite the dead collector")
        assert sum(r.tracing.dropped_spans for r in runtimes) > 0, "drops were not counted"
        metrics = (await runtimes[0].metrics.render()).decode()
        assert 'atoll_trace_spans_dropped_total{service="front"}' in metrics
        # Log records lost on their way out are counted under the same shape (none here:
        # only a process's global service exports its logs).
        assert 'atoll_log_records_dropped_total{service="front"} 0.0' in metrics
        assert 'atoll_log_records_export_failed_total{service="front"} 0.0' in metrics
    finally:
        for runtime in runtimes:
            await runtime.stop()
        await system.transport.close()


async def test_breaker_state_changes_are_span_events(tmp_path):
    exporter = InMemorySpanExporter()
    system = System(tmp_path)
    await system.transport.connect()
    tracing = Tracing("caller", exporter=exporter)
    failing = httpx.MockTransport(lambda request: httpx.Response(503))
    breaker = CircuitBreaker("down", classifier=HTTP, minimum_calls=2, window_size=4, wait=60)
    client = ServiceClient(
        {"down": "http://down.invalid"},
        policies={"down": Pipeline(name="down", breaker=breaker)},
        transport=failing,
    )
    runtime = ServiceRuntime(
        Service("caller"),
        database=SQLiteDatabase(tmp_path / "caller.db"),
        transport=system.transport,
        owns_transport=False,
        tracing=tracing,
        client=client,
    )
    await runtime.start()
    try:
        with tracing.tracer.start_as_current_span("call things"):
            for _ in range(2):
                assert (await runtime.client.get("down", "/x")).status_code == 503
        tracing.processor.force_flush()
        span = next(s for s in exporter.get_finished_spans() if s.name == "call things")
        [event] = [e for e in span.events if e.name == "breaker state change"]
        assert event.attributes["atoll.breaker.name"] == "down"
        assert event.attributes["atoll.breaker.state"] == "open"
        assert event.attributes["atoll.breaker.previous_state"] == "closed"
    finally:
        await runtime.stop()
        await system.transport.close()


def test_a_services_tracer_is_forgotten_with_it():
    # Processes that make many Tracing objects (tests, reloads) must not keep an entry
    # for each one forever.
    before = len(_tracing._BY_RESOURCE)
    tracings = [Tracing(f"svc-{n}", exporter=InMemorySpanExporter()) for n in range(20)]
    assert len(_tracing._BY_RESOURCE) == before + 20
    with tracings[0].tracer.start_as_current_span("x") as span:
        assert _tracing.service_tracer(span) is tracings[0].library_tracer
    for tracing in tracings:
        tracing.shutdown()
    del tracings, tracing, span
    gc.collect()
    assert len(_tracing._BY_RESOURCE) == before
