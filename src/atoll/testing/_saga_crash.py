"""A saga system for kill -9 tests: an orchestrator and two participants, one process each.

``python -m atoll.testing._saga_crash ROLE TRANSPORT_URL DATABASE_URL COUNT`` runs one
role until SIGTERM. ``saga-orchestrator`` starts sagas ``s0 .. s{COUNT-1}`` (those not
started yet, so a restarted orchestrator carries on), each: debit at ``saga-bank``,
deliver at ``saga-store``, then a local log entry; compensations credit and recall.
The bank refuses every saga whose number is 3 mod 7 and the store every one that is
4 mod 5, so some sagas compensate. Participants are idempotent per saga (as saga
participants must be, since a timed-out attempt is retried) and count every handled
message, so a test can check that no message had two effects.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import msgspec

from atoll.messages import Command, Reply
from atoll.persistence import database_from_url
from atoll.sagas import Call, Retry, Saga, SagaContext, SagaEngine, SagaExistsError, Send, Step
from atoll.service import Context, Service, ServiceRuntime
from atoll.transport import transport_from_url


class Debit(Command):
    """Take the saga's amount."""

    message_type = "crash.Debit"
    n: int


class Debited(Reply):
    """The amount is taken."""

    message_type = "crash.Debited"


class Refused(Reply):
    """Nothing was taken."""

    message_type = "crash.Refused"


class Credit(Command):
    """Give the saga's amount back (nothing to do if it was never taken)."""

    message_type = "crash.Credit"
    n: int


class Credited(Reply):
    """The amount is back."""

    message_type = "crash.Credited"


class Deliver(Command):
    """Deliver the saga's goods."""

    message_type = "crash.Deliver"
    n: int


class Delivered(Reply):
    """The goods are on their way."""

    message_type = "crash.Delivered"


class Undeliverable(Reply):
    """Nothing was sent."""

    message_type = "crash.Undeliverable"


class Recall(Command):
    """Call the goods back (nothing to do if they never left)."""

    message_type = "crash.Recall"
    n: int


class Recalled(Reply):
    """The goods are back."""

    message_type = "crash.Recalled"


class Flow(msgspec.Struct):
    """The saga's data."""

    n: int


def _debit(flow: Flow) -> Debit:
    return Debit(n=flow.n)


def _credit(flow: Flow) -> Credit:
    return Credit(n=flow.n)


def _deliver(flow: Flow) -> Deliver:
    return Deliver(n=flow.n)


def _recall(flow: Flow) -> Recall:
    return Recall(n=flow.n)


async def _log(saga: SagaContext[Flow]) -> None:
    await saga.ctx.execute(
        "INSERT INTO done_log (saga_id, times) VALUES (?, 1)"
        " ON CONFLICT (saga_id) DO UPDATE SET times = done_log.times + 1",
        saga.saga_id,
    )


_ACTION_RETRY = Retry(attempts=4, backoff=0.5, max_backoff=2.0)
_COMPENSATION_RETRY = Retry(attempts=30, backoff=0.5, max_backoff=2.0)

SAGA = Saga(
    "crash-flow",
    Flow,
    timeout=120.0,
    steps=[
        Step(
            "debit",
            Send(
                "saga-bank",
                _debit,
                success=Debited,
                failure=Refused,
                timeout=2.0,
                retry=_ACTION_RETRY,
            ),
            compensation=Send(
                "saga-bank", _credit, success=Credited, timeout=2.0, retry=_COMPENSATION_RETRY
            ),
        ),
        Step(
            "deliver",
            Send(
                "saga-store",
                _deliver,
                success=Delivered,
                failure=Undeliverable,
                timeout=2.0,
                retry=_ACTION_RETRY,
            ),
            compensation=Send(
                "saga-store", _recall, success=Recalled, timeout=2.0, retry=_COMPENSATION_RETRY
            ),
        ),
        Step("log", Call(_log)),
    ],
)

