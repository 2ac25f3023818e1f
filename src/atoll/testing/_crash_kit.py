"""Exactly-once under crashes: kill the producer or the consumer at each step, then check.

Two kits share one verification:

* :class:`ExactlyOnceCrashConformance` runs each role in its own process and kills it
  with SIGKILL at a crash point. For transports that several processes share (the
  embedded SQLite transport, brokers).
* :class:`InProcessCrashConformance` simulates the crash inside one process (the
  crashed runtime is abandoned without draining, settling or flushing, as a killed
  process would leave it) for the in-memory transport, which dies with its process.
"""

from __future__ import annotations

import abc
import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from atoll import _crash
from atoll.persistence import Database, DatabaseError, SQLiteDatabase, database_from_url
from atoll.service import ServiceRuntime
from atoll.testing._crash_system import consumer, produce, producer
from atoll.testing._waiting import wait_until
from atoll.transport import Transport, transport_from_url

#: (role, crash point with the hit at which it fires)
CRASH_POINTS = [
    pytest.param("producer", "producer.after_commit@40", id="producer-after-commit"),
    pytest.param("producer", "relay.before_publish@3", id="relay-before-publish"),
    pytest.param("producer", "relay.after_publish@3", id="relay-mid-batch"),
    pytest.param("consumer", "consumer.mid_batch@30", id="consumer-mid-batch"),
    pytest.param("consumer", "consumer.before_ack@3", id="consumer-after-commit-before-ack"),
]


class SimulatedCrash(BaseException):
    """Unwinds a task as a crash would: no ``except Exception`` handler catches it."""


async def effects_done(database: Database, count: int) -> bool:
    """Whether the consumer has an effect for every message."""
    try:
        async with database.read() as session:
            return int(await session.fetch_value("SELECT count(*) FROM effects") or 0) >= count
    except DatabaseError:
        return False  # the consumer has not created its tables yet


async def check_exactly_once(database: Database, count: int, transport: Transport) -> None:
    """Every message had exactly one effect, in per-key order, and none is dead."""
    async with database.read() as session:
        rows = await session.fetch_all("SELECT n, times FROM effects ORDER BY n")
        violations = await session.fetch_value("SELECT sum(violations) FROM key_progress")
    assert [r[0] for r in rows] == list(range(count)), "some messages had no effect"
    repeated = [r[0] for r in rows if r[1] != 1]
    assert not repeated, f"messages with more than one effect: {repeated[:10]}"
    assert not violations, f"{violations} messages arrived out of their key's order"
    dead = await transport.dead_letters.list()
    assert dead == [], f"dead letters: {[d.reason for d in dead][:3]}"


