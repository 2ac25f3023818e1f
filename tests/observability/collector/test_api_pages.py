"""The JSON API and the server-rendered pages (without a browser)."""

from __future__ import annotations

from otlp import T0, make_request, make_span, span_id, trace_id

from atoll.observability.collector._pages import format_duration, order_spans
from atoll.observability.collector._store import SpanRecord

PB = {"content-type": "application/x-protobuf"}
EVIL = '<script>alert("x")</script>'


async def send(client, service, spans, resource=None):
    body = make_request(service, spans, resource).SerializeToString()
    response = await client.post("/v1/traces", content=body, headers=PB)
    assert response.status_code == 200, response.content


async def test_search_api_parameters(client):
    tid = trace_id()
    root = span_id()
    await send(
        client,
        "orders",
        [
            make_span(
                tid,
                root,
                name="POST /orders",
                duration_ns=250_000_000,
                attributes={"order.id": "o-1", "http.route": "/orders list"},
            ),
            make_span(tid, span_id(), parent=root, name="db", status=2, duration_ns=1_000_000),
        ],
    )
    await send(client, "other", [make_span(trace_id(), span_id(), name="noise")])

    async def ids(**params):
        response = await client.get("/api/traces", params=params)
        assert response.status_code == 200, response.text
        return [t["trace_id"] for t in response.json()["traces"]]

    assert await ids(service="orders") == [tid.hex()]
    assert await ids(min_duration_ms=200) == [tid.hex()]
    assert await ids(service="orders", max_duration_ms=0.5) == []
    assert await ids(status="error") == [tid.hex()]
    assert await ids(attr=["order.id=o-1", "http.route=/orders list"]) == [tid.hex()]
    assert await ids(attr="order.id=o-2") == []
    assert await ids(start=str(T0 // 1_000_000 + 1)) == []
    assert await ids(start="2027-01-15T08:00:00+00:00", end="2099-01-01T00:00:00") != []
    assert len(await ids(limit=1)) == 1
    [summary] = (await client.get("/api/traces", params={"service": "orders"})).json()["traces"]
    assert summary["span_count"] == 2
    assert summary["error_count"] == 1
    assert summary["duration_ns"] == 250_000_000


async def test_api_errors_are_problem_json(client):
    for params, status, says in [
        ({"status": "maybe"}, 422, "status"),
        ({"limit": 0}, 422, "limit"),
        ({"attr": "no-equals"}, 400, "key=value"),
        ({"start": "yesterday"}, 400, "ISO 8601"),
        ({"lookback": "forever"}, 400, "lookback"),
    ]:
        response = await client.get("/api/traces", params=params)
        assert response.status_code == status, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert says in response.text
    response = await client.get("/api/traces/not-hex")
    assert response.status_code == 400
    response = await client.get(f"/api/traces/{'ab' * 16}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_services_stats_health(client):
    await send(client, "alpha", [make_span(trace_id(), span_id(), name="a1")])
    services = (await client.get("/api/services")).json()["services"]
    assert services == [{"name": "alpha", "operations": ["a1"]}]
    stats = (await client.get("/api/stats")).json()
    assert stats["spans"] == 1
    assert stats["spans_received"] == 1
    assert (await client.get("/healthz")).json()["status"] == "alive"
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/static/collector.js")).status_code == 200
    assert (await client.get("/static/../_store.py")).status_code == 404


async def test_pages_escape_span_data(client):
    tid = trace_id()
    await send(
        client,
        EVIL,
        [
            make_span(
                tid, span_id(), name=EVIL, attributes={EVIL: EVIL}, events=[(EVIL, T0, {"k": EVIL})]
            )
        ],
    )
    for path in ("/", f"/traces/{tid.hex()}", f"/?attrs=k%3D{EVIL}"):
        page = (await client.get(path)).text
        assert EVIL not in page
        assert "&lt;script&gt;" in page


async def test_search_page_lists_and_filters(client):
    tid = trace_id()
    await send(client, "orders", [make_span(tid, span_id(), name="POST /orders", status=2)])
    await send(client, "audit", [make_span(trace_id(), span_id(), name="record")])
    page = (await client.get("/", params={"service": "orders", "status": "error"})).text
    assert f"/traces/{tid.hex()}" in page
    assert "record" not in page.split('id="results"')[1]
    response = await client.get("/", params={"min_duration_ms": "fast"})
    assert response.status_code == 400
    assert "not a number" in response.text
    empty = (await client.get("/", params={"service": "nobody"})).text
    assert 'id="no-results"' in empty


async def test_trace_page_shows_every_span_nested(client):
    tid = trace_id()
    root, child, grandchild = span_id(), span_id(), span_id()
    await send(client, "a", [make_span(tid, root, name="root", duration_ns=10_000_000)])
    await send(client, "b", [make_span(tid, child, parent=root, name="child", start_ns=T0 + 1)])
    await send(
        client,
        "b",
        [
            make_span(
                tid, grandchild, parent=child, name="leaf", start_ns=T0 + 2, links=[(tid, root, {})]
            )
        ],
    )
    page = (await client.get(f"/traces/{tid.hex()}")).text
    rows = [line for line in page.splitlines() if 'class="span-row' in line]
    assert [r.split('data-depth="')[1][0] for r in rows] == ["0", "1", "2"]
    assert f'href="#span-{root.hex()}"' in page  # the link, within this trace
    missing = await client.get(f"/traces/{'cd' * 16}")
    assert missing.status_code == 404
    assert 'id="not-found"' in missing.text


def record(sid, parent, start):
    return SpanRecord(
        trace_id="t",
        span_id=sid,
        parent_span_id=parent,
        service="s",
        resource_id=1,
        name=sid,
        kind="internal",
        start_ns=start,
        end_ns=start + 1,
        duration_ns=1,
        status="unset",
        status_message=None,
        trace_state=None,
        flags=0,
        scope_name="",
        scope_version="",
        attributes={},
        events=[],
        links=[],
        dropped=None,
    )


def test_order_spans_handles_orphans_and_cycles():
    spans = [
        record("b", "a", 2),
        record("a", None, 1),
        record("c", "a", 1),
        record("x", "y", 5),  # parent never received
        record("p", "q", 7),  # p and q are each other's parent
        record("q", "p", 6),
    ]
    order = [(s.span_id, depth) for s, depth, _ in order_spans(spans)]
    assert order[:4] == [("a", 0), ("c", 1), ("b", 1), ("x", 0)]
    assert sorted(order[4:]) == [("p", 0), ("q", 1)] or sorted(order[4:]) == [("p", 1), ("q", 0)]


def test_format_duration():
    assert format_duration(999) == "999 ns"
    assert format_duration(1_500) == "1.5 µs"
    assert format_duration(12_340_000) == "12.3 ms"
    assert format_duration(250_000_000) == "250 ms"
    assert format_duration(2_500_000_000) == "2.5 s"
    assert format_duration(125_000_000_000) == "2 min 5 s"


async def test_search_page_time_range_from_the_url(client):
    tid = trace_id()
    await send(client, "timed", [make_span(tid, span_id(), start_ns=T0)])
    inside = {"start": str(T0 // 1_000_000 - 1), "end": "2099-01-01T00:00:00Z"}
    page = (await client.get("/", params=inside)).text
    assert f"/traces/{tid.hex()}" in page
    assert f'name="start" value="{inside["start"]}"' in page  # kept for the next search
    page = (await client.get("/", params={"start": str(T0 // 1_000_000 + 1)})).text
    assert f"/traces/{tid.hex()}" not in page
