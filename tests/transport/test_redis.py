"""The Redis Streams transport against the conformance kits (needs Redis on 127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import msgspec
import pytest
import redis
from redis_support import REDIS_URL, delete_namespace, namespace_for, url_for

from atoll import Context, Event, Service, ServiceRuntime
from atoll.persistence import SQLiteDatabase
from atoll.testing import (
    BrokerOutageConformance,
    ExactlyOnceCrashConformance,
    Recorder,
    TransportConformance,
    wait_until,
)
from atoll.testing._transport_kit import message, number
from atoll.transport import (
    Ack,
    DeadLetter,
    OutgoingMessage,
    Retry,
    command_topic,
    event_topic,
)
from atoll.transport.redis import RedisTransport

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def _clean_namespace(tmp_path):
    yield
    delete_namespace(namespace_for(tmp_path))


class TestRedisTransport(TransportConformance):
    async def make_transport(self, tmp_path):
        # Trimming runs all the time here: if it ever dropped an entry some group still
        # needs, a delivery would go missing and the kit would time out.
        return RedisTransport.from_url(
            url_for(namespace_for(tmp_path), lease=1, trim_interval=0.02)
        )


class TestRedisCrashes(ExactlyOnceCrashConformance):
    def transport_url(self, tmp_path):
        return url_for(namespace_for(tmp_path), REDIS_URL, lease=1, trim_interval=0.05)


class TestRedisOutage(BrokerOutageConformance):
    def server_address(self):
        parts = urlsplit(REDIS_URL)
        return parts.hostname or "127.0.0.1", parts.port or 6379

    def make_transport(self, host, port, tmp_path):
        base = f"redis://{host}:{port}/{urlsplit(REDIS_URL).path.strip('/') or 0}"
        return RedisTransport.from_url(url_for(namespace_for(tmp_path), base, lease=1))


# -- behaviour of this transport beyond the kits ----------------------------------------


@pytest.fixture
async def transport(tmp_path):
    """A transport that trims only when told to (so tests see exact stream lengths)."""
    t = RedisTransport.from_url(url_for(namespace_for(tmp_path), lease=1, trim_interval=3600))
    await t.connect()
    yield t
    await t.close()


@pytest.fixture
def raw(tmp_path):
    """A plain client on the test's Redis, and the test's namespace."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client, namespace_for(tmp_path)
    client.close()


def group_state(client, stream, group):
    [info] = [g for g in client.xinfo_groups(stream) if g["name"].decode() == group]
    return info


def entry_numbers(client, stream):
    return [number_of(fields) for _, fields in client.xrange(stream)]


def number_of(fields):
    return int(fields[b"body"].decode().rsplit("-", 1)[1])


async def test_trimming_keeps_entries_a_group_has_not_read(transport, raw):
    client, ns = raw
    topic = "event.trim-unread"
    await transport.declare("idle", [topic])
    fast = Recorder()
    await transport.subscribe("fast", [topic], fast)
    await transport.publish([message(topic, n) for n in range(20)])
    await wait_until(lambda: len(fast.acked) == 20, what="the fast group")
    assert await transport.trim(topic) == 0
    assert entry_numbers(client, f"{ns}:t:{topic}") == list(range(20))


async def test_trimming_keeps_entries_in_flight_and_drops_what_every_group_acknowledged(
    transport, raw
):
    client, ns = raw
    topic, stream = "event.trim-pel", f"{ns}:t:event.trim-pel"
    release = asyncio.Event()
    slow_seen: list[int] = []

    async def slow(batch):
        slow_seen.extend(number(d) for d in batch)
        if number(batch[0]) >= 10:
            await release.wait()
        return [Ack() for _ in batch]

    fast = Recorder()
    await transport.subscribe("fast", [topic], fast)
    await transport.subscribe("slow", [topic], slow, max_batch=10)
    await transport.publish([message(topic, n) for n in range(10)])
    await wait_until(lambda: len(fast.acked) == 10 and len(slow_seen) == 10, what="first ten")
    await transport.publish([message(topic, n) for n in range(10, 30)])
    await wait_until(lambda: len(fast.acked) == 30 and len(slow_seen) == 20, what="in flight")
    assert group_state(client, stream, "slow")["pending"] == 10
    assert await transport.trim(topic) == 10
    # 10..19 are in flight with the slow group, 20..29 it has not read.
    assert entry_numbers(client, stream) == list(range(10, 30))
    release.set()
    await wait_until(lambda: len(slow_seen) == 30, what="the rest")
    await wait_until(lambda: group_state(client, stream, "slow")["pending"] == 0, what="acks")
    assert await transport.trim(topic) == 19
    assert entry_numbers(client, stream) == [29], "the last delivered entry stays"


