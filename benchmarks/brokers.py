"""Exactly-once on real brokers against FastStream's at-least-once, and the raw limit.

    .venv/bin/python benchmarks/brokers.py [--quick] [--brokers nats,rabbitmq,redis]

For each broker (the servers on this machine), three pipelines move the same number of
messages from a producer process to a consumer process:

* **atoll**: a producer service commits a row and an outbox record per message in
  PostgreSQL (64 concurrent units of work); its relay publishes to the broker; the
  consumer service's handler inserts one row with its inbox record in PostgreSQL
  (exactly-once effects).
* **FastStream**: the producer publishes each message with FastStream; FastStream's
  subscriber (its defaults, as most applications run it) inserts the same one row in
  PostgreSQL through an asyncpg pool (at-least-once: no outbox, no inbox).
* **raw**: the broker's Python client publishes and consumes with acknowledgements and
  no database (the limit).

Throughput is messages over the time from the first publish (or first unit of work) to
the last effect. Cases: ``nats-vs-faststream``, ``rabbitmq-vs-faststream``,
``redis-vs-faststream`` (target 1.0 each) and ``nats-vs-raw``, ``rabbitmq-vs-raw``,
``redis-vs-raw`` (reported).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

PG = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
NATS = "nats://127.0.0.1:4222"
CONCURRENCY = 64


def atoll_url(broker: str, tag: str) -> str:
    return {
        "redis": f"{REDIS}?namespace={tag}",
        "rabbitmq": f"{AMQP}?namespace={tag}",
        "nats": f"{NATS}?namespace={tag}",
    }[broker]


# -- atoll ----------------------------------------------------------------------------


async def atoll_child(role: str, broker: str, tag: str, count: int, mode: str) -> None:
    from atoll import Command, Context, Service  # noqa: PLC0415
    from atoll.persistence.postgres import PostgresDatabase  # noqa: PLC0415
    from atoll.service import ServiceRuntime  # noqa: PLC0415
    from atoll.transport import transport_from_url  # noqa: PLC0415

    class Work(Command):
        message_type = "bench.Work"
        n: int

    producer = Service("bench-producer", schema=["CREATE TABLE IF NOT EXISTS sent (n BIGINT)"])
    consumer = Service(
        "bench-consumer", schema=["CREATE TABLE IF NOT EXISTS effects (n BIGINT PRIMARY KEY)"]
    )
    done = asyncio.Event()
    seen = 0

    @consumer.handles(Work)
    async def on_work(work: Work, ctx: Context) -> None:
        await ctx.execute("INSERT INTO effects (n) VALUES (?)", work.n)

        def committed() -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        ctx.on_commit(committed)

    service = consumer if role == "consumer" else producer
    runtime = ServiceRuntime(
        service,
        database=PostgresDatabase(PG, schema=f"{tag}_{role}", max_size=32),
        transport=transport_from_url(atoll_url(broker, tag), base_dir=Path.cwd()),
        max_batch=256,
        relay_batch=512,
    )
    if role == "consumer":
        await runtime.start()
        print(json.dumps({"ready": True}), flush=True)
        await done.wait()
        print(json.dumps({"end": time.time()}), flush=True)
        await runtime.stop()
        return
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            async with runtime.unit_of_work() as ctx:
                await ctx.execute("INSERT INTO sent (n) VALUES (?)", n)
                ctx.send(Work(n=n), to="bench-consumer", key=f"k{n % 64}")

    if mode == "drain":
        # The outbox holds every message, committed, before the clock starts.
        await runtime.database.open()
        for name, statements in producer.migrations:
            await runtime.database.migrate(name, statements)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        print(json.dumps({"filled": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps({"start": time.time()}), flush=True)
        await runtime.start()
    else:
        await runtime.start()
        print(json.dumps({"start": time.time()}), flush=True)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runtime.stop()


# -- FastStream -----------------------------------------------------------------------


def faststream_broker(
    broker: str, tag: str
) -> tuple[Any, Callable[..., Any], Callable[[dict[str, int]], Awaitable[None]]]:
    """(broker, subscriber decorator, publish) for FastStream on ``broker``."""
    if broker == "redis":
        from faststream.redis import RedisBroker, StreamSub  # noqa: PLC0415

        fs = RedisBroker(REDIS, logger=None)
        sub = fs.subscriber(stream=StreamSub(tag, group="bench", consumer="c1"))
        return fs, sub, lambda body: fs.publish(body, stream=tag)
    if broker == "rabbitmq":
        from faststream.rabbit import RabbitBroker, RabbitQueue  # noqa: PLC0415

        fs = RabbitBroker(AMQP, logger=None)
        queue = RabbitQueue(tag, durable=True)
        sub = fs.subscriber(queue)
        return fs, sub, lambda body: fs.publish(body, queue=queue, persist=True)
    import warnings  # noqa: PLC0415

    from faststream.nats import JStream, NatsBroker  # noqa: PLC0415

    # FastStream advises a pull consumer for scaling out; one instance is measured here.
    warnings.filterwarnings(
        "ignore", message="The JetStream Push consumer", category=RuntimeWarning
    )
    fs = NatsBroker(NATS, logger=None)
    stream = JStream(tag, subjects=[f"{tag}.work"])
    sub = fs.subscriber(f"{tag}.work", stream=stream, durable="bench")
    return fs, sub, lambda body: fs.publish(body, subject=f"{tag}.work", stream=tag)


async def faststream_child(role: str, broker: str, tag: str, count: int, mode: str) -> None:
    fs, sub, publish = faststream_broker(broker, tag)
    if role == "consumer":
        pool = await asyncpg.create_pool(PG, min_size=4, max_size=10)
        await pool.execute(f'CREATE TABLE IF NOT EXISTS "{tag}_effects" (n BIGINT)')
        done = asyncio.Event()
        seen = 0

        @sub
        async def handle(body: dict[str, int]) -> None:
            nonlocal seen
            await pool.execute(f'INSERT INTO "{tag}_effects" (n) VALUES ($1)', body["n"])
            seen += 1
            if seen >= count:
                done.set()

        if mode == "drain":
            print(json.dumps({"start": time.time()}), flush=True)
        await fs.start()
        print(json.dumps({"ready": True}), flush=True)
        await done.wait()
        print(json.dumps({"end": time.time()}), flush=True)
        await fs.stop()
        await pool.close()
        return
    await fs.connect()
    await declare_for_faststream(fs, broker, tag)
    if mode != "drain":
        print(json.dumps({"start": time.time()}), flush=True)
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            await publish({"n": n})

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    if mode == "drain":
        print(json.dumps({"filled": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fs.stop()


async def declare_for_faststream(fs: Any, broker: str, tag: str) -> None:
    """Make the destination exist before publishing, so nothing published is dropped."""
    if broker == "rabbitmq":
        from faststream.rabbit import RabbitQueue  # noqa: PLC0415

        await fs.declare_queue(RabbitQueue(tag, durable=True))
    elif broker == "redis":
        from redis.asyncio import Redis  # noqa: PLC0415

        client = Redis.from_url(REDIS)
        with contextlib.suppress(Exception):
            await client.xgroup_create(tag, "bench", id="0", mkstream=True)
        await client.aclose()
    else:
        import nats  # noqa: PLC0415

        nc = await nats.connect(NATS)
        with contextlib.suppress(Exception):
            await nc.jetstream().add_stream(name=tag, subjects=[f"{tag}.work"])
        await nc.close()


# -- raw clients ----------------------------------------------------------------------


async def raw_child(role: str, broker: str, tag: str, count: int, mode: str) -> None:  # noqa: PLR0912 - one client per broker
    del mode  # the raw clients always pre-publish and then drain: the limit
    body = b'{"n": 0}' * 4
    if broker == "redis":
        from redis.asyncio import Redis  # noqa: PLC0415

        client = Redis.from_url(REDIS)
        if role == "consumer":
            with contextlib.suppress(Exception):  # the producer made it
                await client.xgroup_create(tag, "g", id="0", mkstream=True)
            print(json.dumps({"start": time.time()}), flush=True)
            seen = 0
            while seen < count:
                reply = await client.xreadgroup("g", "c", {tag: ">"}, count=500, block=1000)
                for _, entries in reply or []:
                    ids = [entry_id for entry_id, _ in entries]
                    if ids:
                        await client.xack(tag, "g", *ids)
                        seen += len(ids)
            print(json.dumps({"end": time.time()}), flush=True)
        else:
            with contextlib.suppress(Exception):
                await client.xgroup_create(tag, "g", id="0", mkstream=True)
            for start in range(0, count, 500):
                pipe = client.pipeline(transaction=False)
                for _ in range(min(500, count - start)):
                    pipe.xadd(tag, {"b": body})
                await pipe.execute()
            print(json.dumps({"filled": True}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await client.aclose()
        return
    if broker == "rabbitmq":
        import aiormq  # noqa: PLC0415

        connection = await aiormq.connect(AMQP)
        channel = await connection.channel()
        await channel.queue_declare(tag, durable=True, arguments={"x-queue-type": "quorum"})
        if role == "consumer":
            await channel.basic_qos(prefetch_count=1000)
            done = asyncio.Event()
            seen = 0

            async def on_message(message: Any) -> None:
                nonlocal seen
                seen += 1
                if seen % 100 == 0 or seen >= count:
                    await message.channel.basic_ack(message.delivery_tag, multiple=True)
                if seen >= count:
                    done.set()

            print(json.dumps({"start": time.time()}), flush=True)
            await channel.basic_consume(tag, on_message)
            await done.wait()
            print(json.dumps({"end": time.time()}), flush=True)
        else:
            for start in range(0, count, 500):
                await asyncio.gather(
                    *(
                        channel.basic_publish(
                            body,
                            routing_key=tag,
                            properties=aiormq.spec.Basic.Properties(delivery_mode=2),
                        )
                        for _ in range(min(500, count - start))
                    )
                )
            print(json.dumps({"filled": True}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await connection.close()
        return
    import nats  # noqa: PLC0415

    nc = await nats.connect(NATS)
    js = nc.jetstream()
    subject = f"{tag}.raw"
    with contextlib.suppress(Exception):  # created by the other role
        await js.add_stream(name=tag, subjects=[subject])
    if role == "consumer":
        print(json.dumps({"start": time.time()}), flush=True)
        psub = await js.pull_subscribe(subject, durable="raw")
        seen = 0
        while seen < count:
            try:
                messages = await psub.fetch(500, timeout=1)
            except TimeoutError:
                continue
            for message in messages:
                await message.ack()
            seen += len(messages)
        print(json.dumps({"end": time.time()}), flush=True)
    else:
        for start in range(0, count, 500):
            futures = [
                await js.publish_async(subject, body) for _ in range(min(500, count - start))
            ]
            await asyncio.gather(*futures)
        print(json.dumps({"filled": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()


# -- orchestration --------------------------------------------------------------------


def run(system: str, broker: str, count: int, mode: str) -> float:
    """Messages/s of one pipeline. ``drain``: the source holds every message first (the
    outbox for atoll, the broker for the others), then the clock runs until the last
    effect. ``e2e``: producing is timed too (atoll: one unit of work per message)."""
    tag = f"bench{uuid.uuid4().hex[:10]}"
    script = str(Path(__file__).resolve())
    args = [sys.executable, script, "--child", system, broker, tag, str(count), mode]
    pipe = {"stdout": subprocess.PIPE, "text": True}
    processes: list[subprocess.Popen[str]] = []

    def spawn(role: str, **extra: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen([*args, role], **pipe, **extra)  # type: ignore[call-overload]
        processes.append(process)
        return process

    def line(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdout is not None
        return json.loads(process.stdout.readline())  # type: ignore[no-any-return]

    try:
        if system == "atoll":
            consumer = spawn("consumer")
            line(consumer)  # ready
            producer = spawn("producer", stdin=subprocess.PIPE)
            if mode == "drain":
                line(producer)  # filled
                assert producer.stdin is not None
                producer.stdin.write("go\n")
                producer.stdin.flush()
            start = line(producer)["start"]
            end = line(consumer)["end"]
        elif mode == "drain":
            producer = spawn("producer", stdin=subprocess.PIPE)
            line(producer)  # filled
            consumer = spawn("consumer")
            start = line(consumer)["start"]
            record = line(consumer)
            end = record.get("end") or line(consumer)["end"]
        else:
            consumer = spawn("consumer")
            line(consumer)  # ready
            producer = spawn("producer", stdin=subprocess.PIPE)
            start = line(producer)["start"]
            end = line(consumer)["end"]
        consumer.wait(120)
        assert producer.stdin is not None
        producer.stdin.close()
        producer.wait(120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        asyncio.run(cleanup(broker, tag))
    return count / (end - start)


async def cleanup(broker: str, tag: str) -> None:
    conn = await asyncpg.connect(PG)
    try:
        for schema in (f"{tag}_producer", f"{tag}_consumer"):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.execute(f'DROP TABLE IF EXISTS "{tag}_effects"')
    finally:
        await conn.close()
    if broker == "redis":
        from redis.asyncio import Redis  # noqa: PLC0415

        client = Redis.from_url(REDIS)
        keys = [k async for k in client.scan_iter(match=f"{tag}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif broker == "rabbitmq":
        await _rabbit_cleanup(tag)
    else:
        import nats  # noqa: PLC0415

        nc = await nats.connect(NATS)
        js = nc.jetstream()
        for stream in await js.streams_info():
            if stream.config.name and stream.config.name.startswith(tag):
                await js.delete_stream(stream.config.name)
        await nc.close()


async def _rabbit_cleanup(tag: str) -> None:
    import httpx  # noqa: PLC0415

    try:  # the management API, when the plugin is on; otherwise queues stay (named per run)
        async with httpx.AsyncClient(auth=("guest", "guest"), timeout=5) as client:
            for kind in ("queues", "exchanges"):
                listing = await client.get(f"http://127.0.0.1:15672/api/{kind}/%2F")
                for item in listing.json():
                    if item["name"].startswith(tag):
                        await client.delete(f"http://127.0.0.1:15672/api/{kind}/%2F/{item['name']}")
    except (httpx.HTTPError, ValueError, KeyError):
        import aiormq  # noqa: PLC0415

        connection = await aiormq.connect(AMQP)
        channel = await connection.channel()
        for queue in (tag,):
            await channel.queue_delete(queue)
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--brokers", default="nats,rabbitmq,redis")
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--child", nargs=6, metavar=("SYSTEM", "BROKER", "TAG", "COUNT", "MODE", "ROLE")
    )
    args = parser.parse_args()
    if args.child:
        system, broker, tag, count, mode, role = args.child
        child = {"atoll": atoll_child, "faststream": faststream_child, "raw": raw_child}[system]
        asyncio.run(child(role, broker, tag, int(count), mode))
        return
    count = 2_000 if args.quick else 8_000
    rounds = args.rounds or (1 if args.quick else 2)
    cases: dict[str, dict[str, Any]] = {}
    for broker in args.brokers.split(","):
        best: dict[str, float] = {}
        for _ in range(rounds):
            for system, mode in (
                ("atoll", "drain"),
                ("faststream", "drain"),
                ("raw", "drain"),
                ("atoll", "e2e"),
                ("faststream", "e2e"),
            ):
                rate = run(system, broker, count * (5 if system == "raw" else 1), mode)
                best[f"{system}-{mode}"] = max(best.get(f"{system}-{mode}", 0.0), rate)
                print(f"{broker:9} {system:10} {mode:6} {rate:10,.0f} msg/s", flush=True)
        unit = "messages/s, one PostgreSQL effect per message"
        cases[f"{broker}-vs-faststream"] = {
            "atoll": round(best["atoll-drain"], 1),
            "peer": round(best["faststream-drain"], 1),
            "unit": f"{unit} (from a full outbox / a full queue to the last effect)",
            "ratio": round(best["atoll-drain"] / best["faststream-drain"], 3),
        }
        cases[f"{broker}-vs-raw"] = {
            "atoll": round(best["atoll-drain"], 1),
            "peer": round(best["raw-drain"], 1),
            "unit": "messages/s (raw: consume with acks, no database)",
            "ratio": round(best["atoll-drain"] / best["raw-drain"], 3),
        }
        cases[f"{broker}-end-to-end-vs-faststream"] = {
            "atoll": round(best["atoll-e2e"], 1),
            "peer": round(best["faststream-e2e"], 1),
            "unit": f"{unit} (atoll: a transaction per message sent; FastStream: publish only)",
            "ratio": round(best["atoll-e2e"] / best["faststream-e2e"], 3),
        }
    print(json.dumps({"benchmark": "brokers", "cases": cases}))


if __name__ == "__main__":
    main()
