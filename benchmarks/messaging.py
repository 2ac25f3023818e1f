"""Exactly-once messaging throughput and latency on the embedded transports.

    .venv/bin/python benchmarks/messaging.py [--quick]

Cases (last line of output, JSON):

* ``exactly-once-vs-raw-sqlite-commit``: messages/s through the whole exactly-once
  pipeline on the embedded SQLite transport (a producer unit of work commits a row and
  an outbox record; the relay publishes; the consumer's handler commits a row with its
  inbox record), producer and consumer in separate processes as ``atoll up`` runs them;
  against the raw rate of one-row SQLite commits on the same disk with atoll's default
  durability (WAL, synchronous=FULL). Target ratio 0.5.
* ``p50-latency-vs-5ms``: median delivery latency at light load (100 messages/s), from
  the producer's send inside its unit of work to the consumer's effect being committed;
  ratio is 5 ms over the median. Target 1.0.
* ``in-memory-exactly-once-vs-raw-sqlite-commit`` and ``p99-latency``: reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atoll import Command, Context, Service
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime, freeze_startup_heap
from atoll.transport import Transport
from atoll.transport.memory import InMemoryTransport
from atoll.transport.sqlite import SQLiteTransport


class Ping(Command):
    message_type = "bench.Ping"
    n: int
    sent_at: float


producer = Service(
    "bench-producer",
    schema=["CREATE TABLE IF NOT EXISTS sent (n INTEGER PRIMARY KEY, at REAL NOT NULL)"],
)
consumer = Service(
    "bench-consumer",
    schema=["CREATE TABLE IF NOT EXISTS got (n INTEGER PRIMARY KEY, at REAL NOT NULL)"],
)


class Progress:
    """What the consumer has seen; the benchmark's own bookkeeping."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()

    def reset(self, target: int) -> None:
        self.__init__()  # type: ignore[misc]
        self.target = target


progress = Progress()


@consumer.handles(Ping)
async def on_ping(ping: Ping, ctx: Context) -> None:
    await ctx.execute("INSERT INTO got (n, at) VALUES (?, ?)", ping.n, ping.sent_at)

    def committed() -> None:
        progress.received += 1
        progress.latencies.append(time.time() - ping.sent_at)
        if progress.received >= progress.target:
            progress.done.set()

    ctx.on_commit(committed)


async def send(runtime: ServiceRuntime, n: int) -> None:
    async with runtime.unit_of_work() as ctx:
        now = time.time()
        await ctx.execute("INSERT INTO sent (n, at) VALUES (?, ?)", n, now)
        ctx.send(Ping(n=n, sent_at=now), to=consumer.name, key=f"k{n % 64}")