async def test_trimming_keeps_entries_waiting_for_a_retry_or_behind_their_key(transport, raw):
    client, ns = raw
    topic, stream = "event.trim-held", f"{ns}:t:event.trim-held"

    def decide(d):
        return Retry(error="later", delay=60) if number(d) == 10 else Ack()

    fast, waiting = Recorder(), Recorder(decide)
    await transport.subscribe("fast", [topic], fast)
    await transport.subscribe("waiting", [topic], waiting)
    await transport.publish([message(topic, n) for n in range(10)])
    await wait_until(lambda: len(waiting.acked) == 10, what="the first ten")
    # Entry ids are milliseconds and a sequence; waiting entries are indexed by their
    # millisecond, so let the next ones start in a later millisecond.
    await asyncio.sleep(0.005)
    await transport.publish([message(topic, n, key="a") for n in range(10, 30)])
    last_id = client.xrevrange(stream, count=1)[0][0]
    await wait_until(
        lambda: (
            len(fast.acked) == 30
            and group_state(client, stream, "waiting")["last-delivered-id"] == last_id
        ),
        what="the waiting group to read everything",
    )
    # 10 waits for its retry and 11..29 wait behind it: none is in the PEL any more, and
    # still none may be trimmed.
    assert group_state(client, stream, "waiting")["pending"] == 0
    assert [number(d) for d in waiting.deliveries] == [*range(11)]
    assert await transport.trim(topic) == 10
    assert entry_numbers(client, stream) == list(range(10, 30))


async def test_a_key_keeps_its_order_across_topics_when_one_has_a_backlog(transport):
    a, b = "event.order-a", "event.order-b"
    await transport.declare("g", [a, b])
    # Topic a gets a long run, then b one message, and so on: reading a few from each
    # stream at a time must not let b's later messages overtake a's unread earlier ones.
    plan = [(a, range(60)), (b, range(60, 70)), (a, range(70, 130)), (b, range(130, 140))]
    for topic, numbers in plan:
        await transport.publish([message(topic, n, key="k") for n in numbers])
    log: list = []
    first, second = Recorder(pause=0.001, log=log), Recorder(pause=0.001, log=log)
    await transport.subscribe("g", [a, b], first, max_batch=4)
    await transport.subscribe("g", [a, b], second, max_batch=4)
    await wait_until(lambda: len(log) == 140, what="140 deliveries")
    assert [number(d) for d in log] == list(range(140))


async def test_a_dead_consumers_keyed_batch_is_taken_over_in_order_with_less_room(transport):
    topic, group = "event.takeover", "g"
    started = asyncio.Event()

    async def hang(batch):
        started.set()
        await asyncio.Event().wait()

    dying = await transport.subscribe(group, [topic], hang, max_batch=10)
    await transport.publish([message(topic, n, key="k") for n in range(15)])
    await asyncio.wait_for(started.wait(), 10)
    dying.abandon()
    survivor = Recorder()
    await transport.subscribe(group, [topic], survivor, max_batch=3)
    await wait_until(lambda: len(survivor.acked) == 15, what="all fifteen after the lease")
    assert [number(d) for d in survivor.deliveries] == list(range(15))
    # The first ten were delivered to the dead consumer once already.
    assert [d.attempt for d in survivor.deliveries] == [2] * 10 + [1] * 5


async def test_a_handler_slower_than_the_lease_keeps_its_delivery(transport):
    topic, group = "event.slow", "g"
    seen: list = []

    async def slow(batch):
        seen.extend(batch)
        if len(seen) == 1:
            await asyncio.sleep(2.5)  # the lease is 1 s: renewals must keep it
        return [Ack() for _ in batch]

    for _ in range(2):
        await transport.subscribe(group, [topic], slow)
    await transport.publish([message(topic, 1)])
    await wait_until(lambda: len(seen) >= 1, what="the delivery")
    await asyncio.sleep(3.0)
    assert [(number(d), d.attempt) for d in seen] == [(1, 1)], "delivered twice"


async def test_commands_wait_for_a_service_that_never_ran(transport):
    topic = command_topic("late")
    await transport.publish([message(topic, n) for n in range(3)])
    recorder = Recorder()
    await transport.subscribe("late", [topic], recorder)
    await wait_until(lambda: len(recorder.acked) == 3, what="the commands sent before")


async def test_replay_and_purge_happen_once_under_races(transport, tmp_path):
    topic, group = "event.dlq-race", "g"
    fixed = False
    recorder = Recorder(lambda _d: Ack() if fixed else DeadLetter(reason="bad"))
    other = RedisTransport.from_url(url_for(namespace_for(tmp_path)))
    await other.connect()
    try:
        await transport.subscribe(group, [topic], recorder)
        await transport.publish([message(topic, n) for n in range(2)])

        async def parked():
            return len(await transport.dead_letters.list(group=group)) == 2

        await wait_until(parked, what="two dead letters")
        first, second = await transport.dead_letters.list(group=group)
        fixed = True
        replays = await asyncio.gather(
            transport.dead_letters.replay(first.id), other.dead_letters.replay(first.id)
        )
        assert sorted(replays) == [False, True]
        races = await asyncio.gather(
            transport.dead_letters.purge(second.id), other.dead_letters.replay(second.id)
        )
        assert sorted(races) == [False, True]
        replayed = 1 + int(races[1])  # the second record, if the replay won
        await wait_until(lambda: len(recorder.acked) == replayed, what="the replayed messages")
        await asyncio.sleep(0.3)
        assert len(recorder.acked) == replayed, "a replay delivered twice"
        assert await transport.dead_letters.list(group=group) == []
    finally:
        await other.close()


