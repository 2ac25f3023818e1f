import multiprocessing
import time

from atoll.persistence import SQLiteDatabase
from atoll.persistence._sqlite import connect_sqlite
from atoll.testing import DatabaseConformance


class TestSQLiteDatabase(DatabaseConformance):
    async def make_database(self, tmp_path, clock):
        return SQLiteDatabase(tmp_path / "service.db", clock=clock)


def _open_at(path: str, start: float, results) -> None:
    while time.time() < start:  # all processes reach the open together
        pass
    try:
        conn = connect_sqlite(path, synchronous="FULL", busy_timeout=10)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("COMMIT")
        conn.close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_processes_opening_one_new_file_together_all_get_in(tmp_path):
    # Switching a new file to WAL answers SQLITE_BUSY at once (no busy handler) while
    # another process does the same; `atoll up` starts every service on one new bus.db.
    context = multiprocessing.get_context("fork")
    outcomes = []
    for n in range(30):
        results = context.Queue()
        start = time.time() + 0.5
        workers = [
            context.Process(target=_open_at, args=(str(tmp_path / f"{n}.db"), start, results))
            for _ in range(6)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        outcomes += [results.get(timeout=5) for _ in workers]
    assert [o for o in outcomes if o != "ok"] == []


def test_savepoint_journals_stay_in_memory(tmp_path):
    # Units of work are savepoints; with temp_store=MEMORY their sub-journal never spills
    # to a temporary file (two pwrite() calls per page otherwise).
    conn = connect_sqlite(tmp_path / "t.db", synchronous="FULL", busy_timeout=10)
    try:
        assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    finally:
        conn.close()
