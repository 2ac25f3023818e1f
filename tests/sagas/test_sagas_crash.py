"""Kill -9 the orchestrator and the participants at random moments while sagas run.

Three processes on the embedded SQLite transport (see atoll/testing/_saga_crash.py).
After the killing stops and every process is back, every saga must end COMPLETED or
COMPENSATED, every message must have had one effect, and each participant's effect must
exist exactly for the sagas that completed.
"""

import asyncio
import os
import random
import signal
import sys

import pytest

from atoll.persistence import DatabaseError, SQLiteDatabase
from atoll.testing import wait_until
from atoll.transport.sqlite import SQLiteTransport

ROLES = ["saga-orchestrator", "saga-bank", "saga-store"]


class Cluster:
    def __init__(self, tmp_path, count):
        self.tmp_path = tmp_path
        self.count = count
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.lives = dict.fromkeys(ROLES, 0)

    async def spawn(self, role, crash_point=None):
        env = dict(os.environ)
        env.pop("ATOLL_CRASHPOINT", None)
        if crash_point is not None:
            env["ATOLL_CRASHPOINT"] = crash_point
        self.lives[role] += 1
        with (self.tmp_path / f"{role}-{self.lives[role]}.log").open("wb") as log:
            self.processes[role] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "atoll.testing._saga_crash",
                role,
                "sqlite:///bus.db",
                f"sqlite:///{role}.db",
                str(self.count),
                cwd=self.tmp_path,
                env=env,
                stdout=log,
                stderr=log,
            )

    async def kill(self, role):
        process = self.processes[role]
        if process.returncode is None:
            process.kill()
        assert await process.wait() == -signal.SIGKILL

    def log(self, role):
        return self.tmp_path / f"{role}-{self.lives[role]}.log"

    async def stop(self):
        for role in self.processes:
            # A process killed and restarted at the end may still be importing: SIGTERM
            # before its handler is installed would end it uncleanly.
            await wait_until(
                lambda role=role: "started" in self.log(role).read_text(errors="replace"),
                timeout=30,
                what=f"{role} to start",
            )
        for role, process in self.processes.items():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(process.wait(), 30)
                assert code == 0, f"{role} did not stop cleanly; see {self.tmp_path}"

    async def abandon(self):
        for process in self.processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()


async def open_db(tmp_path, role):
    database = SQLiteDatabase(tmp_path / f"{role}.db")
    await database.open()
    return database


async def states(tmp_path):
    try:
        database = await open_db(tmp_path, "saga-orchestrator")
    except DatabaseError:
        return {}
    try:
        async with database.read() as session:
            rows = await session.fetch_all("SELECT saga_id, state FROM atoll_sagas")
    except DatabaseError:
        return {}
    finally:
        await database.close()
    return {r[0]: r[1] for r in rows}


async def run_with_kills(tmp_path, *, count, kills, seed, timeout):
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, count)
    try:
        # The first orchestrator dies in the middle of a transition, for certain.
        await cluster.spawn("saga-orchestrator", crash_point="saga.after_transition@15")
        await cluster.spawn("saga-bank")
        await cluster.spawn("saga-store")
        first = cluster.processes["saga-orchestrator"]
        code = await asyncio.wait_for(first.wait(), 60)
        assert code == -signal.SIGKILL, f"the orchestrator exited {code}; see {tmp_path}"
        await cluster.spawn("saga-orchestrator")
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            role = rng.choice(ROLES)
            await cluster.kill(role)
            await cluster.spawn(role)
        orchestrator = cluster.processes["saga-orchestrator"]
        if orchestrator.returncode is not None:
            await cluster.spawn("saga-orchestrator")

        async def all_ended():
            found = await states(tmp_path)
            return len(found) == count and set(found.values()) <= {"COMPLETED", "COMPENSATED"}

        await wait_until(all_ended, timeout=timeout, interval=0.2, what=f"{count} sagas to end")
        await cluster.stop()
    finally:
        await cluster.abandon()
    await check(tmp_path, count)


async def check(tmp_path, count):
    ended = await states(tmp_path)
    orchestrator = await open_db(tmp_path, "saga-orchestrator")
    try:
        async with orchestrator.read() as session:
            logged = {r[0]: r[1] for r in await session.fetch_all("SELECT * FROM done_log")}
    finally:
        await orchestrator.close()
    completed = {s for s, state in ended.items() if state == "COMPLETED"}
    assert set(logged) == completed, "the local step ran for a saga that did not complete"
    assert set(logged.values()) == ({1} if completed else set()), "the local step ran twice"
    expected_refusals = {f"s{n}" for n in range(count) if n % 7 == 3 or n % 5 == 4}
    assert not completed & expected_refusals, "a refused saga completed"
    for role in ("saga-bank", "saga-store"):
        database = await open_db(tmp_path, role)
        try:
            async with database.read() as session:
                twice = await session.fetch_all(
                    "SELECT message_id, kind FROM handled WHERE times > 1"
                )
                effects = {
                    r[0]: (r[1], r[2])
                    for r in await session.fetch_all("SELECT saga_id, done, undone FROM effects")
                }
        finally:
            await database.close()
        assert twice == [], f"{role}: messages with two effects: {twice[:5]}"
        for saga_id, state in ended.items():
            effect = effects.get(saga_id, (0, 0))
            if state == "COMPLETED":
                assert effect == (1, 0), f"{role}: {saga_id} completed with effect {effect}"
            else:
                assert effect in ((0, 0), (1, 1)), f"{role}: {saga_id} compensated, effect {effect}"
    transport = SQLiteTransport(tmp_path / "bus.db")
    await transport.connect()
    try:
        dead = await transport.dead_letters.list()
    finally:
        await transport.close()
    assert dead == [], [d.reason for d in dead][:3]


async def test_kill_9_anywhere_leaves_every_saga_ended_and_every_effect_once(tmp_path):
    await run_with_kills(tmp_path, count=40, kills=4, seed=7, timeout=90)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill_9_soak_with_a_thousand_sagas(tmp_path):
    await run_with_kills(tmp_path, count=1000, kills=40, seed=11, timeout=600)