class Noted(Event):
    message_type = "test.redis.Noted"
    what: str


async def test_foreign_and_malformed_entries_are_dead_lettered_and_the_service_goes_on(
    transport, raw, tmp_path
):
    client, ns = raw
    noter = Service("noter", schema=["CREATE TABLE notes (what TEXT)"])

    @noter.subscribes(Noted)
    async def on_noted(event: Noted, ctx: Context) -> None:
        await ctx.execute("INSERT INTO notes (what) VALUES (?)", event.what)

    sender = Service("sender")
    runtimes = [
        ServiceRuntime(
            svc,
            database=SQLiteDatabase(tmp_path / f"{svc.name}.db"),
            transport=transport,
            owns_transport=False,
        )
        for svc in (noter, sender)
    ]
    for rt in runtimes:
        await rt.start()
    try:
        topic = event_topic(Noted.message_type)
        # Another system writes to the stream in its own format...
        client.xadd(f"{ns}:t:{topic}", {"foo": "bar", "key": "k1"})
        # ...or in atoll's, with a body that is no envelope.
        await transport.publish([OutgoingMessage(topic, "junk-1", None, b"\x00 not json")])
        async with sender.unit_of_work() as ctx:
            ctx.publish(Noted(what="fine"), key="k1")

        async def notes():
            async with runtimes[0].database.read() as db:
                return await db.fetch_all("SELECT what FROM notes")

        async def settled():
            return len(await transport.dead_letters.list()) == 2 and len(await notes()) == 1

        await wait_until(settled, what="two dead letters and the good event")
        records = await transport.dead_letters.list(group="noter")
        reasons = sorted(r.reason for r in records)
        assert "malformed envelope" in reasons[0]
        assert "not an atoll message" in reasons[1]
        assert "foo, key" in reasons[1]
        foreign = next(r for r in records if "not an atoll message" in r.reason)
        assert msgspec.json.decode(foreign.body) == {"foo": "bar", "key": "k1"}
        assert [row[0] for row in await notes()] == ["fine"]
    finally:
        for rt in runtimes:
            await rt.stop()


async def test_entries_deleted_by_someone_else_while_in_flight_do_not_block_their_key(
    transport, raw
):
    client, ns = raw
    topic, group = "event.deleted", "g"
    started = asyncio.Event()

    async def hang(batch):
        started.set()
        await asyncio.Event().wait()

    dying = await transport.subscribe(group, [topic], hang, max_batch=3)
    await transport.publish([message(topic, n, key="k") for n in range(6)])
    await asyncio.wait_for(started.wait(), 10)
    dying.abandon()
    # Another system deletes the three entries in flight (XDEL, or its own MAXLEN).
    stream = f"{ns}:t:{topic}"
    client.xdel(stream, *[entry_id for entry_id, _ in client.xrange(stream, count=3)])
    survivor = Recorder()
    await transport.subscribe(group, [topic], survivor)
    await wait_until(lambda: len(survivor.acked) == 3, what="the rest of the key")
    assert [number(d) for d in survivor.acked] == [3, 4, 5]


async def test_a_stopping_consumer_wakes_the_others_for_the_keys_it_releases(tmp_path):
    # Long polls and leases: only the wake-up can bring the queued entries out quickly.
    url = url_for(namespace_for(tmp_path), lease=60, poll_interval=30, trim_interval=3600)
    transport = RedisTransport.from_url(url)
    await transport.connect()
    try:
        topic, group = "event.wake", "g"
        started, release = asyncio.Event(), asyncio.Event()

        async def slow(batch):
            started.set()
            await release.wait()
            return [Ack() for _ in batch]

        first = await transport.subscribe(group, [topic], slow, max_batch=1)
        await transport.publish([message(topic, 0, key="k")])
        await asyncio.wait_for(started.wait(), 10)
        second = Recorder()
        await transport.subscribe(group, [topic], second)
        # 1..3 queue behind 0, which the first consumer holds; the second one idles.
        await transport.publish([message(topic, n, key="k") for n in range(1, 4)])
        await asyncio.sleep(0.3)
        assert second.deliveries == []
        stopping = asyncio.get_running_loop().create_task(first.stop())
        release.set()
        await stopping
        await wait_until(lambda: len(second.acked) == 3, timeout=5, what="the woken consumer")
        assert [number(d) for d in second.acked] == [1, 2, 3]
    finally:
        await transport.close()
