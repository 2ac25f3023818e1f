import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest

from atoll import Command, Context, Event, Reply, Service
from atoll.messages import Envelope, encode_envelope
from atoll.resilience import current_deadline
from atoll.testing import wait_until
from atoll.transport import OutgoingMessage, command_topic
from support import FAST_RETRY


class Ask(Command):
    message_type = "test.Ask"
    n: int


class Answer(Reply):
    message_type = "test.Answer"
    n: int


class Happened(Event):
    message_type = "test.Happened"
    what: str


def make_services():
    asker = Service(
        "asker",
        schema=["CREATE TABLE answers (n INTEGER PRIMARY KEY, correlation TEXT, causation TEXT)"],
    )
    answerer = Service(
        "answerer",
        schema=["CREATE TABLE asked (n INTEGER PRIMARY KEY, times INTEGER NOT NULL)"],
        redelivery=FAST_RETRY,
    )

    @answerer.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        await ctx.execute(
            "INSERT INTO asked (n, times) VALUES (?, 1)"
            " ON CONFLICT (n) DO UPDATE SET times = asked.times + 1",
            ask.n,
        )
        ctx.reply(Answer(n=ask.n * 10))

    @asker.handles(Answer)
    async def on_answer(answer: Answer, ctx: Context) -> None:
        assert ctx.envelope is not None
        await ctx.execute(
            "INSERT INTO answers (n, correlation, causation) VALUES (?, ?, ?)",
            answer.n,
            ctx.envelope.correlation_id,
            ctx.envelope.causation_id,
        )

    return asker, answerer


async def count(runtime, sql):
    async with runtime.database.read() as db:
        return await db.fetch_value(sql)


async def test_command_and_reply_carry_correlation_and_causation(system):
    asker, answerer = make_services()
    ask_rt, answer_rt = await system.start(asker, answerer)
    async with asker.unit_of_work(correlation_id="corr-1") as ctx:
        sent_id = ctx.send(Ask(n=4), to="answerer")
    await wait_until(lambda: count(ask_rt, "SELECT count(*) FROM answers"), what="the answer")
    async with ask_rt.database.read() as db:
        row = await db.fetch_one("SELECT n, correlation, causation FROM answers")
    assert row[0] == 40
    assert row[1] == "corr-1"
    assert row[2] == sent_id, "the reply was not caused by the Ask"
    assert await count(answer_rt, "SELECT times FROM asked WHERE n = 4") == 1


async def test_events_reach_every_subscriber(system):
    publisher = Service("publisher")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    subscribers = []
    for name in ("a", "b"):
        svc = Service(f"sub-{name}")

        @svc.subscribes(Happened)
        async def on_event(event: Happened, ctx: Context, name=name) -> None:
            seen[name].append(event.what)

        subscribers.append(svc)
    await system.start(publisher, *subscribers)
    async with publisher.unit_of_work() as ctx:
        ctx.publish(Happened(what="x"))
    await wait_until(lambda: seen["a"] == ["x"] and seen["b"] == ["x"], what="both subscribers")


async def publish_raw(system, service_name, body: bytes, message_id="raw-1", key=None):
    await system.transport.publish(
        [OutgoingMessage(command_topic(service_name), message_id, key, body)]
    )


def raw_envelope(message_type, payload, *, message_id="m-raw", key=None, version=1):
    return encode_envelope(
        Envelope(
            id=message_id,
            type=message_type,
            version=version,
            kind="command",
            source="outside",
            destination="answerer",
            correlation_id="c",
            created_at=datetime.now(tz=UTC),
            key=key,
            payload=msgspec.Raw(json.dumps(payload).encode()),
        )
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00\x01 not an envelope", "malformed envelope"),
        (raw_envelope("test.Nope", {}), "has no handler for message type 'test.Nope'"),
        (raw_envelope("test.Ask", {"n": "seven"}), "payload of 'test.Ask' v1 is invalid"),
    ],
    ids=["malformed", "unknown-type", "invalid-payload"],
)
async def test_bad_messages_go_to_dead_letters_and_the_consumer_keeps_running(system, body, reason):
    asker, answerer = make_services()
    _, answer_rt = await system.start(asker, answerer)
    await publish_raw(system, "answerer", body)
    await publish_raw(
        system, "answerer", raw_envelope("test.Ask", {"n": 1}, message_id="good"), "good"
    )

    async def parked():
        return len(await system.transport.dead_letters.list()) == 1

    await wait_until(parked, what="a dead letter")
    await wait_until(
        lambda: count(answer_rt, "SELECT count(*) FROM asked"), what="the good message"
    )
    [record] = await system.transport.dead_letters.list()
    assert reason in record.reason
    assert record.attempts == 1
    assert answer_rt.stats.dead_lettered == 1


