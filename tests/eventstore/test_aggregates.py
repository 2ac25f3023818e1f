"""Aggregates and the repository: load, save, concurrency, snapshots, old event versions."""

from __future__ import annotations

import logging

import msgspec
import pytest
from domain import Account, AccountOpened, Deposited, Withdrawn, bank_registry

from atoll.determinism import RandomSource
from atoll.eventstore import (
    Aggregate,
    AggregateNotFoundError,
    ConcurrencyError,
    EventCodec,
    EventData,
    EventStoreError,
    MissingApplierError,
    Repository,
    UnknownEventTypeError,
    applies,
)
from atoll.messages import Event


def repository(store, *, random=None):
    return Repository(
        Account, store, codec=EventCodec(bank_registry()), random=random or RandomSource(1)
    )


async def test_save_and_load(any_store):
    repo = repository(any_store)
    account = repo.create("a1")
    account.open("ann")
    account.deposit(500)
    account.withdraw(200)
    assert account.version == -1
    result = await repo.save(account)
    assert result is not None
    assert (result.first_version, result.last_version) == (0, 2)
    assert account.version == 2
    assert account.pending_events == ()
    assert await repo.save(account) is None
    loaded = await repo.load("a1")
    assert (loaded.owner, loaded.balance_cents, loaded.history, loaded.version) == (
        "ann",
        300,
        [500, -200],
        2,
    )
    stored = await any_store.read_stream("account-a1")
    assert [e.type for e in stored] == ["bank.AccountOpened", "bank.Deposited", "bank.Withdrawn"]
    assert msgspec.json.decode(stored[0].metadata) == {"aggregate": "account"}


async def test_a_concurrent_change_is_refused_and_nothing_is_stored(any_store):
    repo = repository(any_store)
    account = repo.create("a2")
    account.open("bob")
    await repo.save(account)
    first, second = await repo.load("a2"), await repo.load("a2")
    first.deposit(100)
    second.withdraw(0)
    await repo.save(first)
    with pytest.raises(ConcurrencyError, match=r"'account-a2': expected version 0.*version 1"):
        await repo.save(second)
    assert len(await any_store.read_stream("account-a2")) == 2
    again = await repo.load("a2")
    again.withdraw(0)
    await repo.save(again)


async def test_missing_aggregates(any_store):
    repo = repository(any_store)
    with pytest.raises(AggregateNotFoundError, match=r"Account 'nobody' not found"):
        await repo.load("nobody")
    assert await repo.get("nobody") is None


async def test_snapshots_every_n_events_and_loading_from_one(any_store):
    repo = repository(any_store)
    account = repo.create("a3")
    account.open("cy")
    await repo.save(account)  # v0
    assert await any_store.load_snapshot("account-a3") is None
    for cents in (10, 20, 30, 40):
        account.deposit(cents)
        await repo.save(account)  # v1..v4: crossing 3 events (after v2) snapshots
    snapshot = await any_store.load_snapshot("account-a3")
    assert snapshot is not None
    assert snapshot.version == 2
    account.deposit(50)
    account.deposit(60)
    await repo.save(account)  # v5, v6: crosses 6 events (after v5)
    snapshot = await any_store.load_snapshot("account-a3")
    assert snapshot is not None
    assert snapshot.version == 6
    # Drop the events the snapshot covers: only a load that starts from it can work.
    await any_store.truncate_before("account-a3", 7)
    account.deposit(70)
    await repo.save(account)
    loaded = await repo.load("a3")
    assert (loaded.balance_cents, loaded.version) == (280, 7)
    assert loaded.history == [10, 20, 30, 40, 50, 60, 70]


async def test_a_stale_snapshot_schema_is_ignored(any_store, caplog):
    repo = repository(any_store)
    account = repo.create("a4")
    account.open("di")
    account.deposit(1)
    account.deposit(2)
    await repo.save(account)
    assert await any_store.load_snapshot("account-a4") is not None

    class AccountV2(Account):
        category = "account"
        snapshot_version = 2

    loaded = await Repository(AccountV2, any_store, codec=EventCodec(bank_registry())).load("a4")
    assert loaded.balance_cents == 3
    # A snapshot that does not decode is a cache miss, not a failure.
    await any_store.save_snapshot(
        msgspec.structs.replace(
            await any_store.load_snapshot("account-a4"), version=99, data=b"{not json"
        )
    )
    with caplog.at_level(logging.WARNING, logger="atoll.eventstore"):
        loaded = await repo.load("a4")
    assert loaded.balance_cents == 3
    assert "ignoring the snapshot" in caplog.text


async def test_truncated_without_a_snapshot_cannot_be_rebuilt(any_store):
    class Plain(Account):
        category = "plain"
        snapshot_every = None

    repo = Repository(Plain, any_store, codec=EventCodec(bank_registry()))
    account = repo.create("p1")
    account.open("ed")
    account.deposit(5)
    await repo.save(account)
    await any_store.truncate_before("plain-p1", 1)
    with pytest.raises(EventStoreError, match="cannot be rebuilt"):
        await repo.load("p1")
    await any_store.truncate_before("plain-p1", 2)
    with pytest.raises(EventStoreError, match="cannot be rebuilt"):
        await repo.load("p1")


async def test_events_written_by_an_older_schema_are_upcast_on_load(any_store):
    """v1 (whole euros) and v2 (plus currency) events, as an older release wrote them."""
    rng = RandomSource(9)
    await any_store.append(
        "account-old",
        [
            EventData(
                event_id=rng.new_id(),
                type="bank.AccountOpened",
                data=b'{"account_id": "old", "owner": "fay"}',
            ),
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=1,
                data=b'{"account_id": "old", "amount": 3}',
            ),
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=2,
                data=b'{"account_id": "old", "amount": 4, "currency": "EUR"}',
            ),
        ],
    )
    loaded = await repository(any_store).load("old")
    assert loaded.balance_cents == 700
    assert loaded.history == [300, 400]


async def test_an_unknown_event_in_an_aggregate_stream_stops_the_load(any_store):
    rng = RandomSource(10)
    repo = repository(any_store)
    account = repo.create("u1")
    account.open("gus")
    await repo.save(account)
    await any_store.append(
        "account-u1", [EventData(event_id=rng.new_id(), type="bank.Frozen", data=b"{}")]
    )
    with pytest.raises(UnknownEventTypeError, match=r"'account-u1' v1.*'bank.Frozen'"):
        await repo.load("u1")


def test_declaration_errors():
    class Thawed(Event):
        account_id: str

    account = Account("x")
    with pytest.raises(MissingApplierError, match="Thawed"):
        account.record(Thawed(account_id="x"))

    with pytest.raises(TypeError, match="needs a default"):

        class NoDefault(Aggregate):
            balance: int

    with pytest.raises(TypeError, match="Event types"):

        class BadApplier(Aggregate):
            @applies
            def _x(self, event: int) -> None:
                pass

    assert Account.stream_id_for("7") == "account-7"
    assert set(Account.event_types()) == {AccountOpened, Deposited, Withdrawn}


async def test_two_saves_in_one_transaction(any_store):
    repo = repository(any_store)
    account = repo.create("t1")
    async with any_store.transaction() as tx:
        account.open("hal")
        await repo.save(account, tx)
        account.deposit(5)
        await repo.save(account, tx)
        assert account.version == -1  # takes effect at commit
    assert account.version == 1
    assert [e.version for e in await any_store.read_stream("account-t1")] == [0, 1]
