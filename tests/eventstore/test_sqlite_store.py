"""The SQLite event store: the conformance kit, plus what only SQLite has."""

from __future__ import annotations

import pytest

from atoll.eventstore import SQLiteEventStore
from atoll.testing import EventStoreConformance


class TestSQLiteEventStore(EventStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path):
        async with SQLiteEventStore.from_path(tmp_path / "events.db") as store:
            yield store

    @pytest.fixture
    async def peers(self, store, tmp_path):
        # A second handle on the same file, as another process would have: its writes
        # contend for SQLite's lock and do not wake this handle's readers.
        async with SQLiteEventStore.from_path(tmp_path / "events.db") as other:
            yield [other]


@pytest.mark.slow
async def test_soak_many_writers_and_readers(tmp_path):
    """The concurrency conformance test, ten times longer, with a second handle."""

    class Soak(EventStoreConformance):
        conformance_writers = 24
        conformance_events = 30_000
        conformance_readers = 6
        conformance_deadline = 300.0

    async with (
        SQLiteEventStore.from_path(tmp_path / "soak.db") as store,
        SQLiteEventStore.from_path(tmp_path / "soak.db") as other,
    ):
        await Soak().test_many_writers_and_tailing_readers_see_every_event_once_in_one_order(
            store, [other]
        )
