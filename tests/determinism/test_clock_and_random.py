import asyncio
import uuid

import pytest

from atoll.determinism import RandomSource, SystemClock, VirtualClock


async def test_virtual_clock_wakes_sleepers_in_deadline_order():
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name, seconds):
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("b", 2.0), ("a", 1.0), ("c", 5.0)]]
    await asyncio.sleep(0)
    assert clock.pending_sleepers == 3
    await clock.advance(2.5)
    assert woke == [("a", 1.0), ("b", 2.0)]
    await clock.advance(10)
    assert woke[-1] == ("c", 5.0)
    assert clock.monotonic() == 12.5
    await asyncio.gather(*tasks)


async def test_virtual_clock_auto_advance_turns_off_waiting():
    clock = VirtualClock(auto_advance=True)
    start = SystemClock().monotonic()
    await clock.sleep(3600)
    assert clock.monotonic() == 3600
    assert SystemClock().monotonic() - start < 1


async def test_virtual_clock_refuses_to_go_back():
    with pytest.raises(ValueError):
        await VirtualClock().advance(-1)


def test_seeded_sources_repeat_and_ids_sort_by_creation():
    clock = VirtualClock()
    a, b = RandomSource(seed=42, clock=clock), RandomSource(seed=42, clock=clock)
    assert [a.random() for _ in range(5)] == [b.random() for _ in range(5)]
    assert [a.new_id() for _ in range(5)] == [b.new_id() for _ in range(5)]
    ids = [a.new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5000
    assert a.uuid7().version == 7
    # new_id() is the same UUIDv7, as 32 hex digits: same version and variant bits.
    parsed = uuid.UUID(hex=a.new_id())
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
