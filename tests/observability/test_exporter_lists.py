"""OTEL_TRACES_EXPORTER / OTEL_LOGS_EXPORTER name exporters (a list); atoll exports OTLP
only when the list names otlp, as it already does for OTEL_METRICS_EXPORTER."""

import pytest

from atoll.observability._log_export import otlp_logs_endpoint
from atoll.observability._metric_export import otlp_metrics_endpoint
from atoll.observability._tracing import otlp_endpoint

BASE = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize("value", ["console", "zipkin", "none,console"])
def test_an_exporter_list_without_otlp_turns_otlp_export_off(value):
    assert otlp_metrics_endpoint({**BASE, "OTEL_METRICS_EXPORTER": value}) is None  # already
    assert otlp_endpoint({**BASE, "OTEL_TRACES_EXPORTER": value}) is None
    assert otlp_logs_endpoint({**BASE, "OTEL_LOGS_EXPORTER": value}) is None


def test_a_list_naming_otlp_keeps_it():
    assert otlp_endpoint({**BASE, "OTEL_TRACES_EXPORTER": "otlp,console"}) is not None
