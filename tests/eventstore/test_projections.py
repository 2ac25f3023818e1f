"""Projections: exactly-once read models, rebuilds, replicas, and lag you can see."""

from __future__ import annotations

import asyncio

import pytest
from domain import Account, Balances, bank_registry
from prometheus_client import CollectorRegistry, generate_latest

from atoll.determinism import RandomSource, VirtualClock
from atoll.eventstore import (
    EventCodec,
    ProjectionFailedError,
    ProjectionRunner,
    Repository,
    SQLiteEventStore,
    projections_readiness,
)
from atoll.testing._eventstore_kit import settle


async def open_accounts(store, count, *, deposits=2, prefix="p"):
    repo = Repository(Account, store, codec=EventCodec(bank_registry()), random=RandomSource(5))
    for i in range(count):
        account = repo.create(f"{prefix}{i}")
        account.open(f"owner {i}")
        for d in range(deposits):
            account.deposit(100 * (d + 1))
        await repo.save(account)


async def balances(store):
    async with store.read_session() as session:
        rows = await session.fetch_all(
            "SELECT account_id, owner, cents, events FROM balances ORDER BY account_id"
        )
    return [tuple(row) for row in rows]


def runner_for(store, projection=None, **kwargs):
    return ProjectionRunner(
        projection or Balances(), store, codec=EventCodec(bank_registry()), **kwargs
    )


async def test_catch_up_applies_each_event_once_with_its_checkpoint(any_store):
    await open_accounts(any_store, 5)
    await settle(any_store)
    runner = runner_for(any_store, batch_size=4)
    assert await runner.run_until_caught_up() == 15
    assert await balances(any_store) == [(f"p{i}", f"owner {i}", 300, 3) for i in range(5)]
    head = await any_store.head_position()
    assert await any_store.load_checkpoint("balances") == head
    assert await runner.run_until_caught_up() == 0
    # A new runner (a restart) resumes from the checkpoint.
    await open_accounts(any_store, 1, prefix="q")
    await settle(any_store)
    assert await runner_for(any_store).run_until_caught_up() == 3
    assert len(await balances(any_store)) == 6


async def test_a_failing_handler_stops_at_that_event_and_skips_nothing(any_store):
    await open_accounts(any_store, 3)
    await settle(any_store)
    projection = Balances()
    projection.fail_on = {"p1"}
    runner = runner_for(any_store, projection)
    with pytest.raises(ProjectionFailedError, match=r"'balances' failed on 'account-p1' v1") as exc:
        await runner.run_until_caught_up()
    assert exc.value.stream_id == "account-p1"
    # Everything before the failing event is applied and checkpointed; nothing after.
    assert await balances(any_store) == [("p0", "owner 0", 300, 3), ("p1", "owner 1", 0, 1)]
    projection.fail_on = set()
    assert await runner.run_until_caught_up() == 5
    assert await balances(any_store) == [(f"p{i}", f"owner {i}", 300, 3) for i in range(3)]


async def test_two_replicas_apply_each_event_exactly_once(any_store):
    await open_accounts(any_store, 20, deposits=4)
    await settle(any_store)
    first, second = runner_for(any_store, batch_size=7), runner_for(any_store, batch_size=5)
    await asyncio.gather(first.run_until_caught_up(), second.run_until_caught_up())
    rows = await balances(any_store)
    assert len(rows) == 20
    assert all(row[2:] == (1000, 5) for row in rows)
    assert first.handled + second.handled == 100


async def test_rebuild_replays_from_zero(any_store):
    await open_accounts(any_store, 4)
    await settle(any_store)
    runner = runner_for(any_store)
    await runner.run_until_caught_up()
    async with any_store.transaction() as tx:
        await tx.execute("UPDATE balances SET cents = -1")  # a bug corrupted the read model
    assert await runner.rebuild() == 12
    assert await balances(any_store) == [(f"p{i}", f"owner {i}", 300, 3) for i in range(4)]


async def test_live_runner_follows_new_events(any_store):
    runner = runner_for(any_store, poll_interval=5.0)
    await runner.start()
    try:
        await open_accounts(any_store, 3)
        await settle(any_store)
        # Woken by the commit (or polled while held back), not by the 5 s poll.
        await runner.wait_until(await any_store.head_position(), timeout=4.0)
        assert len(await balances(any_store)) == 3
        status = await runner.status()
        assert (status.state, status.events_behind, status.stalled) == ("live", 0, False)
    finally:
        await runner.stop()
    assert runner.state == "stopped"


async def test_lag_is_reported_as_data_and_metrics(tmp_path):
    clock = VirtualClock(start=1_800_000_000.0)
    registry = CollectorRegistry()
    async with SQLiteEventStore.from_path(tmp_path / "lag.db", clock=clock) as store:
        await open_accounts(store, 2)
        runner = runner_for(store, registry=registry, stall_after=30.0)
        await clock.advance(42.0)
        status = await runner.lag()
        assert (status.events_behind, status.held_back, status.position) == (6, 0, 0)
        assert status.seconds_behind == pytest.approx(42.0)
        assert status.stalled  # behind, and no progress for 42 s > 30 s
        readiness = await projections_readiness([runner])
        assert readiness["ready"] is False
        assert readiness["projections"][0]["events_behind"] == 6
        text = generate_latest(registry).decode()
        assert 'atoll_projection_events_behind{projection="balances"} 6.0' in text
        assert 'atoll_projection_seconds_behind{projection="balances"} 42.0' in text
        assert 'atoll_projection_stalled{projection="balances"} 1.0' in text
        await runner.run_until_caught_up()
        status = await runner.status()
        assert (status.events_behind, status.seconds_behind, status.stalled) == (0, 0.0, False)
        assert (await projections_readiness([runner]))["ready"] is True
        assert 'atoll_projection_events_total{projection="balances"} 6.0' in (
            generate_latest(registry).decode()
        )


async def test_a_stalled_projection_is_visible_not_silent(any_store):
    registry = CollectorRegistry()
    await open_accounts(any_store, 2)
    await settle(any_store)
    projection = Balances()
    projection.fail_on = {"p0"}
    runner = runner_for(any_store, projection, registry=registry, max_backoff=0.05)
    await runner.start()
    try:
        for _ in range(400):
            if runner.failures >= 2:
                break
            await asyncio.sleep(0.01)
        status = await runner.status()
        assert status.state == "failing"
        assert status.stalled
        assert "refusing p0" in (status.last_error or "")
        assert status.events_behind == 5
        assert 'atoll_projection_stalled{projection="balances"} 1.0' in (
            generate_latest(registry).decode()
        )
        projection.fail_on = set()
        await runner.wait_until(await any_store.head_position(), timeout=5.0)
        status = await runner.status()
        assert (status.state, status.stalled, status.last_error) == ("live", False, None)
    finally:
        await runner.stop()
