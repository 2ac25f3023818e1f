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
from atoll.observability.collector._terms import (
    _make_bloom_python,
    bloom_bits,
    make_bloom,
    might_contain,
    term_hash,
)

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
        rows = peek.execute("SELECT count(*) FROM chunks_1").fetchone()[0]
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
            blooms = [bloom for (bloom,) in peek.execute("SELECT bloom FROM chunks_1")]
        peek.close()
        assert len(blooms) >= 70
        common = term_hash("common", "yes")
        holding = sum(might_contain(bloom, common) for bloom in blooms)
        assert holding >= 70  # in more chunks than are listed: the JSON check alone decides
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
#: What the search's JSON check matches: every distinct scalar (key, value) of the spans,
#: as SQLite's json_each reads it (booleans as their texts), with the span's trace id.
_JSON_TERMS = (
    "SELECT DISTINCT j.key,"
    " CASE j.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE j.value END,"
    " s.trace_id, s.id"
    " FROM spans_1 AS s, json_each(s.attributes) AS j"
    " WHERE j.type IN ('text', 'integer', 'real', 'true', 'false')"
)


def _as_searched(value: object) -> str:
    """The text a user searches for to find ``value``."""
    return value if isinstance(value, str) else repr(value)


async def _index(path, spans_attributes, *, after_restart: bool) -> None:
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
        with sqlite3.connect(path) as peek:
            reference = peek.execute(_JSON_TERMS).fetchall()
            chunks = peek.execute("SELECT lo, hi, bloom FROM chunks_1").fetchall()
        peek.close()
        assert chunks  # everything is indexed: the search goes by the filters alone
        for key, value, tid, span in reference:
            bloom = next(bloom for lo, hi, bloom in chunks if lo <= span <= hi)
            assert might_contain(bloom, term_hash(key, value)), (key, value)
            if "\x00" in key + _as_searched(value):
                continue  # SQLite's text functions stop at a NUL: the JSON check cannot match
            hits = await found(store, attributes=((key, _as_searched(value)),), limit=100)
            assert tid.hex() in hits, (key, value)
    finally:
        await store.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spans_attributes=st.lists(_attributes, min_size=1, max_size=6))
async def test_the_attribute_index_finds_what_the_json_check_matches(tmp_path, spans_attributes):
    """Every distinct (key, value) that SQLite's ``json_each`` finds in the stored JSON is
    in its chunk's filter, from the decoder's terms or read back after a restart, and a
    search for it finds the span."""
    run = tmp_path / str(time.perf_counter_ns())
    run.mkdir()
    await _index(run / "fast.db", spans_attributes, after_restart=False)
    await _index(run / "slow.db", spans_attributes, after_restart=True)


def test_equal_numbers_are_one_term_and_text_another():
    assert term_hash("n", 5) == term_hash("n", 5.0) == term_hash("n", -0.0 + 5)
    assert term_hash("n", 0) == term_hash("n", -0.0)
    assert term_hash("n", 1e16) == term_hash("n", 10**16)
    assert term_hash("n", 0.5) != term_hash("n", "0.5")
    assert term_hash("n", 5) != term_hash("n", "5")
    assert term_hash("b", True) == term_hash("b", "true")
    assert term_hash("k", "v") != term_hash("k2", "v")
    assert term_hash("n", 2.0**63) != term_hash("n", 2**63 - 1)


def test_the_c_and_python_filters_agree():
    terms = {term_hash("k", i) for i in range(3000)}
    assert make_bloom(terms, bloom_bits(len(terms))) == _make_bloom_python(
        terms, bloom_bits(len(terms))
    )
    bloom = make_bloom(terms, bloom_bits(len(terms)))
    assert all(might_contain(bloom, t) for t in terms)
    misses = sum(might_contain(bloom, term_hash("other", i)) for i in range(10_000))
    assert misses < 300  # about 1% false positives at 10 bits a term


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
            (bloom,) = peek.execute("SELECT bloom FROM chunks_1").fetchone()
        peek.close()
        assert might_contain(bloom, term_hash("order.id", "R-1"))
        assert might_contain(bloom, term_hash("order.id", "R-2"))
        assert await found(reopened, attributes=(("order.id", "R-1"),)) == [tid.hex()]
        assert await found(reopened, attributes=(("order.id", "R-2"),)) == [other.hex()]
    finally:
        await reopened.close()


