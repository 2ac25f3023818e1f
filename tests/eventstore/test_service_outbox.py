"""An event-sourced service: events and outbox messages commit together, exactly once."""

from __future__ import annotations

import asyncio

import pytest
from domain import Account, AccountOpened, Deposited, bank_registry

from atoll import Command, Context, Service, ServiceRuntime
from atoll.determinism import RandomSource, SystemClock
from atoll.eventstore import EventCodec, Repository, SQLiteEventStore
from atoll.messages import decode_envelope
from atoll.persistence import SQLiteDatabase
from atoll.transport import event_topic
from atoll.transport.memory import InMemoryTransport


class _BoomError(Exception):
    pass


class OpenAccount(Command):
    message_type = "bank.OpenAccount"
    account_id: str
    owner: str


class Deposit(Command):
    message_type = "bank.Deposit"
    account_id: str
    cents: int


@pytest.fixture
async def bank(tmp_path):
    db = SQLiteDatabase(tmp_path / "bank.db")
    store = SQLiteEventStore(db)
    await store.open()
    repo = Repository(Account, store, codec=EventCodec(bank_registry()), random=RandomSource(3))
    yield Service("bank"), db, store, repo
    await db.close()


def context(service, uow):
    return Context(
        service, uow, clock=SystemClock(), random=RandomSource(4), correlation_id="corr-1"
    )


async def test_save_publishes_each_new_event_in_the_same_unit_of_work(bank):
    service, db, store, repo = bank
    account = repo.create("s1")
    account.open("ann")
    account.deposit(500)
    async with db.unit_of_work() as uow:
        await repo.save(account, context(service, uow))
    events = await store.read_stream("account-s1")
    outbox = await db.outbox_fetch(100)
    assert [r.message_id for r in outbox] == [e.event_id for e in events]
    assert [r.topic for r in outbox] == [
        event_topic("bank.AccountOpened"),
        event_topic("bank.Deposited"),
    ]
    assert {r.key for r in outbox} == {"account-s1"}
    envelope = decode_envelope(outbox[1].body)
    assert (envelope.id, envelope.type, envelope.version) == (
        events[1].event_id,
        "bank.Deposited",
        3,
    )
    assert envelope.correlation_id == "corr-1"
    registry = bank_registry()
    assert registry.decode(envelope) == Deposited(account_id="s1", amount_cents=500, currency="EUR")
    metadata = (await EventCodec(registry).decode(events))[1].metadata
    assert metadata == {"aggregate": "account", "correlation_id": "corr-1"}


async def test_a_rolled_back_unit_of_work_keeps_neither_and_a_retry_stores_once(bank):
    service, db, store, repo = bank
    account = repo.create("s2")
    account.open("bob")

    async def save_then_fail() -> None:
        async with db.unit_of_work() as uow:
            await repo.save(account, context(service, uow))
            raise _BoomError

    with pytest.raises(_BoomError):
        await save_then_fail()
    assert await store.read_stream("account-s2") == []
    assert await db.outbox_fetch(100) == []
    assert len(account.pending_events) == 1
    async with db.unit_of_work() as uow:
        await repo.save(account, context(service, uow))
    assert len(await store.read_stream("account-s2")) == 1
    assert len(await db.outbox_fetch(100)) == 1
    assert account.pending_events == ()


async def test_a_retry_after_an_unknown_commit_outcome_publishes_nothing_twice(bank):
    service, db, store, repo = bank
    account = repo.create("s3")
    account.open("cy")
    await repo.save(account)
    account.deposit(100)
    account.deposit(200)
    # The commit succeeds but the caller never learns of it (say, the ack was lost):
    version, pending = account.version, list(account._pending)
    async with db.unit_of_work() as uow:
        await repo.save(account, context(service, uow))
    account.version, account._pending = version, pending
    # ...so it saves the same aggregate again: the store recognises the events by id.
    async with db.unit_of_work() as uow:
        result = await repo.save(account, context(service, uow))
    assert result is not None
    assert result.deduplicated
    assert [e.version for e in await store.read_stream("account-s3")] == [0, 1, 2]
    assert len(await db.outbox_fetch(100)) == 2
    assert account.version == 2


async def test_an_event_sourced_service_publishes_each_event_exactly_once(tmp_path):
    """Two services on one transport: bank (event-sourced) and audit (a subscriber)."""
    transport = InMemoryTransport()
    bank, audit = Service("bank"), Service("audit")
    audit.migration("seen", ["CREATE TABLE seen (message_id TEXT PRIMARY KEY, type TEXT NOT NULL)"])
    stores: dict[str, Repository[Account]] = {}

    @bank.on_start
    async def open_event_store(runtime: ServiceRuntime) -> None:
        assert isinstance(runtime.database, SQLiteDatabase)
        store = SQLiteEventStore(runtime.database)
        await store.open()
        stores["bank"] = Repository(Account, store, codec=EventCodec(bank_registry()))

    @bank.handles(OpenAccount)
    async def open_account(command: OpenAccount, ctx: Context) -> None:
        account = stores["bank"].create(command.account_id)
        account.open(command.owner)
        await stores["bank"].save(account, ctx)

    @bank.handles(Deposit)
    async def deposit(command: Deposit, ctx: Context) -> None:
        account = await stores["bank"].load(command.account_id, tx=ctx)
        account.deposit(command.cents)
        await stores["bank"].save(account, ctx)

    async def record(event: AccountOpened | Deposited, ctx: Context) -> None:
        assert ctx.envelope is not None
        await ctx.execute(
            "INSERT INTO seen (message_id, type) VALUES (?, ?)", ctx.envelope.id, event.message_type
        )

    audit.subscribes(AccountOpened)(record)
    audit.subscribes(Deposited)(record)
    runtimes = [
        ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=transport,
            owns_transport=False,
            relay_poll_interval=0.05,
        )
        for service in (bank, audit)
    ]
    for runtime in runtimes:
        await runtime.start()
    try:
        async with runtimes[0].unit_of_work() as ctx:
            for i in range(5):
                ctx.send(OpenAccount(account_id=f"e{i}", owner=f"o{i}"), to="bank")
        for _ in range(3):
            async with runtimes[0].unit_of_work() as ctx:
                for i in range(5):
                    ctx.send(Deposit(account_id=f"e{i}", cents=10), to="bank")
            await asyncio.sleep(0.05)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            async with runtimes[1].database.read() as session:
                seen = await session.fetch_all("SELECT message_id, type FROM seen")
            if len(seen) >= 20 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        for runtime in reversed(runtimes):
            await runtime.stop()
        await transport.close()
    store = stores["bank"].store
    await store.open()
    events = []
    for i in range(5):
        events += await store.read_stream(f"account-e{i}")
    await runtimes[0].database.close()
    assert sorted(row[0] for row in seen) == sorted(e.event_id for e in events)
    assert len(events) == 20
    assert [row[1] for row in seen].count("bank.Deposited") == 15
