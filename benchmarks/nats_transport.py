"""The NATS JetStream transport against FastStream's NATS broker, in the same run.

    .venv/bin/python benchmarks/nats_transport.py [--quick] [--url nats://127.0.0.1:4222]

Needs nats-server with JetStream (the shared one on 127.0.0.1:4222 will do: everything
lives in a namespace or stream of its own, deleted afterwards). Cases (last line, JSON):

* ``publish-vs-faststream``: confirmed publishes per second. atoll: ``publish`` in
  batches of 500 (the relay's way: send all, then await every PubAck). FastStream:
  ``broker.publish(..., stream=...)`` gathered 500 at a time (each awaits its PubAck).
* ``consume-vs-faststream``: messages per second through a trivial handler, from a
  stream already holding them. atoll: a group subscription (per-key order, batches).
  FastStream: a durable JetStream subscriber, the faster of push and pull
  (``PullSub(batch_size=100)``), at-least-once (ack after the handler).
* ``exactly-once-insert-vs-faststream-insert``: the same, with a handler that inserts
  one row into SQLite (WAL, ``synchronous=FULL``). atoll: the service runtime handles a
  batch in one transaction with an inbox record per message (exactly-once effects).
  FastStream: one unit of work per message (at-least-once; a redelivery would insert
  twice), on the same SQLite layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats
from faststream.nats import JStream, NatsBroker, PullSub

from atoll import Command, Context, Service
from atoll.determinism import RandomSource
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.transport import Ack, Delivery, Outcome, OutgoingMessage
from atoll.transport.nats import NatsTransport

_random = RandomSource()
BODY = b'{"n": 0, "payload": "' + b"x" * 60 + b'"}'


class Insert(Command):
    message_type = "bench.Insert"
    n: int


bench_producer = Service("bench-nats-producer")
bench_consumer = Service(
    "bench-nats-consumer",
    schema=["CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY, at REAL NOT NULL)"],
)
done_rows = {"count": 0, "target": 0, "event": asyncio.Event()}


@bench_consumer.handles(Insert)
async def insert(cmd: Insert, ctx: Context) -> None:
    await ctx.execute("INSERT INTO rows (n, at) VALUES (?, ?)", cmd.n, time.time())

    def committed() -> None:
        done_rows["count"] += 1  # type: ignore[operator]
        if done_rows["count"] >= done_rows["target"]:  # type: ignore[operator]
            done_rows["event"].set()  # type: ignore[union-attr]

    ctx.on_commit(committed)


def namespace() -> str:
    return f"bench-{_random.new_id().replace('-', '')[-10:]}"


async def drop(url: str, streams: Sequence[str]) -> None:
    nc = await nats.connect(url)
    for stream in streams:
        try:
            await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=5)
        except Exception as exc:
            print(f"could not delete {stream}: {exc}", file=sys.stderr)
    await nc.close()


def messages(count: int, topic: str) -> list[OutgoingMessage]:
    return [OutgoingMessage(topic, _random.new_id(), f"k{n % 1000}", BODY) for n in range(count)]


# -- atoll --------------------------------------------------------------------------------


async def atoll_publish_and_consume(url: str, count: int) -> tuple[float, float]:
    ns = namespace()
    transport = NatsTransport.from_url(f"{url}?namespace={ns}")
    await transport.connect()
    try:
        await transport.declare("g", ["service.g"])
        batch = messages(count, "service.g")
        start = time.perf_counter()
        for i in range(0, count, 500):
            await transport.publish(batch[i : i + 500])
        publish_rate = count / (time.perf_counter() - start)
        seen = 0
        done = asyncio.Event()

        async def handler(deliveries: Sequence[Delivery]) -> list[Outcome]:
            nonlocal seen
            seen += len(deliveries)
            if seen >= count:
                done.set()
            return [Ack() for _ in deliveries]

        start = time.perf_counter()
        await transport.subscribe("g", ["service.g"], handler, max_batch=100)
        await asyncio.wait_for(done.wait(), 300)
        consume_rate = count / (time.perf_counter() - start)
    finally:
        await transport.close()
        await drop(url, NatsTransport.from_url(f"{url}?namespace={ns}").names.streams())
    return publish_rate, consume_rate


async def atoll_exactly_once(url: str, count: int, workdir: Path) -> float:
    ns = namespace()
    transport_url = f"{url}?namespace={ns}"
    producer = ServiceRuntime(
        bench_producer,
        database=SQLiteDatabase(workdir / "producer.db"),
        transport=NatsTransport.from_url(transport_url),
        relay_batch=500,
    )
    await producer.start()
    # Pre-load: the consumer is not running yet, so the messages wait in the stream.
    for start in range(0, count, 500):
        async with producer.database.batch():
            for n in range(start, min(count, start + 500)):
                async with producer.unit_of_work() as ctx:
                    ctx.send(Insert(n=n), to=bench_consumer.name, key=f"k{n % 1000}")
    while (await producer.database.outbox_stats())[0]:
        await asyncio.sleep(0.05)
    await producer.stop()
    done_rows.update(count=0, target=count, event=asyncio.Event())
    consumer = ServiceRuntime(
        bench_consumer,
        database=SQLiteDatabase(workdir / "consumer.db"),
        transport=NatsTransport.from_url(transport_url),
        max_batch=256,
    )
    started = time.perf_counter()
    await consumer.start()
    await done_rows["event"].wait()  # type: ignore[union-attr]
    rate = count / (time.perf_counter() - started)
    await consumer.stop()
    await drop(url, NatsTransport.from_url(transport_url).names.streams())
    return rate


# -- FastStream ---------------------------------------------------------------------------


async def faststream_publish(url: str, count: int) -> float:
    stream = f"FSBENCH_{namespace().replace('-', '_')}"
    subject = f"fsbench.{stream.lower()}"
    broker = NatsBroker(url, logger=None)
    await broker.connect()
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name=stream, subjects=[subject])
    try:
        start = time.perf_counter()
        for _ in range(0, count, 500):
            await asyncio.gather(
                *(broker.publish(BODY, subject, stream=stream) for _ in range(500))
            )
        return count / (time.perf_counter() - start)
    finally:
        await broker.stop()
        await nc.close()
        await drop(url, [stream])


async def faststream_consume(url: str, count: int, *, pull: bool, db: Path | None) -> float:
    stream = f"FSBENCH_{namespace().replace('-', '_')}"
    subject = f"fsbench.{stream.lower()}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    for _ in range(0, count, 500):
        await asyncio.gather(*(js.publish(subject, BODY) for _ in range(500)))
    database = None
    if db is not None:
        database = SQLiteDatabase(db)
        await database.open()
        await database.migrate("rows", bench_consumer.migrations[0][1])
    broker = NatsBroker(url, logger=None)
    seen = 0
    done = asyncio.Event()
    options: dict[str, object] = {"stream": JStream(stream, declare=False), "durable": "bench"}
    if pull:
        options["pull_sub"] = PullSub(batch_size=100, timeout=1.0)

    @broker.subscriber(subject, **options)  # type: ignore[call-overload,misc]
    async def handle(body: dict[str, object]) -> None:  # FastStream decodes the JSON
        nonlocal seen
        if database is not None:
            n = int(str(body["n"])) + seen  # every body says n=0: number them as they come
            async with database.unit_of_work() as uow:
                await uow.execute("INSERT INTO rows (n, at) VALUES (?, ?)", n, time.time())
        seen += 1
        if seen >= count:
            done.set()

    try:
        start = time.perf_counter()
        await broker.start()
        await asyncio.wait_for(done.wait(), 300)
        return count / (time.perf_counter() - start)
    finally:
        await broker.stop()
        if database is not None:
            await database.close()
        await nc.close()
        await drop(url, [stream])


# -- driver -------------------------------------------------------------------------------


async def main(url: str, count: int, db_count: int) -> None:
    import warnings  # noqa: PLC0415 - only to quiet FastStream's push-consumer advice

    warnings.filterwarnings("ignore", message=".*Push consumer", category=RuntimeWarning)
    cases: dict[str, dict[str, object]] = {}
    atoll_pub, atoll_consume = await atoll_publish_and_consume(url, count)
    peer_pub = await faststream_publish(url, count)
    cases["publish-vs-faststream"] = {
        "atoll": round(atoll_pub),
        "peer": round(peer_pub),
        "unit": "msg/s",
        "ratio": round(atoll_pub / peer_pub, 2),
    }
    push = await faststream_consume(url, count, pull=False, db=None)
    pull = await faststream_consume(url, count, pull=True, db=None)
    print(f"faststream consume: push {push:.0f} msg/s, pull {pull:.0f} msg/s", file=sys.stderr)
    cases["consume-vs-faststream"] = {
        "atoll": round(atoll_consume),
        "peer": round(max(push, pull)),
        "unit": "msg/s",
        "ratio": round(atoll_consume / max(push, pull), 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        atoll_db = await atoll_exactly_once(url, db_count, Path(tmp))
        peer_db = await faststream_consume(url, db_count, pull=False, db=Path(tmp) / "fs.db")
    cases["exactly-once-insert-vs-faststream-insert"] = {
        "atoll": round(atoll_db),
        "peer": round(peer_db),
        "unit": "msg/s",
        "ratio": round(atoll_db / peer_db, 2),
    }
    for name, case in cases.items():
        print(f"{name}: atoll {case['atoll']} vs {case['peer']} {case['unit']}", file=sys.stderr)
    print(json.dumps({"benchmark": "nats_transport", "cases": cases}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under 60 s")
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    args = parser.parse_args()
    count, db_count = (5_000, 2_000) if args.quick else (20_000, 5_000)
    asyncio.run(main(args.url, count, db_count))
