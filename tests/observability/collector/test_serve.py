"""The entry points the CLI uses: serve_collector, and the module run as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from otlp import make_request, simple_trace
from prometheus_client.parser import text_string_to_metric_families

from atoll.observability.collector import CollectorError, SpanStore, serve_collector
from support import free_port

PB = {"content-type": "application/x-protobuf"}


async def test_serve_collector_until_cancelled_keeps_what_it_acknowledged(db_path):
    port = free_port()
    started = asyncio.Event()
    task = asyncio.create_task(
        serve_collector("127.0.0.1", port, db_path, started=started, log_level="warning")
    )
    await asyncio.wait_for(started.wait(), 15)
    tid, spans = simple_trace("served")
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{port}/v1/traces",
            content=make_request("served", spans).SerializeToString(),
            headers=PB,
        )
        assert response.status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store = SpanStore(db_path)
    await store.open()
    try:
        trace = await store.get_trace(tid)
        assert trace is not None
        assert len(trace.spans) == 3
    finally:
        await store.close()


async def test_serve_collector_on_a_taken_port_raises(db_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(CollectorError, match="cannot listen"):
            await serve_collector("127.0.0.1", taken.getsockname()[1], db_path)


def wait_ready(process: subprocess.Popen[bytes], port: int) -> None:
    """Wait until the collector process on ``port`` answers ``/readyz`` (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the collector process did not become ready"
        time.sleep(0.05)


async def test_module_runs_as_a_process_and_stops_on_sigterm(db_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atoll.observability.collector",
            "--port",
            str(port),
            "--db",
            str(db_path),
            "--max-age",
            "1h",
            "--max-spans",
            "5000",
            "--max-metric-series",
            "5",
            "--metric-expiry",
            "10m",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(process, port)
        tid, spans = simple_trace("proc")
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/traces",
            content=make_request("proc", spans).SerializeToString(),
            headers=PB,
        )
        assert response.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/traces/{tid.hex()}").status_code == 200
        gauges = [{"name": f"g{i}", "gauge": {"dataPoints": [{"asDouble": i}]}} for i in range(7)]
        body = {"resourceMetrics": [{"scopeMetrics": [{"metrics": gauges}]}]}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/metrics", json=body)
        assert response.json()["partialSuccess"]["rejectedDataPoints"] == "2"  # 5 series at most
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert {
            s.name: s.value for f in text_string_to_metric_families(scraped) for s in f.samples
        } == {f"g{i}": i for i in range(5)}
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output
    store = SpanStore(db_path)
    await store.open()
    try:
        assert await store.get_trace(tid) is not None
    finally:
        await store.close()


def _nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:  # noqa: PTH123 - a /proc file
        return int(stat.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("argv", "expected"), [([], 0), (["--nice", "10"], 10), (["--nice", "3"], 3)]
)
def test_the_collector_process_yields_the_cpu_at_its_nice_value(db_path, argv, expected):
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "atoll.observability.collector", "--port", str(port)),
            *("--db", str(db_path), "--log-level", "warning", *argv),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(process, port)
        assert _nice_of(process.pid) == max(expected, os.nice(0))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)


def test_a_nice_value_out_of_range_is_refused_naming_the_option(db_path):
    result = subprocess.run(
        [sys.executable, "-m", "atoll.observability.collector", "--nice", "25", "--db", db_path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--nice" in result.stderr
    assert "must be 0 to 19, not 25" in result.stderr


def test_lower_priority_never_raises_the_priority():
    code = (
        "import os; from atoll.observability.collector import lower_priority; "
        "print(lower_priority(5), lower_priority(2), lower_priority(0), os.nice(0))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    base = os.nice(0)
    after = max(5, base)
    assert result.stdout.split() == [str(after)] * 4