async def produce_flood(runtime: ServiceRuntime, count: int, concurrency: int) -> None:
    queue = iter(range(count))

    async def worker() -> None:
        for n in queue:
            await send(runtime, n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def produce_paced(runtime: ServiceRuntime, count: int, rate: float) -> None:
    start = time.perf_counter()
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(runtime, n)


SYNCHRONOUS = os.environ.get("BENCH_SYNCHRONOUS", "FULL")


def make_runtime(service: Service, db: Path, transport: Transport, *, owns: bool) -> ServiceRuntime:
    return ServiceRuntime(
        service,
        database=SQLiteDatabase(db, synchronous=SYNCHRONOUS),  # type: ignore[arg-type]
        transport=transport,
        owns_transport=owns,
        max_batch=256,
        relay_batch=512,
    )


# -- child processes ------------------------------------------------------------------


async def child(role: str, workdir: Path, count: int, mode: str) -> None:
    progress.reset(count)
    transport = SQLiteTransport(workdir / "bus.db", synchronous=SYNCHRONOUS)  # type: ignore[arg-type]
    if role == "consumer":
        runtime = make_runtime(consumer, workdir / "consumer.db", transport, owns=True)
        await runtime.start()
        freeze_startup_heap()  # as `atoll up` does once its services have started
        print("ready", flush=True)
        cpu_start = time.process_time()
        main_start = resource.getrusage(resource.RUSAGE_THREAD)
        await progress.done.wait()
        end = time.time()
        cpu = time.process_time() - cpu_start
        main_end = resource.getrusage(resource.RUSAGE_THREAD)
        main_cpu = (main_end.ru_utime + main_end.ru_stime) - (
            main_start.ru_utime + main_start.ru_stime
        )
        dropped = runtime.tracing.dropped_spans  # before stop, which flushes the rest
        await runtime.stop()
        lat = sorted(progress.latencies)
        print(
            json.dumps(
                {
                    "end": end,
                    "cpu": cpu,
                    "main_cpu": main_cpu,
                    "dropped_spans": dropped,
                    "p50": statistics.median(lat),
                    "p99": lat[int(len(lat) * 0.99) - 1],
                }
            ),
            flush=True,
        )
        return
    runtime = make_runtime(producer, workdir / "producer.db", transport, owns=True)
    await runtime.start()
    freeze_startup_heap()  # as `atoll up` does once its services have started
    start = time.time()
    cpu_start = time.process_time()
    print(json.dumps({"start": start}), flush=True)
    if mode == "flood":
        await produce_flood(runtime, count, concurrency=64)
    else:
        await produce_paced(runtime, count, rate=100.0)
    # Keep the relay running until the parent stops us.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(
        json.dumps(
            {"cpu": time.process_time() - cpu_start, "dropped_spans": runtime.tracing.dropped_spans}
        ),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runtime.stop()


def run_pair(count: int, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = str(Path(__file__).resolve())
        cons = subprocess.Popen(
            [sys.executable, script, "--child", "consumer", str(workdir), str(count), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cons.stdout is not None
        assert cons.stdout.readline().strip() == "ready"
        prod = subprocess.Popen(
            [sys.executable, script, "--child", "producer", str(workdir), str(count), mode],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        assert prod.stdout is not None
        start = json.loads(prod.stdout.readline())["start"]
        result = json.loads(cons.stdout.readline())
        cons.wait(60)
        assert prod.stdin is not None
        prod.stdin.write("cpu\n")
        prod.stdin.flush()
        produced = json.loads(prod.stdout.readline())
        producer_cpu = produced["cpu"]
        prod.stdin.close()
        prod.wait(60)
        return {
            "rate": count / (result["end"] - start),
            "cpu_us_per_message": (producer_cpu + result["cpu"]) / count * 1e6,
            "producer_cpu_us_per_message": producer_cpu / count * 1e6,
            "consumer_cpu_us_per_message": result["cpu"] / count * 1e6,
            "consumer_main_thread_cpu_us_per_message": result["main_cpu"] / count * 1e6,
            "p50": result["p50"],
            "p99": result["p99"],
            # Spans the exporters dropped because their queue was full (tracing on).
            "dropped_spans": result["dropped_spans"] + produced["dropped_spans"],
        }


# -- in one process, in-memory transport ---------------------------------------------


async def in_memory(count: int) -> float:
    progress.reset(count)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        transport = InMemoryTransport()
        prod = make_runtime(producer, workdir / "p.db", transport, owns=False)
        cons = make_runtime(consumer, workdir / "c.db", transport, owns=False)
        await transport.connect()
        await cons.start()
        await prod.start()
        start = time.perf_counter()
        await produce_flood(prod, count, concurrency=64)
        await progress.done.wait()
        elapsed = time.perf_counter() - start
        await prod.stop()
        await cons.stop()
        await transport.close()
    return count / elapsed


# -- the limit ------------------------------------------------------------------------


def raw_commits(count: int) -> float:
    """One-row commits with the same durability as atoll (default WAL, synchronous=FULL)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, at REAL NOT NULL)")
        start = time.perf_counter()
        for n in range(count):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (n, at) VALUES (?, ?)", (n, time.time()))
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite durability for atoll and the raw limit alike (atoll ships FULL)",
    )
    parser.add_argument("--child", nargs=4, metavar=("ROLE", "DIR", "COUNT", "MODE"))
    args = parser.parse_args()
    os.environ["BENCH_SYNCHRONOUS"] = args.synchronous
    global SYNCHRONOUS  # noqa: PLW0603 - children read it from the environment too
    SYNCHRONOUS = args.synchronous
    if args.child:
        role, workdir, count, mode = args.child
        asyncio.run(child(role, Path(workdir), int(count), mode))
        return
    flood = 5_000 if args.quick else 30_000
    paced = 300 if args.quick else 1_000
    raw = raw_commits(3_000 if args.quick else 10_000)
    print(f"raw one-row commits (WAL, synchronous={SYNCHRONOUS}): {raw:,.0f}/s")
    e2e = run_pair(flood, "flood")
    print(f"exactly-once, embedded SQLite transport, 2 processes: {e2e['rate']:,.0f} msg/s")
    memory = asyncio.run(in_memory(flood))
    print(f"exactly-once, in-memory transport, 1 process: {memory:,.0f} msg/s")
    light = run_pair(paced, "paced")
    p50_ms, p99_ms = light["p50"] * 1000, light["p99"] * 1000
    print(f"latency at 100 msg/s: p50 {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms")
    cases = {
        "exactly-once-vs-raw-sqlite-commit": {
            "atoll": round(e2e["rate"], 1),
            "peer": round(raw, 1),
            "unit": "messages/s vs one-row commits/s",
            "ratio": round(e2e["rate"] / raw, 3),
        },
        "p50-latency-vs-5ms": {
            "atoll": round(p50_ms, 3),
            "peer": 5.0,
            "unit": "ms",
            "ratio": round(5.0 / p50_ms, 3),
        },
        "in-memory-exactly-once-vs-raw-sqlite-commit": {
            "atoll": round(memory, 1),
            "peer": round(raw, 1),
            "unit": "messages/s vs one-row commits/s",
            "ratio": round(memory / raw, 3),
        },
        "p99-latency-vs-5ms": {
            "atoll": round(p99_ms, 3),
            "peer": 5.0,
            "unit": "ms",
            "ratio": round(5.0 / p99_ms, 3),
        },
    }
    print(json.dumps({"benchmark": "messaging", "cases": cases}))


if __name__ == "__main__":
    main()
