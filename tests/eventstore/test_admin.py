"""The functions behind `atoll events ...` and `atoll projections ...`."""

from __future__ import annotations

import asyncio

import pytest
from domain import Account, Balances, bank_registry

from atoll._urls import URLError
from atoll.determinism import RandomSource
from atoll.eventstore import EventCodec, EventData, PostgresEventStore, Repository
from atoll.eventstore._admin import (
    list_streams,
    projections_status,
    rebuild_projection,
    show_stream,
    store_from_url,
    tail,
)
from atoll.eventstore._sqlite import SQLiteEventStore
from atoll.testing._eventstore_kit import settle


async def fill(store):
    repo = Repository(Account, store, codec=EventCodec(bank_registry()), random=RandomSource(1))
    for name in ("a", "b"):
        account = repo.create(name)
        account.open(name.upper())
        account.deposit(100)
        await repo.save(account)


async def test_streams_show_and_tail(any_store):
    await fill(any_store)
    streams = await list_streams(any_store)
    assert [(s["stream"], s["version"], s["events"]) for s in streams] == [
        ("account-a", 1, 2),
        ("account-b", 1, 2),
    ]
    assert [s["stream"] for s in await list_streams(any_store, prefix="account-b")] == ["account-b"]
    raw = await show_stream(any_store, "account-a")
    assert raw[1]["data"] == {"account_id": "a", "amount_cents": 100, "currency": "EUR"}
    assert raw[1]["type"] == "bank.Deposited"
    await any_store.append(
        "account-a",
        [EventData(event_id=RandomSource(2).new_id(), type="bank.Deposited", data=b"!")],
    )
    decoded = await show_stream(any_store, "account-a", codec=EventCodec(bank_registry()))
    assert decoded[0]["data"] == {"account_id": "a", "owner": "A"}
    assert "error" in decoded[2]
    assert "'account-a' v2" in decoded[2]["error"]
    await settle(any_store)
    last = [row async for row in tail(any_store, last=2)]
    assert [(r["stream"], r["version"]) for r in last] == [("account-b", 1), ("account-a", 2)]

    rows = []

    async def follow():
        async for row in tail(any_store, last=0, follow=True, poll_interval=5.0):
            rows.append(row)
            return

    follower = asyncio.ensure_future(follow())
    await asyncio.sleep(0.1)
    assert rows == []
    await any_store.append(
        "account-c", [EventData(event_id=RandomSource(3).new_id(), type="x", data=b"{}")]
    )
    await asyncio.wait_for(follower, 10.0)
    assert [r["stream"] for r in rows] == ["account-c"]


async def test_projection_status_and_rebuild(any_store):
    await fill(any_store)
    await settle(any_store)
    assert await projections_status(any_store) == []
    assert await rebuild_projection(any_store, Balances(), codec=EventCodec(bank_registry())) == 4
    await fill_more(any_store)
    await settle(any_store)
    (status,) = await projections_status(any_store)
    assert (status["projection"], status["events_behind"], status["held_back"]) == (
        "balances",
        2,
        0,
    )
    assert status["seconds_behind"] >= 0
    assert status["stalled"] is False
    assert await rebuild_projection(any_store, Balances(), codec=EventCodec(bank_registry())) == 6
    (status,) = await projections_status(any_store)
    assert status["events_behind"] == 0


async def fill_more(store):
    repo = Repository(Account, store, codec=EventCodec(bank_registry()), random=RandomSource(9))
    account = repo.create("c")
    account.open("C")
    account.deposit(5)
    await repo.save(account)


def test_store_from_url(tmp_path):
    store = store_from_url("sqlite:///orders.db?prefix=es_", base_dir=tmp_path)
    assert isinstance(store, SQLiteEventStore)
    assert store.database.path == tmp_path / "orders.db"
    assert store.prefix == "es_"
    pg = store_from_url("postgresql://u:secret@db/orders?schema=orders")
    assert isinstance(pg, PostgresEventStore)
    assert pg.schema == "orders"
    assert "secret" not in pg.what
    with pytest.raises(URLError, match="unknown option"):
        store_from_url("sqlite:///x.db?bogus=1", base_dir=tmp_path)
    with pytest.raises(URLError, match="no event store backend"):
        store_from_url("mysql://db/x")
