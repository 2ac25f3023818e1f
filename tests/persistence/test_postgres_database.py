import os

import asyncpg
import pytest

from atoll.determinism import RandomSource
from atoll.persistence import database_from_url
from atoll.persistence.postgres import PostgresDatabase, translate_placeholders
from atoll.testing import DatabaseConformance

pytestmark = pytest.mark.postgres
DSN = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_random = RandomSource()


def unique_schema() -> str:
    return f"atoll_test_{_random.new_id()[-12:]}"


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


class TestPostgresDatabase(DatabaseConformance):
    async def make_database(self, tmp_path, clock):
        return PostgresDatabase(DSN, schema=unique_schema(), clock=clock)

    async def destroy_database(self, database):
        await drop_schema(database.schema)


def test_placeholders_are_translated_outside_quotes_and_comments():
    sql = "SELECT '?', \"a?b\", x FROM t WHERE a = ? AND b = ? -- what?\n AND c = ?"
    assert translate_placeholders(sql) == (
        "SELECT '?', \"a?b\", x FROM t WHERE a = $1 AND b = $2 -- what?\n AND c = $3"
    )
    assert translate_placeholders("SELECT 'it''s ?' , ?") == "SELECT 'it''s ?' , $1"


def test_the_url_chooses_schema_pool_and_tls_and_hides_the_password():
    db = database_from_url(
        "postgresql://app:s3cret@db.example:5433/shop?schema=orders&pool_max=4&sslmode=require",
        base_dir=None,  # type: ignore[arg-type]
    )
    assert isinstance(db, PostgresDatabase)
    assert db.schema == "orders"
    assert "s3cret" not in repr(db)
    assert "s3cret" not in db.what
    with pytest.raises(Exception, match="unknown option"):
        database_from_url("postgresql://h/db?bogus=1", base_dir=None)  # type: ignore[arg-type]


async def test_an_unreachable_server_is_a_clear_error_without_the_password():
    db = PostgresDatabase("postgresql://app:s3cret@127.0.0.1:1/nowhere", connect_timeout=2)
    with pytest.raises(Exception) as caught:
        await db.open()
    assert "s3cret" not in str(caught.value)
    assert "127.0.0.1:1" in str(caught.value)


@pytest.mark.parametrize("reset_sessions", [False, True])
async def test_units_of_work_leave_connections_without_a_reset_unless_asked(reset_sessions):
    # One connection, so both units of work get the same session.
    db = PostgresDatabase(
        DSN, schema=unique_schema(), min_size=1, max_size=1, reset_sessions=reset_sessions
    )
    await db.open()
    try:
        async with db.unit_of_work() as uow:
            await uow.execute("SET application_name = 'left-behind'")
        async with db.unit_of_work() as uow:
            name = await uow.fetch_value("SELECT current_setting('application_name')")
        # No reset (the default): what a unit of work sets for the session stays, which is
        # why handlers use SET LOCAL. With reset_sessions, asyncpg's RESET ALL clears it.
        assert (name == "left-behind") is not reset_sessions
        async with db.unit_of_work() as uow:
            await uow.execute("SET LOCAL application_name = 'this-transaction-only'")
        async with db.unit_of_work() as uow:
            assert await uow.fetch_value("SELECT current_setting('application_name')") != (
                "this-transaction-only"
            )
    finally:
        await db.close()
        await drop_schema(db.schema)


def test_reset_sessions_is_a_url_option():
    url = "postgresql://h/db?reset_sessions=true"
    db = database_from_url(url, base_dir=None)  # type: ignore[arg-type]
    assert isinstance(db, PostgresDatabase)
    assert db.reset_sessions
    with pytest.raises(Exception, match="reset_sessions='maybe' is invalid"):
        database_from_url("postgresql://h/db?reset_sessions=maybe", base_dir=None)  # type: ignore[arg-type]
