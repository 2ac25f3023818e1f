"""``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG``, as
the README says, on atoll's lean per-message spans: roots are sampled at about the ratio
and a span with a parent follows the parent's sampled flag, whatever the ratio says."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Command, Context, Service
from atoll.determinism import RandomSource
from atoll.observability import Tracing
from atoll.observability._lean import parse_traceparent
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from atoll.transport.memory import InMemoryTransport

ROOTS = 2000
#: Low 64 bits 1: under every ratio's bound, so a root with this id would be sampled.
RATIO_SAYS_YES = 0x0AF7651916CD43DD0000000000000001
#: Low 64 bits all ones: over every ratio's bound below 1, so a root would not be.
RATIO_SAYS_NO = 0x0AF7651916CD43DDFFFFFFFFFFFFFFFF


def sampler_env(monkeypatch: pytest.MonkeyPatch, ratio: float) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", str(ratio))


def traceparent(trace_id: int, *, sampled: bool) -> str:
    return f"00-{trace_id:032x}-b7ad6b7169203331-{'01' if sampled else '00'}"


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_root_spans_are_sampled_at_about_the_ratio_the_environment_sets(
    monkeypatch: pytest.MonkeyPatch, ratio: float
) -> None:
    sampler_env(monkeypatch, ratio)
    exporter = InMemorySpanExporter()
    tracing = Tracing("sampled", exporter=exporter, random=RandomSource(seed=20240611))
    try:
        assert tracing.lean is not None
        sampled = 0
        for n in range(ROOTS):
            with tracing.lean.span(
                "process t.Job", parent=None, kind=SpanKind.CONSUMER, attributes={"n": n}
            ) as span:
                sampled += span.get_span_context().trace_flags.sampled
        tracing.processor.force_flush()
        exported = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
    # Binomial(2000, p): one standard deviation is under 0.01; a seeded source, so stable.
    assert abs(sampled / ROOTS - ratio) < 0.04, sampled / ROOTS
    # Exactly the sampled spans are exported, each a root with its sampled flag.
    assert len(exported) == sampled
    assert all(s.parent is None and s.context.trace_flags.sampled for s in exported)


@pytest.mark.parametrize(
    ("trace_id", "parent_sampled"),
    [(RATIO_SAYS_YES, False), (RATIO_SAYS_NO, True)],
    ids=["unsampled-parent", "sampled-parent"],
)
def test_a_child_follows_its_parents_flag_not_the_ratio(
    monkeypatch: pytest.MonkeyPatch, trace_id: int, parent_sampled: bool
) -> None:
    sampler_env(monkeypatch, 0.25)
    exporter = InMemorySpanExporter()
    tracing = Tracing("sampled", exporter=exporter, random=RandomSource(seed=1))
    try:
        assert tracing.lean is not None
        # The ratio, asked about a root with this trace id, says the opposite.
        assert (
            tracing.lean.sampler.should_sample(None, trace_id, "x").decision.is_sampled()
            is not parent_sampled
        )
        parent = parse_traceparent({"traceparent": traceparent(trace_id, sampled=parent_sampled)})
        with tracing.lean.span(
            "process t.Job", parent=parent, kind=SpanKind.CONSUMER, attributes={}
        ) as span:
            context = span.get_span_context()
            headers = span.headers()
        tracing.processor.force_flush()
        exported = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
    assert context.trace_id == trace_id
    assert context.trace_flags.sampled is parent_sampled
    assert headers["traceparent"].endswith("-01" if parent_sampled else "-00")
    assert len(exported) == (1 if parent_sampled else 0)


class Job(Command):
    message_type = "sampling.Job"
    n: int


async def test_a_services_process_spans_follow_the_messages_traceparent(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    sampler_env(monkeypatch, 0.25)
    exporter = InMemorySpanExporter()
    worker = Service("sampling-worker")
    boss = Service("sampling-boss")
    seen: dict[int, tuple[int, bool]] = {}

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        context = trace.get_current_span().get_span_context()
        seen[job.n] = (context.trace_id, context.trace_flags.sampled)

    transport = InMemoryTransport(lease=1.0)
    runtimes = [
        ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=transport,
            owns_transport=False,
            tracing=tracing,
        )
        for service, tracing in (
            (worker, Tracing("sampling-worker", exporter=exporter)),
            (boss, None),
        )
    ]
    try:
        for runtime in runtimes:
            await runtime.start()
        for n, (trace_id, sampled) in enumerate([(RATIO_SAYS_YES, False), (RATIO_SAYS_NO, True)]):
            header = traceparent(trace_id, sampled=sampled)
            async with boss.unit_of_work(trace={"traceparent": header}) as ctx:
                ctx.send(Job(n=n), to="sampling-worker")
        await wait_until(lambda: len(seen) == 2, what="both jobs handled")
        runtimes[0].tracing.processor.force_flush()
        process = [s for s in exporter.get_finished_spans() if s.name == "process sampling.Job"]
    finally:
        for runtime in runtimes:
            await runtime.stop()
        await transport.close()
    assert seen == {0: (RATIO_SAYS_YES, False), 1: (RATIO_SAYS_NO, True)}
    # Only the job whose parent was sampled has a process span, under that parent.
    assert [s.context.trace_id for s in process] == [RATIO_SAYS_NO]
    assert process[0].parent.span_id == 0xB7AD6B7169203331
