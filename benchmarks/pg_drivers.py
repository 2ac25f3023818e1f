"""asyncpg against psycopg 3 for atoll's PostgreSQL unit of work.

    .venv/bin/python benchmarks/pg_drivers.py [--quick]

The unit of work's hot path is: take a pooled connection, BEGIN, one UPDATE or INSERT
of the service's own, one INSERT into the inbox, one multi-row INSERT into the outbox,
COMMIT. This runs that shape with 1 and 8 concurrent units of work on each driver.

asyncpg runs as atoll configures it: pooled connections go back without asyncpg's reset
query (``keep_session``; psycopg's pool has no reset query by default either). The
``keep-session-vs-reset-*`` cases (reported) measure what that saves against asyncpg's
default, a reset round trip per unit of work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import asyncpg
import psycopg_pool

from atoll.persistence.postgres._database import keep_session

DSN = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = "bench_pg_drivers"
SETUP = [
    f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE",
    f"CREATE SCHEMA {SCHEMA}",
    f"CREATE TABLE {SCHEMA}.state (id BIGINT PRIMARY KEY, v TEXT)",
    (
        f"CREATE TABLE {SCHEMA}.inbox"
        " (consumer TEXT, message_id TEXT, PRIMARY KEY (consumer, message_id))"
    ),
    f"CREATE TABLE {SCHEMA}.outbox (seq BIGSERIAL PRIMARY KEY, message_id TEXT, body BYTEA)",
]


async def asyncpg_run(n: int, concurrency: int, sync: str, *, keep: bool = True) -> float:
    pool = await asyncpg.create_pool(
        DSN,
        min_size=concurrency,
        max_size=concurrency,
        server_settings={"synchronous_commit": sync},
        reset=keep_session if keep else None,
    )
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {SCHEMA}.state (id, v) VALUES ($1, $2)", i, "x")
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.inbox VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    "c",
                    str(i),
                )
                await conn.executemany(
                    f"INSERT INTO {SCHEMA}.outbox (message_id, body) VALUES ($1, $2)",
                    [(f"m{i}", b"x" * 300)],
                )

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await pool.close()
    return n / elapsed


async def psycopg_run(n: int, concurrency: int, sync: str) -> float:
    pool = psycopg_pool.AsyncConnectionPool(
        f"{DSN}?options=-csynchronous_commit%3D{sync}",
        min_size=concurrency,
        max_size=concurrency,
        open=False,
    )
    await pool.open()
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {SCHEMA}.state (id, v) VALUES (%s, %s)", (i, "x"))
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.inbox VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    ("c", str(i)),
                )
                async with conn.cursor() as cur:
                    await cur.executemany(
                        f"INSERT INTO {SCHEMA}.outbox (message_id, body) VALUES (%s, %s)",
                        [(f"m{i}", b"x" * 300)],
                    )

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await pool.close()
    return n / elapsed


async def reset() -> None:
    conn = await asyncpg.connect(DSN)
    for statement in SETUP:
        await conn.execute(statement)
    await conn.close()


async def main(quick: bool) -> None:
    n = 2_000 if quick else 10_000
    cases = {}
    for sync, concurrency in (("on", 1), ("on", 8), ("off", 1), ("off", 8)):
        await reset()
        a = await asyncpg_run(n, concurrency, sync)
        await reset()
        p = await psycopg_run(n, concurrency, sync)
        await reset()
        r = await asyncpg_run(n, concurrency, sync, keep=False)
        print(
            f"synchronous_commit={sync}, {concurrency} concurrent:"
            f" asyncpg {a:,.0f} uow/s (with asyncpg's reset: {r:,.0f}), psycopg {p:,.0f} uow/s"
        )
        cases[f"keep-session-vs-reset-{concurrency}-sync-{sync}"] = {
            "atoll": round(a, 1),
            "peer": round(r, 1),
            "unit": "units of work/s, asyncpg without and with its reset query (reported)",
            "ratio": round(a / r, 3),
        }
        cases[f"asyncpg-vs-psycopg-{concurrency}-sync-{sync}"] = {
            "atoll": round(a, 1),
            "peer": round(p, 1),
            "unit": "units of work/s",
            "ratio": round(a / p, 3),
        }
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await conn.close()
    print(json.dumps({"benchmark": "pg_drivers", "cases": cases}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
