"""The event store conformance kit: every backend's tests subclass it.

::

    class TestSQLiteEventStore(EventStoreConformance):
        @pytest.fixture
        async def store(self, tmp_path):
            async with SQLiteEventStore.from_path(tmp_path / "es.db") as store:
                yield store

A backend may also override ``peers`` to yield other handles on the same storage (as
other processes would have); the concurrency test then spreads its writers over them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from atoll.determinism import RandomSource, SystemClock
from atoll.eventstore import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendResult,
    CheckpointConflictError,
    ConcurrencyError,
    DuplicateEventError,
    EventData,
    EventStore,
    RawEvent,
    Snapshot,
    StreamDeletedError,
    Subscription,
)
from atoll.persistence import TransientDatabaseError

_clock = SystemClock()


class _AbortError(Exception):
    """Raised inside a writer's transaction to roll it back on purpose."""


def _abort() -> None:
    raise _AbortError


def make_event(rng: RandomSource, type_: str = "Thing", data: bytes = b'{"n":1}') -> EventData:
    """An event with a fresh id from ``rng``."""
    return EventData(event_id=rng.new_id(), type=type_, data=data, metadata=b'{"m":1}')


async def settle(store: EventStore, timeout: float = 30.0) -> None:
    """Wait until no committed event is held back behind an open transaction.

    On PostgreSQL an event becomes readable once every older transaction has ended;
    right after a commit, another short transaction may still be running.
    """
    deadline = _clock.monotonic() + timeout
    while await store.has_held_back():
        assert _clock.monotonic() < deadline, "events stayed held back (a long transaction?)"
        await _clock.sleep(0.005)


async def read_everything(store: EventStore, *, page: int = 97) -> list[RawEvent]:
    """The whole readable global log, paged, once committed events are readable."""
    await settle(store)
    out: list[RawEvent] = []
    position = START
    while True:
        batch = await store.read_all(after=position, limit=page)
        out += batch
        if len(batch) < page:
            return out
        position = batch[-1].position


@dataclass
class _Ledger:
    """What the writers of the concurrency test committed (and rolled back)."""

    committed: dict[str, tuple[str, int]] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    conflicts: int = 0
    retries: int = 0


@dataclass
class _Plan:
    """One writer step, decided before any attempt so that retries repeat it exactly."""

    roll: float
    batch: list[EventData]
    stream: str
    shared: str
    pauses: tuple[float, float]
    abort: bool
    touch: str