orchestrator = Service(
    "saga-orchestrator",
    schema=[
        "CREATE TABLE IF NOT EXISTS done_log (saga_id TEXT PRIMARY KEY, times INTEGER NOT NULL)"
    ],
)
engine = SagaEngine(orchestrator, [SAGA], poll_interval=0.2)

_PARTICIPANT_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS handled (
        message_id TEXT PRIMARY KEY, saga_id TEXT NOT NULL, kind TEXT NOT NULL,
        times INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS effects (
        saga_id TEXT PRIMARY KEY, done INTEGER NOT NULL, undone INTEGER NOT NULL
    )""",
]
bank = Service("saga-bank", schema=_PARTICIPANT_SCHEMA)
store = Service("saga-store", schema=_PARTICIPANT_SCHEMA)


async def _count(ctx: Context, kind: str) -> str:
    """Count this message's effect; return the saga id (the command's correlation id)."""
    assert ctx.envelope is not None
    await ctx.execute(
        "INSERT INTO handled (message_id, saga_id, kind, times) VALUES (?, ?, ?, 1)"
        " ON CONFLICT (message_id) DO UPDATE SET times = handled.times + 1",
        ctx.envelope.id,
        ctx.correlation_id,
        kind,
    )
    return ctx.correlation_id


async def _do(ctx: Context, kind: str) -> None:
    saga_id = await _count(ctx, kind)
    await ctx.execute(
        "INSERT INTO effects (saga_id, done, undone) VALUES (?, 1, 0) ON CONFLICT DO NOTHING",
        saga_id,
    )


async def _undo(ctx: Context, kind: str) -> None:
    saga_id = await _count(ctx, kind)
    await ctx.execute("UPDATE effects SET undone = 1 WHERE saga_id = ?", saga_id)


@bank.handles(Debit)
async def _on_debit(command: Debit, ctx: Context) -> None:
    if command.n % 7 == 3:
        await _count(ctx, "refuse")
        ctx.reply(Refused())
        return
    await _do(ctx, "debit")
    ctx.reply(Debited())


@bank.handles(Credit)
async def _on_credit(_command: Credit, ctx: Context) -> None:
    await _undo(ctx, "credit")
    ctx.reply(Credited())


@store.handles(Deliver)
async def _on_deliver(command: Deliver, ctx: Context) -> None:
    if command.n % 5 == 4:
        await _count(ctx, "refuse")
        ctx.reply(Undeliverable())
        return
    await _do(ctx, "deliver")
    ctx.reply(Delivered())


@store.handles(Recall)
async def _on_recall(_command: Recall, ctx: Context) -> None:
    await _undo(ctx, "recall")
    ctx.reply(Recalled())


ROLES = {s.name: s for s in (orchestrator, bank, store)}


async def start_sagas(runtime: ServiceRuntime, count: int) -> None:
    """Start the sagas not started yet, one unit of work each."""
    async with runtime.database.read() as session:
        rows = await session.fetch_all("SELECT saga_id FROM atoll_sagas")
    started = {r[0] for r in rows}
    for n in range(count):
        saga_id = f"s{n}"
        if saga_id in started:
            continue
        try:
            async with runtime.unit_of_work() as ctx:
                await engine.start(ctx, SAGA, Flow(n=n), saga_id=saga_id)
        except SagaExistsError:
            continue


async def main(role: str, transport_url: str, database_url: str, count: int) -> None:
    """Run ``role``; the orchestrator also starts ``count`` sagas."""
    here = Path.cwd()
    runtime = ServiceRuntime(
        ROLES[role],
        database=database_from_url(database_url, base_dir=here),
        transport=transport_from_url(transport_url, base_dir=here),
        max_batch=32,
        relay_batch=64,
        relay_poll_interval=0.2,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await runtime.start()
    sys.stdout.write("started\n")
    sys.stdout.flush()
    if role == orchestrator.name:
        await start_sagas(runtime, count)
    await stop.wait()
    await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
