"""The pages in headless Chromium: search, open a trace, read its spans."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from shop_trace import SERVICES, flush, make_shop_trace, providers

from atoll.observability._metric_export import MetricExport

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Set to a path (docs/img/trace-view.png) to save the waterfall for the README.
SCREENSHOT = os.environ.get("ATOLL_TRACE_VIEW_SCREENSHOT")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only browser tests need it

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


def test_search_open_a_trace_and_read_its_spans(live, browser):
    by_service = providers(live.traces_url, SERVICES)
    now = time.time_ns()
    shops = [
        make_shop_trace(by_service, start_ns=now - (5 - i) * 41_000_000_000, order_id=f"ord-{i}")
        for i in range(5)
    ]
    flush(by_service)
    live.wait_for_spans(5 * 13)
    target = shops[2]

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{live.url}/")
        assert page.locator("tr.trace-row").count() == 5

        # Choosing a service narrows the operations offered (done by the page's script).
        page.select_option("#f-service", "inventory")
        operations = page.locator("#f-operation option").all_inner_texts()
        assert operations == [
            "All operations",
            "UPDATE stock",
            "handle shop.OrderPlaced",
            "inventory.reserve",
        ]
        page.select_option("#f-service", "payments")
        page.fill("#f-attrs", f"order.id={target.order_id}")
        page.select_option("#f-status", "ok")
        page.click("#f-submit")
        page.wait_for_url("**/?service=payments*")
        rows = page.locator("tr.trace-row")
        assert rows.count() == 1
        assert rows.first.get_attribute("data-trace") == target.trace_id

        rows.first.locator("td.t-spans").click()  # anywhere on the row opens the trace
        page.wait_for_url(f"**/traces/{target.trace_id}")
        assert page.locator("#trace-id").inner_text() == target.trace_id
        spans = page.locator(".span-row")
        assert spans.count() == 13
        names = spans.locator(".op").all_inner_texts()
        assert names[0] == "POST /orders"
        assert "POST psp /charges" in names

        failed = page.locator(f"#span-{target.span_id('psp1')}")
        assert "is-error" in (failed.get_attribute("class") or "")
        detail = page.locator(f"#detail-{target.span_id('psp1')}")
        assert detail.is_hidden()
        failed.click()
        assert detail.is_visible()
        assert "server.address" in detail.inner_text()
        assert "psp.example" in detail.inner_text()
        assert "TimeoutError: psp.example did not answer" in detail.inner_text()

        # Collapsing the gateway's root hides everything below it. (Back to the top first:
        # the sticky header covers rows scrolled under it.)
        page.evaluate("window.scrollTo(0, 0)")
        root = page.locator(f"#span-{target.span_id('gateway')}")
        root.locator(".twisty").click()
        assert page.locator(".span-row:visible").count() == 1
        root.locator(".twisty").click()
        assert page.locator(".span-row:visible").count() == 13

        # The publish span links to the span that committed the message.
        publish = page.locator(f"#span-{target.span_id('publish')}")
        publish.click()
        page.locator(f"#detail-{target.span_id('publish')} a[data-link-span]").click()
        commit_detail = page.locator(f"#detail-{target.span_id('commit')}")
        assert commit_detail.is_visible()
        assert "atoll.outbox.rows" in commit_detail.inner_text()

        if SCREENSHOT:
            page.goto(f"{live.url}/traces/{shops[-1].trace_id}")
            page.locator(f"#span-{shops[-1].span_id('psp1')}").click()
            page.screenshot(path=SCREENSHOT, full_page=True)
    finally:
        page.close()
    assert errors == []


def test_a_trace_page_shows_its_logs_and_leads_to_their_spans(live, browser):
    import httpx  # noqa: PLC0415 - as the other imports of this module's second test
    from otlp import T0, make_request, make_span, span_id, trace_id  # noqa: PLC0415
    from test_logs import PB, log_request, record  # noqa: PLC0415

    tid, root, child = trace_id(), span_id(), span_id()
    spans = make_request(
        "orders",
        [
            make_span(tid, root, name="POST /orders", duration_ns=9_000_000),
            make_span(tid, child, parent=root, name="INSERT orders", start_ns=T0 + 1_000_000),
        ],
    )
    logs = log_request(
        [
            record("validating cart c-4", time_ns=T0 + 500_000, tid=tid, sid=root),
            record(
                "duplicate key, retrying", time_ns=T0 + 2_000_000, severity=13, tid=tid, sid=child
            ),
        ]
    )
    for path, request in (("/v1/traces", spans), ("/v1/logs", logs)):
        response = httpx.post(f"{live.url}{path}", content=request.SerializeToString(), headers=PB)
        assert response.status_code == 200

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{live.url}/traces/{tid.hex()}")
        assert page.locator("#log-count").inner_text() == "2"
        listed = page.locator("#logs li.log")
        assert listed.count() == 2
        assert "validating cart c-4" in listed.nth(0).inner_text()
        warning = listed.nth(1)
        assert "WARN" in warning.locator(".badge").inner_text().upper()
        badge = page.locator(f"#span-{child.hex()} .logs-badge")
        assert badge.inner_text() == "logs 1"
        assert "warn" in (badge.get_attribute("class") or "")  # coloured by the worst record
        detail = page.locator(f"#detail-{child.hex()}")
        assert detail.is_hidden()
        warning.locator("a.span-ref").click()  # from a log to the span that wrote it
        assert detail.is_visible()
        assert detail.locator("h4").all_inner_texts()[-1].split() == ["LOGS", "1"]
        assert "duplicate key, retrying" in detail.inner_text()
        assert "validating cart" not in detail.inner_text()

        # The log search: warnings and worse, then on to the trace at the span.
        page.click("header nav a[href='/logs']")
        page.wait_for_url("**/logs")
        assert page.locator("tr.log-row").count() == 2
        page.select_option("#l-severity", "warn")
        page.click("#l-submit")
        page.wait_for_url("**/logs?*severity=warn*")
        rows = page.locator("tr.log-row")
        assert rows.count() == 1
        assert "duplicate key, retrying" in rows.first.inner_text()
        rows.first.locator("a.trace-link").click()
        page.wait_for_url(f"**/traces/{tid.hex()}#span-{child.hex()}")
        assert page.locator(f"#detail-{child.hex()}").is_visible()
    finally:
        page.close()
    assert errors == []


def test_the_metrics_page_shows_what_services_push(live, browser):
    def pushed(service: str, orders: int, depth: float) -> None:
        registry = CollectorRegistry()
        Counter("shop_orders", "Orders placed.", ["status"], registry=registry).labels("paid").inc(
            orders
        )
        Gauge("shop_queue_depth", "Messages waiting.", registry=registry).set(depth)
        latency = Histogram(
            "shop_handler_duration_seconds",
            "Time in a handler.",
            buckets=(0.001, 0.01, 0.1),
            registry=registry,
        )
        for value in (0.0005, 0.002, 0.004, 0.05):
            latency.observe(value)
        export = MetricExport(
            {"service.name": service, "service.instance.id": f"{service}-1"},
            registry.collect,
            endpoint=f"{live.url}/v1/metrics",
            interval=3600,
        )
        # Its own loop, on a thread: Playwright's sync API holds this thread's.
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(asyncio.run, export.push()).result(30)

    pushed("orders", 7, 3)
    pushed("payments", 2, 0.5)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{live.url}/")
        page.click("nav >> text=Metrics")
        page.wait_for_url("**/series")
        assert page.locator("section.metric-family").count() == 3
        orders = page.locator("#m-shop_orders tr.series-row")
        assert orders.count() == 2
        page.select_option("#m-service", "orders")
        page.click("#m-submit")
        page.wait_for_url("**/series?service=orders*")
        row = page.locator("#m-shop_orders tr.series-row")
        assert row.count() == 1
        assert "status=paid" in row.inner_text()
        assert row.locator(".m-value").inner_text() == "7"
        depth = page.locator("#m-shop_queue_depth .m-value").inner_text()
        assert depth == "3"
        histogram = page.locator("#m-shop_handler_duration_seconds tr.series-row").inner_text()
        assert "4 observed" in histogram
        assert "p50" in histogram
        assert "p99" in histogram
        page.fill("#m-name", "queue")
        page.click("#m-submit")
        page.wait_for_url("**/series?service=orders&name=queue*")
        assert page.locator("section.metric-family").count() == 1
        page.fill("#m-name", "nothing-like-this")
        page.click("#m-submit")
        page.wait_for_selector("#no-metrics")
        assert "No metric matches" in page.locator("#no-metrics").inner_text()
        assert not errors, errors
    finally:
        page.close()
