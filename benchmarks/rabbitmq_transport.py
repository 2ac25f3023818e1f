"""The RabbitMQ transport's own throughput, against FastStream on the same broker.

    .venv/bin/python benchmarks/rabbitmq_transport.py [--quick]

Needs RabbitMQ on 127.0.0.1:5672 (or ``ATOLL_BENCH_RABBITMQ_URL``). Cases (last line of
output, JSON; ratio is atoll over FastStream, higher is better):

* ``publish-confirmed``: messages/s that ``RabbitMQTransport.publish`` gets confirmed
  (batches of 500, as the outbox relay sends them) against FastStream's
  ``RabbitBroker.publish`` (one confirmed message at a time), to a quorum queue.
* ``consume-no-op``: messages/s through a consumer whose handler does nothing, from a
  quorum queue holding every message: atoll's batch consumer (acknowledging after each
  batch) against a FastStream subscriber (acknowledging each message).

Bodies are 300 bytes; both use persistent messages. This is the transport alone; the
exactly-once pipeline with a database is the messaging benchmark's job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence

import aiormq
from faststream.rabbit import QueueType, RabbitBroker, RabbitQueue

from atoll.transport import Ack, Delivery, Outcome, OutgoingMessage
from atoll.transport.rabbitmq import RabbitMQTransport

URL = os.environ.get("ATOLL_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = b"x" * 300


async def atoll_case(count: int) -> tuple[float, float]:
    namespace = f"atoll-bench-{uuid.uuid4().hex[:8]}"
    transport = RabbitMQTransport.from_url(f"{URL}?namespace={namespace}")
    await transport.connect()
    try:
        await transport.declare("bench", ["service.bench"])
        messages = [
            OutgoingMessage("service.bench", f"m{n}", f"k{n % 64}", BODY) for n in range(count)
        ]
        started = time.perf_counter()
        for start in range(0, count, 500):
            await transport.publish(messages[start : start + 500])
        publish_rate = count / (time.perf_counter() - started)
        done = asyncio.Event()
        seen = 0

        async def handler(batch: Sequence[Delivery]) -> list[Outcome]:
            nonlocal seen
            seen += len(batch)
            if seen >= count:
                done.set()
            return [Ack()] * len(batch)

        started = time.perf_counter()
        await transport.subscribe("bench", ["service.bench"], handler)
        await done.wait()
        consume_rate = count / (time.perf_counter() - started)
    finally:
        await transport.close()
        await _delete(
            [f"{namespace}.group.bench.{i}" for i in range(16)]
            + [f"{namespace}.group.bench.members", f"{namespace}.dead"],
            [f"{namespace}.topics", f"{namespace}.dead"],
        )
    return publish_rate, consume_rate


async def faststream_case(count: int) -> tuple[float, float]:
    queue_name = f"faststream-bench-{uuid.uuid4().hex[:8]}"
    queue = RabbitQueue(queue_name, durable=True, queue_type=QueueType.QUORUM)
    broker = RabbitBroker(URL, logger=None)
    done = asyncio.Event()
    seen = 0

    @broker.subscriber(queue)
    async def handle(_body: bytes) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            done.set()

    publisher = RabbitBroker(URL, logger=None)
    await publisher.connect()
    try:
        await publisher.declare_queue(queue)
        started = time.perf_counter()
        for _ in range(count):
            await publisher.publish(BODY, queue=queue, persist=True)
        publish_rate = count / (time.perf_counter() - started)
        started = time.perf_counter()
        await broker.start()
        await done.wait()
        consume_rate = count / (time.perf_counter() - started)
    finally:
        await broker.stop()
        await publisher.stop()
        await _delete([queue_name], [])
    return publish_rate, consume_rate


async def _delete(queues: list[str], exchanges: list[str]) -> None:
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    count = 5_000 if args.quick else 20_000
    atoll_publish, atoll_consume = asyncio.run(atoll_case(count))
    peer_publish, peer_consume = asyncio.run(faststream_case(count))
    print(f"publish, confirmed: atoll {atoll_publish:,.0f} msg/s, FastStream {peer_publish:,.0f}")
    print(f"consume, no-op:     atoll {atoll_consume:,.0f} msg/s, FastStream {peer_consume:,.0f}")
    cases = {
        "publish-confirmed": (atoll_publish, peer_publish),
        "consume-no-op": (atoll_consume, peer_consume),
    }
    print(
        json.dumps(
            {
                "benchmark": "rabbitmq_transport",
                "cases": {
                    name: {
                        "atoll": round(a),
                        "peer": round(p),
                        "unit": "msg/s",
                        "ratio": round(a / p, 2),
                    }
                    for name, (a, p) in cases.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
