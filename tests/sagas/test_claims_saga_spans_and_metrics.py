"""What docs/sagas.md says a saga engine gives observability, on real services: a span per
transition carrying the saga id and the steps it changed (compensations included), and
the ``atoll_sagas`` gauge of instances by state."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from order_saga import (
    ChargePayment,
    Order,
    PaymentCharged,
    PaymentDeclined,
    ReleaseStock,
    ReserveStock,
    StockReleased,
    StockReserved,
    make_engine,
    order_saga,
)

from atoll import Context, Service
from atoll.observability import Tracing, attributes
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from atoll.transport.memory import InMemoryTransport


def participants() -> list[Service]:
    inventory = Service("inventory")
    payments = Service("payments")

    @inventory.handles(ReserveStock)
    async def on_reserve(cmd: ReserveStock, ctx: Context) -> None:
        ctx.reply(StockReserved(order_id=cmd.order_id))

    @inventory.handles(ReleaseStock)
    async def on_release(cmd: ReleaseStock, ctx: Context) -> None:
        ctx.reply(StockReleased(order_id=cmd.order_id))

    @payments.handles(ChargePayment)
    async def on_charge(cmd: ChargePayment, ctx: Context) -> None:
        if cmd.amount > 100:
            ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason="over the limit"))
        else:
            ctx.reply(PaymentCharged(order_id=cmd.order_id, payment_id="pay-" + cmd.order_id))

    return [inventory, payments]


async def run_two_sagas(tmp_path, exporter: InMemorySpanExporter | None):
    """One saga that completes (``ok``) and one whose payment is declined (``bad``)."""
    saga = order_saga()
    engine = make_engine("claims-orders", saga, poll_interval=0.05)
    transport = InMemoryTransport(lease=1.0)
    runtimes = []
    for service in [engine.service, *participants()]:
        tracing = None
        if exporter is not None and service is engine.service:
            tracing = Tracing(service.name, exporter=exporter)
        runtime = ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=transport,
            owns_transport=False,
            tracing=tracing,
        )
        await runtime.start()
        runtimes.append(runtime)
    async with engine.service.unit_of_work() as ctx:
        await engine.start(ctx, saga, Order(order_id="o-ok", ship=False), saga_id="ok")
        await engine.start(ctx, saga, Order(order_id="o-bad", amount=500), saga_id="bad")

    async def ended() -> bool:
        return {s.saga_id: s.state for s in await engine.list()} == {
            "ok": "COMPLETED",
            "bad": "COMPENSATED",
        }

    await wait_until(ended, timeout=20, what="one saga completed and one compensated")
    return engine, runtimes, transport


async def stop(runtimes, transport: InMemoryTransport) -> None:
    for runtime in runtimes:
        await runtime.stop()
    await transport.close()


async def test_transition_spans_carry_the_saga_id_and_the_steps_compensation_included(
    tmp_path,
):
    exporter = InMemorySpanExporter()
    engine, runtimes, transport = await run_two_sagas(tmp_path, exporter)
    try:
        histories = {saga_id: (await engine.view(saga_id)).history for saga_id in ("ok", "bad")}

        def transitions():
            runtimes[0].tracing.processor.force_flush()
            return [
                s for s in exporter.get_finished_spans() if s.name.startswith("saga place-order")
            ]

        total = sum(len(h) for h in histories.values())
        await wait_until(lambda: len(transitions()) >= total, what="a span per transition")
        spans = transitions()
        names = {s.context.span_id: s.name for s in exporter.get_finished_spans()}
    finally:
        await stop(runtimes, transport)
    assert len(spans) == total, "one span per history entry"
    by_saga: dict[str, list] = {}
    for span in spans:
        by_saga.setdefault(span.attributes[attributes.SAGA_ID], []).append(span)
    assert set(by_saga) == {"ok", "bad"}
    for saga_id, history in histories.items():
        mine = by_saga[saga_id]
        assert all(s.attributes[attributes.SAGA_NAME] == "place-order" for s in mine)
        # Each transition's span names the steps that its history entry changed.
        # The saga-level entry "(saga)" is the state attribute, not a step.
        expected = sorted(
            (e.event, e.state, {change[0] for change in e.changes} - {"(saga)"}) for e in history
        )
        got = sorted(
            (
                s.attributes["atoll.saga.event"],
                s.attributes[attributes.SAGA_STATE],
                set(str(s.attributes.get(attributes.SAGA_STEP, "")).split(",")) - {""},
            )
            for s in mine
        )
        assert got == expected, saga_id
    bad = {s.attributes["atoll.saga.event"]: s for s in by_saga["bad"]}
    # The decline starts compensating reserve-stock; its release ends the compensation.
    declined = bad["reply t.PaymentDeclined"]
    assert declined.attributes[attributes.SAGA_STATE] == "COMPENSATING"
    assert "reserve-stock" in str(declined.attributes[attributes.SAGA_STEP]).split(",")
    released = bad["reply t.StockReleased"]
    assert released.attributes[attributes.SAGA_STATE] == "COMPENSATED"
    assert released.attributes["atoll.saga.state_before"] == "COMPENSATING"
    assert released.attributes[attributes.SAGA_STEP] == "reserve-stock"
    # The span of a transition a reply caused is a child of that reply's process span.
    assert released.parent is not None
    assert names[released.parent.span_id] == "process t.StockReleased"


async def test_the_sagas_gauge_counts_instances_by_final_state(tmp_path):
    engine, runtimes, transport = await run_two_sagas(tmp_path, None)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=engine.service.http), base_url="http://o"
        ) as client:
            text = (await client.get("/metrics")).text
    finally:
        await stop(runtimes, transport)
    samples = sorted(line for line in text.splitlines() if line.startswith("atoll_sagas{"))
    assert samples == [
        'atoll_sagas{saga="place-order",service="claims-orders",state="COMPENSATED"} 1.0',
        'atoll_sagas{saga="place-order",service="claims-orders",state="COMPLETED"} 1.0',
    ]
