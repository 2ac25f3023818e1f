"""The span store: search filters, retention, reopening."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from otlp import T0, make_request, make_span, span_id, trace_id

from atoll.determinism import VirtualClock
from atoll.observability.collector import CollectorError, Retention, SpanStore, TraceQuery
from atoll.observability.collector._decode import Interner, OTLPDecoder

MS = 1_000_000


async def put(store: SpanStore, service: str | None, spans, resource=None) -> None:
    decoder = OTLPDecoder(store.resources, store.scopes)
    await store.write(decoder.convert(make_request(service, spans, resource)))


@pytest.fixture
async def store(db_path):
    opened = SpanStore(db_path, retention=Retention(max_age=None, max_spans=None))
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def shop(store):
    """Five traces with known services, operations, durations, statuses and attributes."""
    ids = {}

    async def trace(
        key,
        service,
        name,
        start_ms,
        duration_ms,
        *,
        status=0,
        attributes=None,
        child=None,
        resource=None,
    ):
        tid = trace_id()
        root = span_id()
        spans = [
            make_span(
                tid,
                root,
                name=name,
                start_ns=T0 + start_ms * MS,
                duration_ns=duration_ms * MS,
                status=status,
                attributes=attributes,
            )
        ]
        await put(store, service, spans, resource)
        if child is not None:
            child_service, child_name, child_attributes, child_status = child
            await put(
                store,
                child_service,
                [
                    make_span(
                        tid,
                        span_id(),
                        parent=root,
                        name=child_name,
                        start_ns=T0 + (start_ms + 1) * MS,
                        duration_ns=MS,
                        attributes=child_attributes,
                        status=child_status,
                    )
                ],
            )
        ids[key] = tid.hex()

    await trace(
        "a",
        "orders",
        "POST /orders",
        0,
        120,
        attributes={"order.id": "A-1", "items": 3},
        child=("payments", "charge", {"amount": 10.5, "ok": True}, 0),
    )
    await trace(
        "b",
        "orders",
        "POST /orders",
        10,
        900,
        status=2,
        attributes={"order.id": "B-2", "items": 1},
        child=("payments", "charge", {"amount": 99.0, "ok": False}, 2),
    )
    await trace("c", "orders", "GET /orders/{id}", 20, 5, attributes={"order.id": "A-1"})
    await trace(
        "d",
        "inventory",
        "reserve",
        30,
        40,
        attributes={"sku": "apple", "qty": 2},
        resource={"host.name": "inv-1"},
    )
    await trace(
        "e",
        "inventory",
        "reserve",
        40,
        60,
        attributes={"sku": "pear", "note": "n" * 400},
        resource={"host.name": "inv-2"},
    )
    return ids


async def found(store, **query) -> list[str]:
    return [t.trace_id for t in await store.search(TraceQuery(**query))]


async def test_search_filters(store, shop):
    s = shop
    assert await found(store) == [s["e"], s["d"], s["c"], s["b"], s["a"]]  # newest first
    assert await found(store, limit=2) == [s["e"], s["d"]]
    assert await found(store, service="payments") == [s["b"], s["a"]]
    assert await found(store, service="nobody") == []
    assert await found(store, operation="reserve") == [s["e"], s["d"]]
    assert await found(store, service="orders", operation="GET /orders/{id}") == [s["c"]]
    assert await found(store, min_duration_ns=100 * MS) == [s["b"], s["a"]]
    assert await found(store, max_duration_ns=5 * MS) == [
        s["c"],
        s["b"],
        s["a"],
    ]  # the 1 ms children
    assert await found(store, service="orders", max_duration_ns=50 * MS) == [s["c"]]
    assert await found(store, status="error") == [s["b"]]
    assert await found(store, service="payments", status="ok") == [s["a"]]
    assert await found(store, start_ns=T0 + 15 * MS, end_ns=T0 + 35 * MS) == [s["d"], s["c"]]


@pytest.mark.parametrize("indexed", [False, True], ids=["scanning-the-tail", "indexed"])
async def test_attribute_search(store, shop, db_path, indexed):
    s = shop
    if indexed:
        await store.index_now()
    with sqlite3.connect(db_path) as peek:
        rows = peek.execute("SELECT count(*) FROM attrs_1").fetchone()[0]
        watermark = peek.execute("SELECT indexed_upto FROM segments").fetchone()[0]
    peek.close()
    assert (rows > 0, watermark == (await store.stats()).spans) == (indexed, indexed)
    assert await found(store, attributes=(("order.id", "A-1"),)) == [s["c"], s["a"]]
    assert await found(store, attributes=(("items", "3"),)) == [s["a"]]  # an int attribute
    assert await found(store, attributes=(("amount", "99"),)) == [s["b"]]  # a double
    assert await found(store, attributes=(("ok", "false"),)) == [s["b"]]  # a boolean
    assert await found(store, attributes=(("order.id", "A-1"), ("items", "3"))) == [s["a"]]
    assert await found(store, attributes=(("order.id", "A-1"), ("items", "1"))) == []
    assert await found(store, attributes=(("host.name", "inv-2"),)) == [s["e"]]  # resource
    assert await found(store, service="inventory", attributes=(("sku", "apple"),)) == [s["d"]]
    # Longer than the index holds: found by scanning the attribute JSON instead.
    assert await found(store, attributes=(("note", "n" * 400),)) == [s["e"]]
    assert await found(store, attributes=(("note", "n" * 399),)) == []


async def test_attribute_search_without_the_index(db_path):
    store = SpanStore(db_path, index_attributes=False)
    await store.open()
    try:
        tid = trace_id()
        await put(store, "svc", [make_span(tid, span_id(), attributes={"order.id": "X-9", "n": 4})])
        await put(store, "svc", [make_span(trace_id(), span_id(), attributes={"order.id": "Y"})])
        assert await found(store, attributes=(("order.id", "X-9"),)) == [tid.hex()]
        assert await found(store, attributes=(("n", "4"),)) == [tid.hex()]
    finally:
        await store.close()


async def test_trace_summary_and_services(store, shop):
    [summary] = await store.search(TraceQuery(status="error"))
    assert (summary.root_service, summary.root_name) == ("orders", "POST /orders")
    assert summary.span_count == 2
    assert summary.error_count == 2
    assert [(s.name, s.span_count) for s in summary.services] == [("orders", 1), ("payments", 1)]
    services = {s.name: s.operations for s in await store.services()}
    assert services == {
        "inventory": ["reserve"],
        "orders": ["GET /orders/{id}", "POST /orders"],
        "payments": ["charge"],
    }


async def test_a_trace_without_its_root(store):
    tid = trace_id()
    await put(store, "late", [make_span(tid, span_id(), parent=span_id(), name="orphan")])
    trace = await store.get_trace(tid)
    assert trace is not None
    assert trace.summary.root_missing
    assert trace.summary.root_name == "orphan"
    assert await store.get_trace(trace_id()) is None


async def test_count_retention_drops_the_oldest_segments(db_path):
    store = SpanStore(db_path, retention=Retention(max_age=None, max_spans=100, segments=4))
    await store.open()
    try:
        traces = []
        for i in range(12):
            tid = trace_id()
            traces.append(tid)
            spans = [
                make_span(tid, span_id(), name=f"batch {i}", attributes={"batch": i})
                for _ in range(10)
            ]
            await put(store, f"svc-{i}", spans)
        stats = await store.stats()
        assert 75 <= stats.spans <= 100
        assert stats.segments_dropped >= 1
        assert await store.get_trace(traces[0]) is None  # the oldest went first
        assert await store.get_trace(traces[-1]) is not None
        assert await found(store, attributes=(("batch", "0"),)) == []
        assert await found(store, attributes=(("batch", "11"),)) == [traces[-1].hex()]
        names = {s.name for s in await store.services()}
        assert "svc-0" not in names
        assert "svc-11" in names
    finally:
        await store.close()


def test_segments_are_capped_whatever_max_spans_is():
    assert Retention(max_spans=1_000_000, segments=10).segment_spans == 10_000
    assert Retention(max_spans=1_000, segments=10).segment_spans == 100
    assert Retention(max_spans=None).segment_spans == 10_000
    assert Retention(max_spans=None, max_segment_spans=50).segment_spans == 50


async def test_count_retention_with_more_segments_than_segments(db_path):
    # Capped at 10 spans a segment, max_spans=100 and segments=2 give ten-span segments:
    # the store keeps at least 90 spans instead of 50, and every trace stays whole.
    retention = Retention(max_age=None, max_spans=100, segments=2, max_segment_spans=10)
    store = SpanStore(db_path, retention=retention)
    await store.open()
    try:
        traces = []
        for i in range(30):
            tid = trace_id()
            traces.append(tid)
            await put(store, "svc", [make_span(tid, span_id(), name=f"op {i}") for _ in range(5)])
        stats = await store.stats()
        assert 90 <= stats.spans <= 100
        assert stats.segments == stats.spans // 10
        kept = [t for t in traces if await store.get_trace(t) is not None]
        assert kept == traces[-len(kept) :]  # the newest, in order
        for tid in kept:
            trace = await store.get_trace(tid)
            assert trace is not None
            assert len(trace.spans) == 5
    finally:
        await store.close()


async def test_age_retention_in_the_background(db_path):
    clock = VirtualClock(start=time.time())
    store = SpanStore(
        db_path,
        retention=Retention(max_age=3600, max_spans=None, segments=4, interval=60),
        clock=clock,
    )
    await store.open()
    pruning = asyncio.create_task(store.run_retention())
    try:
        old = trace_id()
        await put(store, "svc", [make_span(old, span_id())])
        await clock.advance(1800)
        new = trace_id()
        await put(store, "svc", [make_span(new, span_id())])  # a new segment: 1800 s >= 900 s
        await clock.advance(1800 + 60)  # the old segment is now older than an hour

        # Each step wakes the retention task once; its pass runs on the writer thread,
        # so give it real time to finish before looking.
        deadline = time.monotonic() + 10
        while await store.get_trace(old) is not None:
            assert time.monotonic() < deadline, "the background pass did not prune"
            await clock.advance(60)
            await asyncio.sleep(0.01)
        assert await store.get_trace(new) is not None

        pruning.cancel()  # now by hand: an explicit pass drops what is too old
        await clock.advance(3600)
        assert await store.prune() == 1
        assert (await store.stats()).spans == 0
    finally:
        pruning.cancel()
        await store.close()


async def test_reopen_keeps_spans_and_ids(db_path):
    store = SpanStore(db_path)
    await store.open()
    tid = trace_id()
    await put(store, "svc", [make_span(tid, span_id())], {"host.name": "h"})
    resource_id = (await store.get_trace(tid)).spans[0].resource_id
    await store.close()

    again = SpanStore(db_path)
    await again.open()
    try:
        assert (await again.get_trace(tid)) is not None
        tid2 = trace_id()
        await put(again, "svc", [make_span(tid2, span_id())], {"host.name": "h"})
        await put(again, "other", [make_span(tid2, span_id())])
        spans = (await again.get_trace(tid2)).spans
        assert {s.resource_id for s in spans if s.service == "svc"} == {resource_id}
        assert {s.resource_id for s in spans if s.service == "other"} != {resource_id}
    finally:
        await again.close()


async def test_refuses_a_file_that_is_not_a_collector_store(tmp_path):
    path = tmp_path / "service.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id TEXT)")
    conn.close()
    store = SpanStore(path)
    with pytest.raises(CollectorError, match="not a collector store"):
        await store.open()
    assert not store.is_open


def test_interner_is_stable():
    interner = Interner()
    interner.seed([(b"a", 5)])
    assert interner.intern(b"a") == 5
    assert interner.intern(b"b") == 6
    assert interner.intern(b"b") == 6


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"max_age": 0}, "max_age"),
        ({"max_spans": 0}, "max_spans"),
        ({"segments": 1}, "segments"),
        ({"interval": 0}, "interval"),
        ({"max_segment_spans": 0}, "max_segment_spans"),
    ],
)
def test_retention_is_validated(retention, message):
    with pytest.raises(ValueError, match=message):
        Retention(**retention)


async def test_attribute_search_across_many_index_chunks(db_path):
    store = SpanStore(db_path, index_chunk=1, index_delay=3600)  # a chunk per write
    await store.open()
    try:
        traces = []
        for i in range(70):
            tid = trace_id()
            traces.append(tid.hex())
            attributes = {"common": "yes", "n": i, "parity": i % 2 == 0}
            await put(store, "svc", [make_span(tid, span_id(), attributes=attributes)])
        await put(store, "svc", [make_span(trace_id(), span_id(), attributes={"n": 999})])
        with sqlite3.connect(db_path) as peek:
            chunks = peek.execute("SELECT count(*) FROM chunks_1").fetchone()[0]
            rows = peek.execute("SELECT count(*) FROM attrs_1 WHERE key = 'common'").fetchone()[0]
        peek.close()
        assert chunks >= 70
        assert rows == 70  # in more chunks than are listed: the JSON check alone decides
        newest_first = traces[::-1]
        assert await found(store, attributes=(("common", "yes"),), limit=100) == newest_first
        assert await found(store, attributes=(("n", "5"),)) == [traces[5]]
        assert await found(store, attributes=(("n", "5"), ("common", "yes"))) == [traces[5]]
        assert await found(store, attributes=(("parity", "true"),), limit=3) == newest_first[1:6:2]
        assert await found(store, attributes=(("n", "71"),)) == []
    finally:
        await store.close()


# --- the attribute index: terms from the decoder, or read back from the rows ------------

# No NUL in strings: SQLite's text functions stop at the first one, so the search's JSON
# check cannot match such a value whatever the index holds.
_text = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
)
_scalars = st.one_of(
    _text,
    st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
        min_size=250,
        max_size=260,
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(_text, _scalars, max_size=2),
    st.binary(max_size=4),
)
_attributes = st.dictionaries(
    st.sampled_from(["k", "order.id", "n", "flag", "ünï", ""]), _values, max_size=5
)
_INDEX_ROWS = "SELECT key, quote(value), typeof(value), chunk FROM attrs_1 ORDER BY 1, 2, 3, 4"
#: What the search's JSON check matches, as the index must hold it (the reference).
_JSON_TERMS = (
    "SELECT DISTINCT j.key,"
    " quote(CASE j.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE j.value END),"
    " CASE WHEN j.type IN ('true', 'false') THEN 'text' ELSE typeof(j.value) END, 1"
    " FROM spans_1 AS s, json_each(s.attributes) AS j"
    " WHERE j.type IN ('text', 'integer', 'real', 'true', 'false')"
    " AND (j.type != 'text' OR length(j.value) <= 256) ORDER BY 1, 2, 3, 4"
)


async def _index(path, spans_attributes, *, after_restart: bool) -> tuple[list, list]:
    store = SpanStore(path, index_delay=3600)
    await store.open()
    try:
        decoder = OTLPDecoder(store.resources, store.scopes)
        for attributes in spans_attributes:
            batch = decoder.convert(
                make_request("svc", [make_span(trace_id(), span_id(), attributes=attributes)])
            )
            if after_restart:
                batch.terms = None  # as if stored before a restart: read from the rows
            await store.write(batch)
        await store.index_now()
    finally:
        await store.close()
    with sqlite3.connect(path) as peek:
        index, reference = (
            peek.execute(_INDEX_ROWS).fetchall(),
            peek.execute(_JSON_TERMS).fetchall(),
        )
    peek.close()
    return index, reference


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spans_attributes=st.lists(_attributes, min_size=1, max_size=6))
async def test_the_attribute_index_holds_what_the_json_check_matches(tmp_path, spans_attributes):
    """The index rows, from the decoder's terms or read back after a restart, are the
    distinct (key, value) pairs that SQLite's ``json_each`` finds in the stored JSON."""
    run = tmp_path / str(time.perf_counter_ns())
    run.mkdir()
    index, reference = await _index(run / "fast.db", spans_attributes, after_restart=False)
    assert index == reference
    index, reference = await _index(run / "slow.db", spans_attributes, after_restart=True)
    assert index == reference


async def test_spans_stored_before_a_restart_are_indexed_from_their_rows(db_path):
    store = SpanStore(db_path, index_delay=3600)
    await store.open()
    tid = trace_id()
    await put(store, "svc", [make_span(tid, span_id(), attributes={"order.id": "R-1"})])
    await store.close()  # not indexed yet: the terms in memory are gone with the process
    reopened = SpanStore(db_path, index_delay=3600)
    await reopened.open()
    try:
        other = trace_id()
        await put(reopened, "svc", [make_span(other, span_id(), attributes={"order.id": "R-2"})])
        await reopened.index_now()
        with sqlite3.connect(db_path) as peek:
            values = peek.execute("SELECT value FROM attrs_1 ORDER BY value").fetchall()
        peek.close()
        assert values == [("R-1",), ("R-2",)]
        assert await found(reopened, attributes=(("order.id", "R-1"),)) == [tid.hex()]
        assert await found(reopened, attributes=(("order.id", "R-2"),)) == [other.hex()]
    finally:
        await reopened.close()
