"""kill -9 of the collector process while exports stream in: every export it answered 200
is stored whole after a restart, none is stored in part, and the file stays sound."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
from otlp import T0, make_request, make_span, span_id, trace_id
from test_logs import PB, log_request, record
from test_serve import free_port, wait_ready

from atoll.observability.collector import LogQuery, SpanStore

SPANS_PER_EXPORT = 40
LOGS_PER_EXPORT = 15


@dataclass
class Sent:
    """Every export attempted, by trace id, and which of them were answered 200."""

    spans: list[bytes] = field(default_factory=list)
    spans_acked: set[bytes] = field(default_factory=set)
    logs: list[bytes] = field(default_factory=list)
    logs_acked: set[bytes] = field(default_factory=set)


def start(port: int, db: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atoll.observability.collector",
            "--port",
            str(port),
            "--db",
            db,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_ready(process, port)
    return process


def export_until(stop: threading.Event, port: int, sent: Sent, rng: random.Random) -> None:
    """One client: span exports (one trace each) and log exports, until ``stop``."""
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            tid = trace_id(rng.getrandbits(120) | 1)
            if rng.random() < 0.7:
                spans = [
                    make_span(tid, span_id(), name=f"op{i}", start_ns=T0 + i)
                    for i in range(SPANS_PER_EXPORT)
                ]
                body, path, acked = make_request("svc", spans), "/v1/traces", sent.spans_acked
                sent.spans.append(tid)
            else:
                records = [
                    record(f"line {i}", tid=tid, sid=span_id(), time_ns=T0 + i)
                    for i in range(LOGS_PER_EXPORT)
                ]
                body, path, acked = log_request(records), "/v1/logs", sent.logs_acked
                sent.logs.append(tid)
            try:
                response = client.post(base + path, content=body.SerializeToString(), headers=PB)
            except httpx.TransportError:
                time.sleep(0.02)  # killed, or not back yet: that export's fate is unknown
                continue
            if response.status_code == 200:
                acked.add(tid)


async def test_kill_9_during_ingest_keeps_every_acknowledged_export_whole(tmp_path):
    db = str(tmp_path / "traces.db")
    port = free_port()
    rng = random.Random(20261127)
    sent = Sent()
    process = start(port, db)
    kills = 0
    try:
        for _ in range(3):
            stop = threading.Event()
            clients = [
                threading.Thread(
                    target=export_until, args=(stop, port, sent, random.Random(rng.random()))
                )
                for _ in range(3)
            ]
            for client in clients:
                client.start()
            time.sleep(rng.uniform(0.4, 1.0))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            assert process.stdout is not None
            assert b"Traceback" not in process.stdout.read()
            process.stdout.close()
            kills += 1
            time.sleep(0.1)  # exports meet a closed port for a moment
            process = start(port, db)
            time.sleep(0.3)  # and go on to the restarted collector
            stop.set()
            for client in clients:
                client.join(10)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    assert "Traceback" not in output, output
    assert kills == 3
    assert len(sent.spans_acked) > 10, "too few exports were answered to test anything"
    assert len(sent.logs_acked) > 3, "too few log exports were answered to test anything"
    unanswered = len(sent.spans) + len(sent.logs) - len(sent.spans_acked) - len(sent.logs_acked)
    assert unanswered >= 3, "no export was cut off by a kill: the crash window was missed"

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = SpanStore(db)
    await store.open()
    try:
        partial = []
        for tid in sent.spans:
            trace = await store.get_trace(tid)
            count = 0 if trace is None else len(trace.spans)
            if tid in sent.spans_acked:
                assert count == SPANS_PER_EXPORT, f"an acknowledged export lost spans: {count}"
            elif count not in (0, SPANS_PER_EXPORT):
                partial.append(count)
        for tid in sent.logs:
            count = len(await store.search_logs(LogQuery(trace_id=tid, limit=1000)))
            if tid in sent.logs_acked:
                assert count == LOGS_PER_EXPORT, f"an acknowledged log export lost records: {count}"
            elif count not in (0, LOGS_PER_EXPORT):
                partial.append(count)
        assert partial == [], "exports stored in part"
    finally:
        await store.close()