async def test_a_failing_handler_is_retried_then_dead_lettered_then_replayed(system):
    svc = Service("flaky", redelivery=FAST_RETRY, schema=["CREATE TABLE done (n INTEGER)"])
    broken = True

    @svc.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        await ctx.execute("INSERT INTO done (n) VALUES (?)", ask.n)
        if broken:
            raise RuntimeError("downstream is down")

    sender = Service("sender")
    (rt, _) = await system.start(svc, sender)
    async with sender.unit_of_work() as ctx:
        ctx.send(Ask(n=1), to="flaky")

    async def parked():
        return len(await system.transport.dead_letters.list()) == 1

    await wait_until(parked, what="a dead letter")
    [record] = await system.transport.dead_letters.list()
    assert record.attempts == 3
    assert "RuntimeError: downstream is down" in record.reason
    assert await count(rt, "SELECT count(*) FROM done") == 0, "a failed handler left an effect"
    broken = False
    assert await system.transport.dead_letters.replay(record.id)
    await wait_until(lambda: count(rt, "SELECT count(*) FROM done"), what="the replayed effect")
    assert await count(rt, "SELECT count(*) FROM done") == 1


async def test_a_redelivered_message_has_one_effect(system):
    asker, answerer = make_services()
    _, answer_rt = await system.start(asker, answerer)
    body = raw_envelope("test.Ask", {"n": 9}, message_id="dup")
    for i in range(3):
        # Different transport ids, same envelope id: the broker cannot dedupe, the inbox must.
        await publish_raw(system, "answerer", body, message_id=f"transport-{i}")
    await wait_until(lambda: answer_rt.stats.duplicates == 2, what="two duplicates dropped")
    assert await count(answer_rt, "SELECT times FROM asked WHERE n = 9") == 1


async def test_a_failure_holds_later_messages_of_its_key(system):
    order: list[int] = []
    svc = Service("ordered", redelivery=FAST_RETRY)
    failed_once: set[int] = set()

    @svc.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        if ask.n == 1 and 1 not in failed_once:
            failed_once.add(1)
            raise RuntimeError("first try fails")
        order.append(ask.n)

    sender = Service("sender2")
    await system.start(svc, sender)
    async with sender.unit_of_work() as ctx:
        for n in range(1, 6):
            ctx.send(Ask(n=n), to="ordered", key="same")
    await wait_until(lambda: len(order) == 5, what="five handled")
    assert order == [1, 2, 3, 4, 5]


async def test_stop_drains_the_handler_in_flight(system):
    started, finish = asyncio.Event(), asyncio.Event()
    svc = Service("slow", schema=["CREATE TABLE done (n INTEGER)"])

    @svc.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        started.set()
        await finish.wait()
        await ctx.execute("INSERT INTO done (n) VALUES (?)", ask.n)

    sender = Service("sender3")
    (rt, _) = await system.start(svc, sender)
    async with sender.unit_of_work() as ctx:
        ctx.send(Ask(n=1), to="slow")
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(rt.stop_consuming())
    await asyncio.sleep(0.05)
    assert not rt.ready
    assert not stopping.done(), "stop did not wait for the handler"
    finish.set()
    await stopping
    assert await count(rt, "SELECT count(*) FROM done") == 1
    assert system.transport.pending("slow") == 0, "the drained message was not acknowledged"


async def test_health_readiness_and_problem_json(system):
    svc = Service("web")

    @svc.http.post("/things")
    async def make(thing: dict[str, int]) -> dict[str, int]:
        return thing

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.http), base_url="http://t")
    async with client:
        assert (await client.get("/readyz")).status_code == 503
        (rt,) = await system.start(svc)
        assert (await client.get("/healthz")).json() == {"status": "alive", "service": "web"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["outbox"]["pending"] == 0
        bad = await client.post("/things", json={"a": "not a number"})
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert bad.json()["errors"][0]["location"] == ["body", "a"]
        # A body that is not JSON at all is a 400 saying why, not a field error.
        garbled = await client.post(
            "/things", content=b'{"a": 1', headers={"content-type": "application/json"}
        )
        assert garbled.status_code == 400
        assert garbled.headers["content-type"] == "application/problem+json"
        assert garbled.json()["detail"].startswith("the request body is not valid JSON: ")
        assert "at character" in garbled.json()["detail"]
        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        await rt.stop_consuming()
        assert (await client.get("/readyz")).json()["status"] == "stopping"


async def test_a_messages_deadline_is_current_while_its_handler_runs(system):
    """``Envelope.deadline`` becomes the handler's deadline: what it calls through atoll
    (a ``ServiceClient`` call, a policy) sees the time left, and what it sends inherits it."""
    seen: list[float | None] = []
    forwarded: list[datetime | None] = []
    sender = Service("sender")
    receiver = Service("receiver")

    @receiver.handles(Ask)
    async def on_ask(ask: Ask, ctx: Context) -> None:
        deadline = current_deadline()
        seen.append(None if deadline is None else deadline.remaining())
        ctx.publish(Happened(what=str(ask.n)))

    @sender.subscribes(Happened)
    async def on_happened(happened: Happened, ctx: Context) -> None:
        assert ctx.envelope is not None
        forwarded.append(ctx.envelope.deadline)

    send_rt, _ = await system.start(sender, receiver)
    due = datetime.now(UTC) + timedelta(seconds=30)
    async with send_rt.unit_of_work(deadline=due) as ctx:
        ctx.send(Ask(n=1), to="receiver")
    async with send_rt.unit_of_work() as ctx:
        ctx.send(Ask(n=2), to="receiver")
    await wait_until(lambda: len(forwarded) == 2, what="both events")
    with_deadline, without = seen
    assert with_deadline is not None
    assert 25 < with_deadline <= 30
    assert without is None
    assert due in forwarded  # the event the first handler published carries the deadline
    assert None in forwarded