class ExactlyOnceCrashConformance(abc.ABC):
    """Kill -9 a real process at each step of the pipeline; every effect happens once.

    Implement :meth:`transport_url` (and :meth:`database_url` for a non-SQLite database)::

        class TestSQLiteCrashes(ExactlyOnceCrashConformance):
            def transport_url(self, tmp_path):
                return f"sqlite:///{tmp_path}/bus.db"
    """

    count = 300
    timeout = 90.0

    @abc.abstractmethod
    def transport_url(self, tmp_path: Path) -> str:
        """A URL of a transport with empty topics, reachable from other processes."""

    def database_url(self, tmp_path: Path, role: str) -> str:
        """The database of ``role`` (a fresh SQLite file by default)."""
        return f"sqlite:///{tmp_path}/{role}.db"

    async def _spawn(
        self, tmp_path: Path, role: str, crash_point: str | None, log_name: str
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env.pop("ATOLL_CRASHPOINT", None)
        if crash_point is not None:
            env["ATOLL_CRASHPOINT"] = crash_point
        log = (tmp_path / log_name).open("wb")
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "atoll.testing._crash_worker",
                role,
                self.transport_url(tmp_path),
                self.database_url(tmp_path, role),
                str(self.count),
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()

    @pytest.mark.parametrize(("role", "crash_point"), CRASH_POINTS)
    async def test_kill_9_then_restart_leaves_exactly_one_effect_per_message(
        self, tmp_path: Path, role: str, crash_point: str
    ) -> None:
        other = "consumer" if role == "producer" else "producer"
        processes = {
            role: await self._spawn(tmp_path, role, crash_point, f"{role}-1.log"),
            other: await self._spawn(tmp_path, other, None, f"{other}.log"),
        }
        try:
            crashed = processes[role]
            try:
                code = await asyncio.wait_for(crashed.wait(), self.timeout)
            except TimeoutError:
                pytest.fail(f"{role} never reached {crash_point}; see {tmp_path}/{role}-1.log")
            log = (tmp_path / f"{role}-1.log").read_text(errors="replace")
            assert code == -signal.SIGKILL, f"{role} exited with {code}, not SIGKILL:\n{log}"
            processes[role] = await self._spawn(tmp_path, role, None, f"{role}-2.log")
            database = database_from_url(self.database_url(tmp_path, "consumer"), base_dir=tmp_path)
            await database.open()
            try:
                await wait_until(
                    lambda: effects_done(database, self.count),
                    timeout=self.timeout,
                    what=f"{self.count} effects after the restart",
                )
                for name, process in processes.items():
                    process.send_signal(signal.SIGTERM)
                    assert await asyncio.wait_for(process.wait(), 30) == 0, f"{name} stop failed"
                transport = transport_from_url(self.transport_url(tmp_path), base_dir=tmp_path)
                await transport.connect()
                try:
                    await check_exactly_once(database, self.count, transport)
                finally:
                    await transport.close()
            finally:
                await database.close()
        finally:
            for process in processes.values():
                if process.returncode is None:
                    process.kill()
                    await process.wait()


class InProcessCrashConformance(abc.ABC):
    """The crash tests for a transport that lives inside one process.

    The crashed runtime is abandoned at the crash point (tasks cancelled, nothing
    drained, settled or flushed; its database connection closed with whatever was
    uncommitted rolled back) and a new runtime takes over its database, while the
    transport lives on, as a broker outlives a killed service.
    """

    count = 300
    timeout = 60.0

    @abc.abstractmethod
    async def make_transport(self) -> Transport:
        """A new, unconnected transport."""

    @pytest.mark.parametrize(("role", "crash_point"), CRASH_POINTS)
    async def test_simulated_crash_then_restart_leaves_exactly_one_effect_per_message(
        self, tmp_path: Path, role: str, crash_point: str
    ) -> None:
        name, _, hits = crash_point.partition("@")
        crashed = asyncio.Event()

        def crash(point: str) -> None:
            crashed.set()
            raise SimulatedCrash(point)

        transport = await self.make_transport()
        await transport.connect()

        def runtime(role_name: str) -> ServiceRuntime:
            return ServiceRuntime(
                producer if role_name == "producer" else consumer,
                database=SQLiteDatabase(tmp_path / f"{role_name}.db"),
                transport=transport,
                owns_transport=False,
                max_batch=16,
                relay_batch=16,
                # A crashed relay's lease lapses after this; a dead process's at once.
                relay_lease_ttl=1.5,
            )

        runtimes = {"producer": runtime("producer"), "consumer": runtime("consumer")}
        _crash.arm(name, hits=int(hits), handler=crash)
        producing: asyncio.Task[None] | None = None
        try:
            await runtimes["consumer"].start()
            await runtimes["producer"].start()
            producing = asyncio.get_running_loop().create_task(
                produce(runtimes["producer"], self.count)
            )
            await asyncio.wait_for(crashed.wait(), self.timeout)
            for _ in range(3):
                await asyncio.sleep(0)
            _crash.arm(None)
            if role == "producer" and not producing.done():
                producing.cancel()
            await runtimes[role].abandon()
            runtimes[role] = runtime(role)
            await runtimes[role].start()
            if role == "producer":
                if producing.done() and not producing.cancelled():
                    producing.exception()  # the simulated crash: expected, and read
                producing = asyncio.get_running_loop().create_task(
                    produce(runtimes["producer"], self.count)
                )
            database = runtimes["consumer"].database
            await wait_until(
                lambda: effects_done(database, self.count),
                timeout=self.timeout,
                what=f"{self.count} effects after the restart",
            )
            await producing
            await check_exactly_once(database, self.count, transport)
        finally:
            _crash.arm(None)
            if producing is not None and not producing.done():
                producing.cancel()
            for rt in runtimes.values():
                await rt.stop()
            await transport.close()
