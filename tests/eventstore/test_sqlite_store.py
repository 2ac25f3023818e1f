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
