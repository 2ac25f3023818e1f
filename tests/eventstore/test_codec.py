"""Typed reads: upcasting chains, unknown types kept raw, corrupt payloads refused."""

from __future__ import annotations

import logging

import pytest
from domain import AccountOpened, Deposited, bank_registry

from atoll.determinism import RandomSource
from atoll.eventstore import (
    CorruptEventError,
    EventCodec,
    EventData,
    EventLog,
    UnknownEvent,
    UpcastFailedError,
)
from atoll.messages import MessageRegistry
from atoll.testing._eventstore_kit import settle


def log_for(store):
    return EventLog(store, EventCodec(bank_registry()), random=RandomSource(2))


async def test_typed_append_and_read_with_metadata(any_store):
    log = log_for(any_store)
    opened = AccountOpened(account_id="c1", owner="ann")
    deposited = Deposited(account_id="c1", amount_cents=250, currency="EUR")
    result = await log.append("account-c1", [opened, deposited], metadata={"who": "test"})
    assert result.last_version == 1
    records = await log.read_stream("account-c1")
    assert [r.event for r in records] == [opened, deposited]
    assert records[1].metadata == {"who": "test"}
    assert records[1].type_version == 3
    assert records[0].erased == frozenset()
    await settle(any_store)
    assert [r.event for r in await log.read_all()] == [opened, deposited]


async def test_v1_and_v2_events_are_upcast_to_v3(any_store):
    rng = RandomSource(3)
    await any_store.append(
        "account-c2",
        [
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=1,
                data=b'{"account_id": "c2", "amount": 2}',
            ),
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=2,
                data=b'{"account_id": "c2", "amount": 5, "currency": "USD"}',
            ),
        ],
    )
    records = await log_for(any_store).read_stream("account-c2")
    assert [r.event for r in records] == [
        Deposited(account_id="c2", amount_cents=200, currency="EUR"),
        Deposited(account_id="c2", amount_cents=500, currency="USD"),
    ]
    assert [r.type_version for r in records] == [1, 2]


async def test_upcasting_failures_name_the_event(any_store):
    rng = RandomSource(4)
    await any_store.append(
        "account-c3",
        [
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=4,
                data=b'{"account_id": "c3"}',
            )
        ],
    )
    with pytest.raises(UpcastFailedError, match=r"'account-c3' v0.*newer than this code's v3"):
        await log_for(any_store).read_stream("account-c3")
    # A registry without the v1 -> v2 link refuses rather than guessing.
    partial = MessageRegistry([Deposited])
    partial.add_upcaster("bank.Deposited", 2, lambda d: d)
    await any_store.append(
        "account-c4",
        [
            EventData(
                event_id=rng.new_id(),
                type="bank.Deposited",
                type_version=1,
                data=b'{"account_id": "c4", "amount": 1}',
            )
        ],
    )
    with pytest.raises(UpcastFailedError, match=r"'account-c4' v0.*no upcaster.*from v1 to v2"):
        await EventLog(any_store, EventCodec(partial)).read_stream("account-c4")


async def test_unknown_types_are_kept_with_a_warning(any_store, caplog):
    rng = RandomSource(5)
    await any_store.append(
        "misc-1",
        [
            EventData(event_id=rng.new_id(), type="future.Thing", data=b'{"x": [1, 2]}'),
            EventData(
                event_id=rng.new_id(),
                type="bank.AccountOpened",
                data=b'{"account_id": "m", "owner": "o"}',
            ),
        ],
    )
    await settle(any_store)
    with caplog.at_level(logging.WARNING, logger="atoll.eventstore"):
        records = await log_for(any_store).read_all()
    assert len(records) == 2
    assert records[0].event == UnknownEvent(type="future.Thing", version=1, data={"x": [1, 2]})
    assert records[0].stream_id == "misc-1"
    assert isinstance(records[1].event, AccountOpened)
    assert "unknown event type 'future.Thing'" in caplog.text


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"\x00\xffnot json", "JSON is malformed"),
        (b'{"account_id": "k"}', "missing required field `owner`"),
        (b'{"account_id": 5, "owner": "o"}', "Expected `str`"),
    ],
)
async def test_a_corrupt_payload_names_stream_version_and_position(any_store, data, detail):
    rng = RandomSource(6)
    await any_store.append(
        "account-k",
        [
            EventData(
                event_id=rng.new_id(),
                type="bank.AccountOpened",
                data=b'{"account_id": "k", "owner": "o"}',
            ),
            EventData(event_id=rng.new_id(), type="bank.AccountOpened", data=data),
        ],
    )
    with pytest.raises(CorruptEventError, match=r"'account-k' v1 \(position \d+\)") as failure:
        await log_for(any_store).read_stream("account-k")
    assert detail in str(failure.value)
    assert (failure.value.stream_id, failure.value.version) == ("account-k", 1)
