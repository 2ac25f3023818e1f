"""The standard OpenTelemetry variables atoll reads beyond the endpoint: the switches that
turn traces off, the protocol, and the batch processor's export timeout."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from atoll.cli._up import Supervisor
from atoll.config import load_config
from atoll.observability import Tracing, otlp_endpoint, tracing_disabled
from atoll.observability._otlp import FastBatchSpanProcessor, FastOTLPSpanExporter
from atoll.observability._tracing import unsupported_protocol

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_SDK_DISABLED": "TRUE"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": " None "},
    ],
)
def test_the_standard_switches_turn_traces_off_whatever_the_endpoint(
    environ: dict[str, str],
) -> None:
    assert tracing_disabled(environ)
    assert otlp_endpoint({**ENDPOINT, **environ}) is None


def test_traces_stay_on_otherwise() -> None:
    assert not tracing_disabled({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"})
    assert otlp_endpoint(ENDPOINT) == "http://127.0.0.1:4318/v1/traces"


def test_a_protocol_other_than_http_protobuf_is_named() -> None:
    assert unsupported_protocol({}) is None
    assert unsupported_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) is None
    assert unsupported_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "grpc",
    )
    # The traces-specific variable wins, either way, as the SDK reads them.
    assert (
        unsupported_protocol(
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            }
        )
        is None
    )
    assert unsupported_protocol(
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
        }
    ) == ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")


def test_a_service_warns_about_a_protocol_it_does_not_speak(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING, logger="atoll.tracing"):
        tracing = Tracing("orders", endpoint="http://127.0.0.1:9/v1/traces")
    try:
        assert tracing.enabled
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported" in warning
        assert "http/protobuf" in warning
    finally:
        tracing.shutdown()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1/traces"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_the_bsp_export_timeout_bounds_one_export(
    silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "300")
    exporter = FastOTLPSpanExporter(endpoint=silent_endpoint)  # its own timeout: 10 s
    processor = FastBatchSpanProcessor(exporter)
    try:
        assert processor.export_timeout == pytest.approx(0.3)
        started = time.monotonic()
        exporter.export_encoded(b"\x0a\x00")
        assert time.monotonic() - started < 3.0, "the export outlived OTEL_BSP_EXPORT_TIMEOUT"
    finally:
        processor.shutdown()


def test_the_exporter_timeout_stays_when_it_is_the_shorter(silent_endpoint: str) -> None:
    exporter = FastOTLPSpanExporter(endpoint=silent_endpoint, timeout=0.2)
    processor = FastBatchSpanProcessor(exporter, export_timeout_millis=30_000)
    try:
        assert exporter._client._timeout == pytest.approx(0.2)
    finally:
        processor.shutdown()


def test_atoll_up_starts_no_collector_when_traces_are_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "atoll.toml"
    config.write_text(
        '[system]\ntransport = "sqlite:///bus.db"\n\n'
        '[services.orders]\napp = "examples.shop.orders:service"\nport = 18081\n'
    )
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    console = Console(file=None, quiet=True)
    on = Supervisor(load_config(config), ["orders"], console=console)
    assert on.collector is not None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    off = Supervisor(load_config(config), ["orders"], console=console)
    assert off.collector is None
    assert all(child.name != "traces" for child in off.children)