async def test_a_schema_2_file_gets_filters_rebuilt_from_its_rows(db_path):
    store = SpanStore(db_path, index_delay=3600)
    await store.open()
    tid = trace_id()
    await put(store, "svc", [make_span(tid, span_id(), attributes={"order.id": "O-2"})])
    await store.index_now()
    await store.close()
    # What atoll wrote before the filters: rows of (key, value, chunk), no bloom column.
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TABLE chunks_1")
        conn.execute("CREATE TABLE chunks_1 (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL)")
        conn.execute("INSERT INTO chunks_1 VALUES (1, 1)")
        conn.execute(
            "CREATE TABLE attrs_1 (key TEXT NOT NULL, value NOT NULL, chunk INTEGER NOT NULL,"
            " PRIMARY KEY (key, value, chunk)) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO attrs_1 VALUES ('order.id', 'O-2', 1)")
        conn.execute("PRAGMA user_version=2")
    conn.close()
    reopened = SpanStore(db_path, index_delay=3600)
    await reopened.open()
    try:
        # Before the indexer runs, the search reads the spans; after, it uses the filter.
        assert await found(reopened, attributes=(("order.id", "O-2"),)) == [tid.hex()]
        await reopened.index_now()
        assert await found(reopened, attributes=(("order.id", "O-2"),)) == [tid.hex()]
        assert await found(reopened, attributes=(("order.id", "O-3"),)) == []
    finally:
        await reopened.close()
    with sqlite3.connect(db_path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        (bloom,) = conn.execute("SELECT bloom FROM chunks_1").fetchone()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert "attrs_1" not in tables
    assert version == 3
    assert might_contain(bloom, term_hash("order.id", "O-2"))


async def test_spans_read_back_are_indexed_in_chunks_of_index_chunk(db_path):
    store = SpanStore(db_path, index_chunk=100, index_delay=3600)
    await store.open()
    decoder = OTLPDecoder(store.resources, store.scopes)
    for b in range(5):
        spans = [
            make_span(trace_id(), span_id(), attributes={"order.id": f"O-{b}-{i}"})
            for i in range(100)
        ]
        batch = decoder.convert(make_request("svc", spans))
        batch.terms = None  # as after a restart: the indexer reads the rows
        await store.write(batch)
    await store.index_now()
    try:
        assert len(await found(store, attributes=(("order.id", "O-3-7"),))) == 1
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:
        chunks = conn.execute("SELECT lo, hi FROM chunks_1 ORDER BY lo").fetchall()
    conn.close()
    # One chunk (and one short transaction) per 100 spans, not one for the segment.
    assert chunks == [(1 + 100 * i, 100 * (i + 1)) for i in range(5)]


async def test_arrays_and_maps_are_not_searched_by_their_json_indexed_or_not(db_path):
    # The index holds scalars; the JSON check looks at scalars too, so a search gives the
    # same answer before the spans are indexed and after (a review found it did not).
    store = SpanStore(db_path, index_delay=3600)
    await store.open()
    try:
        await put(
            store,
            "svc",
            [make_span(trace_id(), span_id(), attributes={"k": [1, 2], "m": {"a": 1}, "s": "v"})],
        )
        for _ in range(2):
            assert await found(store, attributes=(("k", "[1,2]"),)) == []
            assert await found(store, attributes=(("m", '{"a":1}'),)) == []
            assert len(await found(store, attributes=(("s", "v"),))) == 1
            await store.index_now()
    finally:
        await store.close()