class EventStoreConformance:
    """The :class:`~atoll.eventstore.EventStore` contract, as tests.

    Subclasses provide the ``store`` fixture: an open, empty store.
    """

    #: The concurrency test's size; a soak subclass can raise them.
    conformance_writers = 12
    conformance_events = 3000
    conformance_readers = 4
    #: How long a reader may take to see every committed event before the test fails.
    conformance_deadline = 60.0

    @pytest.fixture
    async def store(self) -> EventStore:  # pragma: no cover - abstract
        raise NotImplementedError("subclasses provide an open, empty store")

    @pytest.fixture
    def peers(self) -> list[EventStore]:
        """Other handles on the same storage (none by default)."""
        return []

    @pytest.fixture
    def rng(self) -> RandomSource:
        return RandomSource(7)

    # -- streams --------------------------------------------------------------------------

    async def test_append_and_read_forwards_and_backwards(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        events = [make_event(rng, f"T{i}") for i in range(5)]
        result = await store.append("order-1", events, NO_STREAM)
        assert (result.first_version, result.last_version) == (0, 4)
        assert not result.deduplicated
        assert result.first_position < result.last_position
        forwards = await store.read_stream("order-1")
        assert [e.version for e in forwards] == [0, 1, 2, 3, 4]
        assert [e.event_id for e in forwards] == [e.event_id for e in events]
        assert [e.type for e in forwards] == [f"T{i}" for i in range(5)]
        assert forwards[0].data == events[0].data
        assert forwards[0].metadata == events[0].metadata
        assert [e.position for e in forwards] == sorted(e.position for e in forwards)
        backwards = await store.read_stream("order-1", backwards=True)
        assert [e.version for e in backwards] == [4, 3, 2, 1, 0]
        assert [e.version for e in await store.read_stream("order-1", from_version=3)] == [3, 4]
        assert [
            e.version
            for e in await store.read_stream("order-1", from_version=2, backwards=True, limit=2)
        ] == [2, 1]
        assert [e.version for e in await store.read_stream("order-1", limit=2)] == [0, 1]
        assert await store.read_stream("no-such-stream") == []
        assert await store.stream_info("no-such-stream") is None

    async def test_expected_versions(self, store: EventStore, rng: RandomSource) -> None:
        with pytest.raises(ConcurrencyError, match=r"'acct-1'.*expected version 0.*not exist"):
            await store.append("acct-1", [make_event(rng)], 0)
        with pytest.raises(ConcurrencyError, match="expected an existing stream"):
            await store.append("acct-1", [make_event(rng)], STREAM_EXISTS)
        await store.append("acct-1", [make_event(rng)], NO_STREAM)
        with pytest.raises(ConcurrencyError) as info:
            await store.append("acct-1", [make_event(rng)], NO_STREAM)
        assert info.value.stream_id == "acct-1"
        assert info.value.actual == 0
        await store.append("acct-1", [make_event(rng), make_event(rng)], 0)
        with pytest.raises(
            ConcurrencyError, match=r"stream 'acct-1': expected version 1, but it is at version 2"
        ) as info:
            await store.append("acct-1", [make_event(rng)], 1)
        assert (info.value.expected, info.value.actual) == ("version 1", 2)
        await store.append("acct-1", [make_event(rng)], STREAM_EXISTS)
        await store.append("acct-1", [make_event(rng)], ANY)
        assert (await store.stream_info("acct-1")).version == 4  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="expected_version"):
            await store.append("acct-1", [make_event(rng)], -1)
        with pytest.raises(ValueError, match="no events"):
            await store.append("acct-1", [], ANY)
        with pytest.raises(ValueError, match="not a UUID"):
            await store.append("acct-1", [EventData(event_id="nope", type="T", data=b"{}")])

    async def test_a_rejected_append_stores_nothing(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        await store.append("s-1", [make_event(rng)], NO_STREAM)
        await settle(store)
        head = await store.head_position()
        with pytest.raises(ConcurrencyError):
            await store.append("s-1", [make_event(rng), make_event(rng)], 5)
        taken = make_event(rng)
        await store.append("s-2", [taken])
        with pytest.raises(DuplicateEventError, match="'s-1'"):
            # The second event's id belongs to another stream: nothing of it is stored.
            await store.append("s-1", [make_event(rng), taken], 0)
        assert [e.version for e in await store.read_stream("s-1")] == [0]
        assert (await store.stream_info("s-1")).version == 0  # type: ignore[union-attr]
        log = await read_everything(store)
        assert [e.stream_id for e in log if e.position > head] == ["s-2"]

    async def test_appending_the_same_events_twice_stores_them_once(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        events = [make_event(rng), make_event(rng), make_event(rng)]
        first = await store.append("cart-1", events, NO_STREAM)
        again = await store.append("cart-1", events, NO_STREAM)
        assert again.deduplicated
        assert (again.first_version, again.last_version) == (
            first.first_version,
            first.last_version,
        )
        assert (again.first_position, again.last_position) == (
            first.first_position,
            first.last_position,
        )
        # A retry with ANY, or after more events were appended, is still recognised.
        assert (await store.append("cart-1", events, ANY)).deduplicated
        await store.append("cart-1", [make_event(rng)], 2)
        assert (await store.append("cart-1", events, 2)).deduplicated
        assert len(await store.read_stream("cart-1")) == 4
        assert len(await read_everything(store)) == 4
        # Reusing ids for something else is refused.
        with pytest.raises(DuplicateEventError):
            await store.append("cart-1", [events[1], events[0]], ANY)
        with pytest.raises(DuplicateEventError):
            await store.append("cart-1", [events[0], make_event(rng)], ANY)
        with pytest.raises(DuplicateEventError):
            await store.append("other-cart", [events[0]], ANY)
        same = make_event(rng)
        with pytest.raises(DuplicateEventError, match="twice in one append"):
            await store.append("cart-2", [same, same])
        assert len(await read_everything(store)) == 4

    async def test_stream_metadata(self, store: EventStore, rng: RandomSource) -> None:
        await store.set_stream_metadata("meta-1", {"owner": "ops", "max_age": 3600})
        info = await store.stream_info("meta-1")
        assert info is not None
        assert info.metadata == {"owner": "ops", "max_age": 3600}
        assert info.version == -1
        # Metadata alone does not make the stream exist for NO_STREAM.
        await store.append("meta-1", [make_event(rng)], NO_STREAM)
        await store.set_stream_metadata("meta-1", {"owner": "billing"})
        info = await store.stream_info("meta-1")
        assert info is not None
        assert (info.version, info.metadata) == (0, {"owner": "billing"})
        listed = await store.list_streams(prefix="meta-")
        assert [s.stream_id for s in listed] == ["meta-1"]

    async def test_tombstone(self, store: EventStore, rng: RandomSource) -> None:
        await store.append("gone-1", [make_event(rng), make_event(rng)])
        await store.append("kept-1", [make_event(rng)])
        with pytest.raises(ConcurrencyError):
            await store.delete_stream("gone-1", expected_version=0)
        await store.delete_stream("gone-1", expected_version=1)
        with pytest.raises(StreamDeletedError, match=r"'gone-1' was deleted at version 1"):
            await store.append("gone-1", [make_event(rng)])
        with pytest.raises(StreamDeletedError):
            await store.append("gone-1", [make_event(rng)], NO_STREAM)
        with pytest.raises(StreamDeletedError):
            await store.read_stream("gone-1")
        with pytest.raises(StreamDeletedError):
            await store.delete_stream("gone-1")
        info = await store.stream_info("gone-1")
        assert info is not None
        assert info.deleted
        assert [e.stream_id for e in await read_everything(store)] == ["kept-1"]

    async def test_truncate_before(self, store: EventStore, rng: RandomSource) -> None:
        await store.append("t-1", [make_event(rng) for _ in range(5)])
        await store.truncate_before("t-1", 3)
        assert [e.version for e in await store.read_stream("t-1")] == [3, 4]
        assert [e.version for e in await store.read_stream("t-1", backwards=True)] == [4, 3]
        info = await store.stream_info("t-1")
        assert info is not None
        assert (info.version, info.truncated_before) == (4, 3)
        await store.append("t-1", [make_event(rng)], 4)
        assert [e.version for e in await store.read_stream("t-1")] == [3, 4, 5]
        with pytest.raises(ValueError, match="before v9"):
            await store.truncate_before("t-1", 9)

    # -- transactions ---------------------------------------------------------------------

    async def test_appends_commit_and_roll_back_with_their_transaction(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        async def append_then_fail() -> None:
            async with store.transaction() as tx:
                await store.append("tx-1", [make_event(rng)], NO_STREAM, tx=tx)
                await store.append("tx-2", [make_event(rng)], NO_STREAM, tx=tx)
                _abort()

        with pytest.raises(_AbortError):
            await append_then_fail()
        assert await store.read_stream("tx-1") == []
        assert await read_everything(store) == []
        async with store.transaction() as tx:
            await store.append("tx-1", [make_event(rng)], NO_STREAM, tx=tx)
            with pytest.raises(ConcurrencyError):
                await store.append("tx-2", [make_event(rng)], 3, tx=tx)
            await store.append("tx-2", [make_event(rng)], NO_STREAM, tx=tx)
            assert [e.version for e in await store.read_stream("tx-1", tx=tx)] == [0]
        assert [e.stream_id for e in await read_everything(store)] == ["tx-1", "tx-2"]

    async def test_a_late_commit_is_not_skipped(self, store: EventStore, rng: RandomSource) -> None:
        """A transaction that appends first but commits last is still read, once."""
        early, late = make_event(rng), make_event(rng)
        seen: list[str] = []
        position = START

        async def read_new() -> None:
            nonlocal position
            for event in await store.read_all(after=position):
                seen.append(event.event_id)
                position = event.position

        async with store.transaction() as tx:
            await store.append("slow-1", [early], tx=tx)
            other = asyncio.ensure_future(store.append("fast-1", [late]))
            # Where writers are not serialised, the second append commits now; where
            # they are (SQLite), it waits for this transaction.
            await asyncio.wait([other], timeout=0.5)
            await read_new()
            assert early.event_id not in seen
            if other.done():
                # Committed after the open transaction began: it must be held back,
                # or a reader would step past the open transaction's event.
                assert late.event_id not in seen
        await other
        await settle(store)
        await read_new()
        assert sorted(seen) == sorted([early.event_id, late.event_id])
        await read_new()
        assert len(seen) == 2

    async def test_waiters_are_woken_by_commits(self, store: EventStore, rng: RandomSource) -> None:
        with store.waiter() as waiter:
            # Hints may be spurious (a backend may hint when it starts listening).
            await waiter.wait(0.2, _clock)
            waiter.clear()
            await store.append("wake-1", [make_event(rng)])
            assert await waiter.wait(5.0, _clock)

    # -- global log -----------------------------------------------------------------------

    async def test_global_log_pages_in_one_order(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        ids: list[str] = []
        for i in range(30):
            batch = [make_event(rng) for _ in range(1 + i % 3)]
            ids += [e.event_id for e in batch]
            await store.append(f"log-{i % 4}", batch)
        everything = await read_everything(store, page=7)
        assert [e.event_id for e in everything] == ids
        positions = [e.position for e in everything]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        assert await store.head_position() == positions[-1]
        assert [e.event_id for e in await store.read_last(3)] == ids[-3:]
        await settle(store)
        after = await store.read_all(after=positions[9], limit=5)
        assert [e.event_id for e in after] == ids[10:15]
        backlog = await store.backlog(positions[9])
        assert (backlog.events, backlog.held_back, backlog.capped) == (len(ids) - 10, 0, False)
        assert backlog.oldest_recorded_at == everything[10].recorded_at
        capped = await store.backlog(START, cap=5)
        assert (capped.events, capped.capped) == (5, True)
        assert (await store.backlog(positions[-1])).events == 0

    async def test_concurrent_appends_to_one_stream(
        self, store: EventStore, rng: RandomSource
    ) -> None:
        await store.append("hot-1", [make_event(rng)], NO_STREAM)
        attempts = [store.append("hot-1", [make_event(rng)], 0) for _ in range(8)]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        assert sum(1 for r in results if isinstance(r, ConcurrencyError)) == 7
        assert [e.version for e in await store.read_stream("hot-1")] == [0, 1]
        fresh = [store.append("new-1", [make_event(rng)], NO_STREAM) for _ in range(6)]
        results = await asyncio.gather(*fresh, return_exceptions=True)
        assert sum(1 for r in results if isinstance(r, ConcurrencyError)) == 5

    async def test_many_writers_and_tailing_readers_see_every_event_once_in_one_order(
        self, store: EventStore, peers: list[EventStore]
    ) -> None:
        """The global log's guarantee under load.

        Writers append batches to their own and to shared streams, some inside
        transactions held open for a while (so they commit after later appends), some
        rolled back. Readers tail the log with small pages from the start. Every reader
        must see exactly the committed events, each once, in the same order, with each
        stream's versions in order.
        """
        handles = [store, *peers]
        ledger = _Ledger()
        per_writer = self.conformance_events // self.conformance_writers
        writers = [
            self._writer(handles[w % len(handles)], w, per_writer, ledger)
            for w in range(self.conformance_writers)
        ]
        done = asyncio.Event()
        readers = [
            asyncio.ensure_future(self._reader(handles[r % len(handles)], r, done, ledger))
            for r in range(self.conformance_readers)
        ]
        try:
            await asyncio.gather(*writers)
        finally:
            done.set()
        sequences = await asyncio.gather(*readers)
        expected = set(ledger.committed)
        assert len(expected) >= self.conformance_events * 0.8
        final = await read_everything(store, page=250)
        final_ids = [e.event_id for e in final]
        assert set(final_ids) == expected
        assert not expected & ledger.aborted
        for sequence in sequences:
            ids = [e.event_id for e in sequence]
            assert len(ids) == len(set(ids)), "a reader saw an event twice"
            missing = expected - set(ids)
            assert not missing, f"a reader skipped {len(missing)} committed events"
            assert not set(ids) - expected, "a reader saw events that were not committed"
            assert ids == final_ids, "readers disagree on the order of the log"
            positions = [e.position for e in sequence]
            assert positions == sorted(positions)
        last_version: dict[str, int] = {}
        for event in final:
            assert event.version == last_version.get(event.stream_id, -1) + 1, (
                f"{event.stream_id} v{event.version} is out of order in the global log"
            )
            last_version[event.stream_id] = event.version
            assert ledger.committed[event.event_id] == (event.stream_id, event.version)

    async def _writer(self, store: EventStore, w: int, quota: int, ledger: _Ledger) -> None:
        rng = RandomSource(1000 + w)
        versions: dict[str, int] = {}
        written = 0
        while written < quota:
            plan = _Plan(
                roll=rng.random(),
                batch=[make_event(rng, f"W{w}") for _ in range(1 + rng.randrange(4))],
                stream=f"w{w}-{rng.randrange(3)}",
                shared=f"shared-{rng.randrange(3)}",
                pauses=(rng.uniform(0, 0.01), rng.uniform(0, 0.01)),
                abort=rng.random() < 0.15,
                touch=f"w{w}-touch",
            )
            # A transient failure (a busy database, a lost connection) is retried with
            # the same events: if the first attempt did commit, the store recognises
            # their ids and stores nothing twice.
            for attempt in range(30):
                try:
                    outcome = await self._write_once(store, plan, versions)
                    break
                except TransientDatabaseError:
                    ledger.retries += 1
                    await _clock.sleep(0.01 * (attempt + 1))
            else:
                pytest.fail(f"writer {w} gave up after 30 transient errors")
            if outcome == "aborted":
                ledger.aborted.update(e.event_id for e in plan.batch)
                continue
            if outcome == "conflict":
                ledger.conflicts += 1
                continue
            assert not isinstance(outcome, str)
            stream, result = outcome
            versions[stream] = result.last_version
            for offset, event in enumerate(plan.batch):
                ledger.committed[event.event_id] = (stream, result.first_version + offset)
            written += len(plan.batch)
            await _clock.sleep(0)

    async def _write_once(
        self, store: EventStore, plan: _Plan, versions: dict[str, int]
    ) -> tuple[str, AppendResult] | str:
        if plan.roll < 0.6:
            expected = versions.get(plan.stream, NO_STREAM)
            return plan.stream, await store.append(plan.stream, plan.batch, expected)
        if plan.roll < 0.8:
            # Held open, so that later appends by others commit first.
            try:
                async with store.transaction() as tx:
                    await store.set_stream_metadata(plan.touch, {"n": 1}, tx=tx)
                    await _clock.sleep(plan.pauses[0])
                    result = await store.append(plan.stream, plan.batch, ANY, tx=tx)
                    await _clock.sleep(plan.pauses[1])
                    if plan.abort:
                        _abort()
            except _AbortError:
                return "aborted"
            return plan.stream, result
        info = await store.stream_info(plan.shared)
        try:
            result = await store.append(
                plan.shared, plan.batch, NO_STREAM if info is None else info.version
            )
        except ConcurrencyError:
            return "conflict"
        return plan.shared, result

    async def _reader(
        self, store: EventStore, r: int, done: asyncio.Event, ledger: _Ledger
    ) -> list[RawEvent]:
        """Tail the log until every committed event was seen (or a deadline passes)."""
        rng = RandomSource(2000 + r)
        seen: list[RawEvent] = []
        deadline = _clock.monotonic() + self.conformance_deadline
        async with Subscription(store, batch_size=5 + rng.randrange(40), poll_interval=0.05) as sub:
            while not (done.is_set() and sub.live and len(seen) >= len(ledger.committed)):
                if _clock.monotonic() > deadline:
                    missing = len(set(ledger.committed) - {e.event_id for e in seen})
                    pytest.fail(
                        f"reader {r} still misses {missing} committed events after "
                        f"{self.conformance_deadline} s"
                    )
                seen += await sub.next_batch()
        return seen

    # -- snapshots and checkpoints --------------------------------------------------------

    async def test_snapshots_keep_the_latest(self, store: EventStore) -> None:
        assert await store.load_snapshot("agg-1") is None
        snap = Snapshot(
            stream_id="agg-1", version=9, type="agg", schema_version=1, data=b"{}", recorded_at=1.0
        )
        await store.save_snapshot(snap)
        older = Snapshot(
            stream_id="agg-1", version=4, type="agg", schema_version=1, data=b"[]", recorded_at=2.0
        )
        await store.save_snapshot(older)
        assert await store.load_snapshot("agg-1") == snap

    async def test_checkpoints_move_only_from_where_they_were(self, store: EventStore) -> None:
        assert await store.load_checkpoint("proj") is None
        async with store.transaction() as tx:
            await store.save_checkpoint("proj", 5, expected=None, tx=tx)
        with pytest.raises(CheckpointConflictError):
            async with store.transaction() as tx:
                await store.save_checkpoint("proj", 7, expected=None, tx=tx)
        with pytest.raises(CheckpointConflictError):
            async with store.transaction() as tx:
                await store.save_checkpoint("proj", 7, expected=4, tx=tx)
        async with store.transaction() as tx:
            await store.save_checkpoint("proj", 9, expected=5, tx=tx)
        assert await store.load_checkpoint("proj") == 9
        assert [(n, p) for n, p, _ in await store.list_checkpoints()] == [("proj", 9)]
        await store.delete_checkpoint("proj")
        assert await store.load_checkpoint("proj") is None
