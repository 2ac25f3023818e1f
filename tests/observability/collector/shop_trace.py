"""A realistic multi-service trace, made with the official OpenTelemetry SDK.

gateway -> orders (database, outbox, publish) -> inventory (consumes, retries) and
payments (a failing call with an exception and a circuit breaker opening, then a retry
that succeeds). The publish span links to the span that committed the message, as
atoll's publish spans do. Times are explicit so the waterfall is the same every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, set_span_in_context

MS = 1_000_000


@dataclass
class ShopTrace:
    trace_id: str
    order_id: str
    spans: dict[str, Span] = field(default_factory=dict)

    def span_id(self, name: str) -> str:
        return format(self.spans[name].get_span_context().span_id, "016x")


def providers(
    endpoint: str, services: list[str], compression: Compression | None = None
) -> dict[str, TracerProvider]:
    out = {}
    for service in services:
        provider = TracerProvider(
            resource=Resource.create(
                {
                    "service.name": service,
                    "service.version": "1.4.2",
                    "deployment.environment": "dev",
                    "host.name": f"{service}-7f9c",
                }
            )
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, compression=compression, timeout=10),
                schedule_delay_millis=50,
            )
        )
        out[service] = provider
    return out


SERVICES = ["gateway", "orders", "inventory", "payments"]


def make_shop_trace(
    providers_by_service: dict[str, TracerProvider], *, start_ns: int, order_id: str = "ord-7Q2K"
) -> ShopTrace:
    tracers = {
        name: provider.get_tracer("atoll", "0.1.0")
        for name, provider in providers_by_service.items()
    }
    spans: dict[str, Span] = {}

    def start(  # noqa: PLR0917 - the spans below read best as a table
        key: str,
        service: str,
        name: str,
        parent: str | None,
        at_ms: float,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, object] | None = None,
        links: list[Link] | None = None,
    ) -> Span:
        context: Context | None = set_span_in_context(spans[parent]) if parent else None
        span = tracers[service].start_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,  # type: ignore[arg-type]
            links=links,
            start_time=start_ns + int(at_ms * MS),
        )
        spans[key] = span
        return span

    def end(key: str, at_ms: float) -> None:
        spans[key].end(end_time=start_ns + int(at_ms * MS))

    start(
        "gateway",
        "gateway",
        "POST /orders",
        None,
        0,
        SpanKind.SERVER,
        {
            "http.request.method": "POST",
            "http.route": "/orders",
            "url.path": "/orders",
            "http.response.status_code": 201,
            "client.address": "10.0.0.12",
            "user_agent.original": "curl/8.5.0",
        },
    )
    start(
        "gw-client",
        "gateway",
        "POST orders /orders",
        "gateway",
        1.2,
        SpanKind.CLIENT,
        {"http.request.method": "POST", "server.address": "orders", "server.port": 8081},
    )
    start(
        "orders",
        "orders",
        "POST /orders",
        "gw-client",
        2.0,
        SpanKind.SERVER,
        {
            "http.request.method": "POST",
            "http.route": "/orders",
            "http.response.status_code": 201,
            "order.id": order_id,
        },
    )
    start(
        "place",
        "orders",
        "orders.place",
        "orders",
        2.6,
        attributes={"order.id": order_id, "order.items": 3, "order.total": 42.5},
    )
    start(
        "db",
        "orders",
        "INSERT orders",
        "place",
        3.1,
        SpanKind.CLIENT,
        {
            "db.system": "sqlite",
            "db.operation.name": "INSERT",
            "db.collection.name": "orders",
            "db.query.text": "INSERT INTO orders (id, customer_id, total) VALUES (?, ?, ?)",
        },
    )
    end("db", 5.4)
    start("commit", "orders", "atoll.commit", "place", 5.6, attributes={"atoll.outbox.rows": 1})
    end("commit", 7.9)
    end("place", 8.1)
    commit_context = spans["commit"].get_span_context()
    start(
        "publish",
        "orders",
        "publish shop.OrderPlaced",
        "orders",
        8.6,
        SpanKind.PRODUCER,
        {
            "messaging.system": "atoll",
            "messaging.destination.name": "shop.OrderPlaced",
            "messaging.message.id": "01J9Z3K8M6V7",
            "order.id": order_id,
        },
        [Link(commit_context, {"atoll.link": "committed-by"})],
    )
    end("publish", 10.2)
    end("orders", 11.0)
    end("gw-client", 11.8)
    end("gateway", 12.5)

    start(
        "consume",
        "inventory",
        "handle shop.OrderPlaced",
        "publish",
        14.0,
        SpanKind.CONSUMER,
        {
            "messaging.system": "atoll",
            "messaging.destination.name": "shop.OrderPlaced",
            "messaging.consumer.group.name": "inventory",
            "order.id": order_id,
        },
    )
    spans["consume"].add_event(
        "atoll.redelivery", {"attempt": 2, "reason": "lease expired"}, start_ns + 14 * MS
    )
    start(
        "reserve",
        "inventory",
        "inventory.reserve",
        "consume",
        15.0,
        attributes={"order.id": order_id, "sku": "apple", "qty": 2},
    )
    start(
        "inv-db",
        "inventory",
        "UPDATE stock",
        "reserve",
        15.5,
        SpanKind.CLIENT,
        {"db.system": "sqlite", "db.operation.name": "UPDATE", "db.collection.name": "stock"},
    )
    end("inv-db", 19.0)
    end("reserve", 19.6)
    end("consume", 20.4)

    start(
        "charge",
        "payments",
        "handle shop.OrderPlaced",
        "publish",
        14.5,
        SpanKind.CONSUMER,
        {"messaging.system": "atoll", "order.id": order_id},
    )
    start(
        "psp1",
        "payments",
        "POST psp /charges",
        "charge",
        15.2,
        SpanKind.CLIENT,
        {"http.request.method": "POST", "server.address": "psp.example", "retry.attempt": 1},
    )
    try:
        raise TimeoutError("psp.example did not answer within 800 ms")  # noqa: TRY301
    except TimeoutError as exc:
        spans["psp1"].record_exception(exc, timestamp=start_ns + 23 * MS)
    spans["psp1"].set_status(Status(StatusCode.ERROR, "timeout"))
    end("psp1", 23.2)
    spans["charge"].add_event(
        "atoll.breaker.state_change",
        {"breaker": "psp", "from": "closed", "to": "open", "failures": 5},
        start_ns + 23 * MS + 400_000,
    )
    start(
        "psp2",
        "payments",
        "POST psp /charges",
        "charge",
        25.0,
        SpanKind.CLIENT,
        {
            "http.request.method": "POST",
            "server.address": "psp-fallback.example",
            "retry.attempt": 2,
            "http.response.status_code": 201,
        },
    )
    end("psp2", 31.0)
    end("charge", 31.8)
    trace_id = format(spans["gateway"].get_span_context().trace_id, "032x")
    return ShopTrace(trace_id, order_id, spans)


def flush(providers_by_service: dict[str, TracerProvider]) -> None:
    for provider in providers_by_service.values():
        assert provider.force_flush(10_000)
    for provider in providers_by_service.values():
        provider.shutdown()
