"""Fixtures for the event store tests: stores on SQLite and on a fresh PostgreSQL schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from atoll.eventstore import EventStore, PostgresEventStore, SQLiteEventStore

PG_URL = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A schema of its own for one test, dropped afterwards."""
    schema = f"atoll_es_test_{uuid.uuid4().hex[:12]}"
    yield schema
    await drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[EventStore]:
    """An open, empty store on each backend."""
    if request.param == "sqlite":
        async with SQLiteEventStore.from_path(tmp_path / "events.db") as store:
            yield store
        return
    schema = f"atoll_es_test_{uuid.uuid4().hex[:12]}"
    try:
        async with PostgresEventStore(PG_URL, schema=schema, max_connections=8) as store:
            yield store
    finally:
        await drop_schema(schema)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests (``slow``) run only when asked for: ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="soak test: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") and here in Path(str(item.path)).parents:
            item.add_marker(skip)
