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
