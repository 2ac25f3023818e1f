"""Catch-up subscriptions that switch to live, raw and typed."""

from __future__ import annotations

import asyncio

from domain import AccountOpened, bank_registry

from atoll.determinism import RandomSource
from atoll.eventstore import START, EventCodec, EventData, EventLog, Subscription
from atoll.testing._eventstore_kit import settle


def event(rng):
    return EventData(event_id=rng.new_id(), type="T", data=b"{}")


async def test_catch_up_then_live_without_gaps_or_repeats(any_store):
    rng = RandomSource(1)
    for i in range(25):
        await any_store.append(f"sub-{i % 3}", [event(rng)])
    await settle(any_store)
    seen = []
    async with Subscription(any_store, batch_size=10, poll_interval=5.0) as sub:

        async def consume():
            async for raw in sub:
                seen.append(raw.event_id)
                if len(seen) == 40:
                    return

        consumer = asyncio.ensure_future(consume())
        for _ in range(100):
            if sub.live:
                break
            await asyncio.sleep(0.01)
        assert sub.live
        assert len(seen) == 25
        for i in range(15):
            await any_store.append(f"sub-{i % 3}", [event(rng)])
        # Woken by the commits, well before the 5 s poll.
        await asyncio.wait_for(consumer, 4.0)
    await settle(any_store)
    everything = await any_store.read_all(limit=100)
    assert seen == [e.event_id for e in everything]


async def test_subscribing_from_a_position(any_store):
    rng = RandomSource(2)
    for _ in range(6):
        await any_store.append("from-1", [event(rng)])
    await settle(any_store)
    log = await any_store.read_all()
    async with Subscription(any_store, after=log[3].position, poll_interval=0.01) as sub:
        batch = await sub.next_batch()
        assert [e.event_id for e in batch] == [e.event_id for e in log[4:]]
        assert await sub.next_batch() == []
        assert sub.live
        assert sub.position == log[-1].position


async def test_typed_subscription_yields_records(any_store):
    log = EventLog(any_store, EventCodec(bank_registry()), random=RandomSource(3))
    await log.append("account-t", [AccountOpened(account_id="t", owner="x")])
    async with log.subscribe(after=START, poll_interval=0.01) as sub:
        records = sub.records()
        record = await asyncio.wait_for(anext(records), 4.0)
        await records.aclose()
    assert record.event == AccountOpened(account_id="t", owner="x")
    assert record.stream_id == "account-t"
