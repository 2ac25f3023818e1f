"""The saga engine against scripted participants, on a virtual clock."""

import msgspec
import pytest
from order_saga import (
    CancelShipment,
    ChargePayment,
    Order,
    PaymentBusy,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    RefundFailed,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentScheduled,
    StockRejected,
    StockReleased,
    StockReserved,
    happy,
    make_engine,
    order_saga,
)

from atoll.sagas import (
    Call,
    Parallel,
    Retry,
    Saga,
    SagaActionError,
    SagaExistsError,
    SagaMigration,
    Send,
    Step,
    StepFailed,
)
from atoll.testing import SagaTestKit, SentCommand


def names(commands):
    return [type(c).__name__ for c in commands]


def statuses(view):
    return {s.name: s.status for s in view.steps}


@pytest.fixture
def engine():
    return make_engine()


@pytest.fixture
async def kit(engine, tmp_path):
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    async with kit:
        yield kit


async def test_a_saga_completes_step_by_step_and_keeps_what_replies_told_it(kit):
    saga_id = await kit.start("place-order", Order(order_id="o1"))
    view = await kit.instance(saga_id)
    assert view.state == "COMPLETED"
    assert view.error is None
    assert names(kit.commands()) == ["ReserveStock", "ChargePayment", "ScheduleShipment"]
    assert view.data["payment_id"] == "pay-o1", "on_reply did not keep the payment id"
    assert view.data["notes"] == ["confirmed"], "the local step's change to data was lost"
    assert statuses(view) == dict.fromkeys(
        ["reserve-stock", "charge-payment", "ship", "confirm"], "COMPLETED"
    )
    for sent in kit.sent:
        assert sent.envelope.key == saga_id, "saga commands are keyed by the saga id"
        assert sent.envelope.correlation_id == saga_id
    assert [h.event for h in view.history] == [
        "started",
        "reply t.StockReserved",
        "reply t.PaymentCharged",
        "reply t.ShipmentScheduled",
    ]
    assert view.wake_at is None
    assert view.deadline_at is None
    async with kit.runtime.database.read() as db:
        assert (
            await db.fetch_value("SELECT saga_id FROM confirmed WHERE order_id = 'o1'") == saga_id
        )


async def test_a_failure_compensates_completed_steps_only_in_reverse_order(kit):
    kit.participant("payments").on(
        ChargePayment, lambda c: PaymentDeclined(order_id=c.order_id, reason="card expired")
    )
    saga_id = await kit.start("place-order", Order(order_id="o2"))
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert names(kit.commands()) == ["ReserveStock", "ChargePayment", "ReleaseStock"]
    assert statuses(view) == {
        "reserve-stock": "COMPENSATED",
        "charge-payment": "FAILED",
        "ship": "PENDING",
        "confirm": "PENDING",
    }
    assert "card expired" in view.error


async def test_a_rejected_first_step_needs_no_compensation(kit):
    kit.participant("inventory").on(
        ReserveStock, lambda c: StockRejected(order_id=c.order_id, reason="none left")
    )
    saga_id = await kit.start("place-order", Order(order_id="o3"))
    assert (await kit.instance(saga_id)).state == "COMPENSATED"
    assert names(kit.commands()) == ["ReserveStock"]


async def test_a_conditional_step_is_skipped_and_not_compensated(kit):
    saga_id = await kit.start("place-order", Order(order_id="o4", ship=False))
    view = await kit.instance(saga_id)
    assert view.state == "COMPLETED"
    assert statuses(view)["ship"] == "SKIPPED"
    assert "ScheduleShipment" not in names(kit.commands())
    await kit.engine.operate(saga_id, "compensate", reason="customer cancelled", operator="ann")
    await kit.run()
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert names(kit.commands())[-2:] == ["RefundPayment", "ReleaseStock"]
    assert statuses(view)["ship"] == "SKIPPED"


async def test_a_timed_out_step_is_retried_then_compensated_because_its_effect_is_uncertain(kit):
    kit.participant("shipping").on(ScheduleShipment, None)
    saga_id = await kit.start("place-order", Order(order_id="o5"))
    assert statuses(await kit.instance(saga_id))["ship"] == "RUNNING"
    await kit.advance(30)
    view = await kit.instance(saga_id)
    assert statuses(view)["ship"] == "RETRY_WAIT"
    assert "no reply within 30s" in view.steps[2].error
    await kit.advance(5)
    assert names(kit.commands("shipping")) == ["ScheduleShipment", "ScheduleShipment"]
    kit.participant("shipping").on(ScheduleShipment, None).on(
        CancelShipment, lambda c: ShipmentCancelled(order_id=c.order_id)
    )
    await kit.advance(30)
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert statuses(view) == {
        "reserve-stock": "COMPENSATED",
        "charge-payment": "COMPENSATED",
        "ship": "COMPENSATED",
        "confirm": "COMPLETED",  # a local step without compensation
    }
    assert names(kit.commands()) == [
        "ReserveStock",
        "ChargePayment",
        "ScheduleShipment",
        "ScheduleShipment",
        "CancelShipment",
        "RefundPayment",
        "ReleaseStock",
    ]
    assert kit.commands("payments")[-1] == RefundPayment(order_id="o5", payment_id="pay-o5")


async def test_a_reply_to_an_earlier_attempt_counts_and_the_second_reply_is_recorded(kit):
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o6"))
    await kit.advance(35)
    first, second = kit.held("payments")
    assert second.envelope.id != first.envelope.id
    await kit.reply(first, PaymentCharged(order_id="o6", payment_id="p-1"))
    view = await kit.instance(saga_id)
    assert view.state == "COMPLETED"
    assert view.data["payment_id"] == "p-1"
    await kit.reply(second, PaymentCharged(order_id="o6", payment_id="p-2"))
    await kit.reply(first, PaymentCharged(order_id="o6", payment_id="p-1"))
    view = await kit.instance(saga_id)
    assert view.data["payment_id"] == "p-1", "a duplicate reply changed the data"
    ignored = [h for h in view.history if h.event.endswith("(ignored)")]
    assert len(ignored) == 2
    assert "duplicate or late reply" in ignored[0].detail["ignored"]
    assert kit.dead_letters == []


async def test_a_failure_of_an_earlier_attempt_waits_for_the_latest_attempt(kit):
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o6b"))
    await kit.advance(35)
    first, second = kit.held("payments")
    await kit.reply(first, PaymentDeclined(order_id="o6b", reason="declined the first time"))
    view = await kit.instance(saga_id)
    assert statuses(view)["charge-payment"] == "RUNNING", "an earlier attempt's failure decided"
    assert "the latest decides" in view.history[-1].detail["ignored"]
    await kit.reply(second, PaymentCharged(order_id="o6b", payment_id="p"))
    assert (await kit.instance(saga_id)).state == "COMPLETED"


async def test_a_retry_on_reply_retries_after_the_backoff(kit):
    kit.participant("payments").on(
        ChargePayment,
        [
            lambda c: PaymentBusy(order_id=c.order_id),
            lambda c: PaymentCharged(order_id=c.order_id, payment_id="p"),
        ],
    )
    saga_id = await kit.start("place-order", Order(order_id="o7"))
    view = await kit.instance(saga_id)
    assert statuses(view)["charge-payment"] == "RETRY_WAIT"
    assert view.wake_at == pytest.approx(kit.clock.time() + 5)
    await kit.advance(4.9)
    assert len(kit.commands("payments")) == 1
    await kit.advance(0.1)
    assert (await kit.instance(saga_id)).state == "COMPLETED"
    assert len(kit.commands("payments")) == 2


async def test_the_saga_deadline_compensates_what_is_in_flight_and_late_replies_are_ignored(
    tmp_path,
):
    engine = make_engine("deadline", order_saga(timeout=100, step_timeout=None))
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        saga_id = await kit.start("place-order", Order(order_id="o8"))
        await kit.advance(99)
        assert (await kit.instance(saga_id)).state == "RUNNING"
        await kit.advance(1)
        view = await kit.instance(saga_id)
        assert view.state == "COMPENSATED"
        assert "deadline passed (100s)" in view.error
        assert statuses(view)["charge-payment"] == "COMPENSATED", "an uncertain charge is refunded"
        [late] = kit.held("payments")
        await kit.reply(late, PaymentCharged(order_id="o8", payment_id="late"))
        view = await kit.instance(saga_id)
        assert view.history[-1].event == "reply t.PaymentCharged (ignored)"
        assert view.state == "COMPENSATED"


async def test_bad_replies_are_dead_lettered_with_the_reason_and_change_nothing(kit):
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o9"))
    [charge] = kit.held("payments")
    before = await kit.instance(saga_id)
    await kit.reply(charge, StockReserved(order_id="o9"))
    unknown = SentCommand(
        "payments", charge.command, msgspec.structs.replace(charge.envelope, correlation_id="nope")
    )
    await kit.reply(unknown, PaymentCharged(order_id="o9", payment_id="x"))
    stranger = SentCommand(
        "payments", charge.command, msgspec.structs.replace(charge.envelope, id="not-sent")
    )
    await kit.reply(stranger, PaymentCharged(order_id="o9", payment_id="x"))
    reasons = [reason for _, reason in kit.dead_letters]
    assert reasons[0] == (
        f"reply t.StockReserved (message {kit.dead_letters[0][0].id} from payments) is not a"
        f" reply saga '{saga_id}' (place-order v1) expects from the action of step"
        " 'charge-payment' (it expects t.PaymentCharged, t.PaymentDeclined, t.PaymentBusy)"
    )
    assert "is for saga 'nope', which service 'orders' does not have" in reasons[1]
    assert "answers no command of saga" in reasons[2]
    assert "'not-sent' is not a command the saga sent" in reasons[2]
    after = await kit.instance(saga_id)
    assert after.revision == before.revision, "a refused reply changed the instance"


async def test_a_compensation_that_keeps_failing_stops_visibly_and_operators_repair_it(kit):
    kit.participant("shipping").on(ScheduleShipment, None).on(
        CancelShipment, lambda c: ShipmentCancelled(order_id=c.order_id)
    )
    kit.participant("payments").on(
        RefundPayment, lambda c: RefundFailed(order_id=c.order_id, reason="gateway down")
    )
    saga_id = await kit.start("place-order", Order(order_id="o10"))
    view = await kit.engine.operate(saga_id, "compensate", reason="fraud", operator="ann")
    assert view.state == "COMPENSATING"
    await kit.run()
    await kit.advance(60)
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATION_FAILED"
    assert statuses(view) == {
        "reserve-stock": "COMPLETED",
        "charge-payment": "COMPENSATION_FAILED",
        "ship": "COMPENSATED",
        "confirm": "COMPLETED",
    }
    assert names(kit.commands("payments")) == ["ChargePayment"] + ["RefundPayment"] * 3
    assert "gateway down" in view.steps[1].error
    assert view.wake_at is None, "a failed compensation must wait for an operator, not retry"
    await kit.advance(3600)
    assert len(kit.commands("payments")) == 4

    kit.participant("payments").on(RefundPayment, lambda c: PaymentRefunded(order_id=c.order_id))
    view = await kit.engine.operate(saga_id, "retry", operator="bob", reason="gateway is back")
    await kit.run()
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert names(kit.commands())[-2:] == ["RefundPayment", "ReleaseStock"]
    operator_entries = [h for h in view.history if h.event.startswith("operator")]
    assert [(h.event, h.detail["operator"], h.detail["reason"]) for h in operator_entries] == [
        ("operator compensate", "ann", "fraud"),
        ("operator retry", "bob", "gateway is back"),
    ]
    with pytest.raises(SagaActionError, match=r"cannot retry saga .*: it is COMPENSATED"):
        await kit.engine.operate(saga_id, "retry")


async def test_an_operator_skips_a_failed_compensation_and_compensation_goes_on(kit):
    kit.participant("payments").on(
        ChargePayment, lambda c: PaymentCharged(order_id=c.order_id, payment_id="p")
    ).on(RefundPayment, lambda c: RefundFailed(order_id=c.order_id, reason="no"))
    kit.participant("shipping").on(ScheduleShipment, None).on(CancelShipment, None)
    saga_id = await kit.start("place-order", Order(order_id="o11", ship=True))
    await kit.advance(65)  # shipping times out twice; compensation starts
    await kit.advance(30)  # cancel shipment is held: it times out
    await kit.advance(600)
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATION_FAILED"
    assert statuses(view)["ship"] == "COMPENSATION_FAILED"
    with pytest.raises(SagaActionError, match=r"step 'reserve-stock' of saga .* is COMPLETED"):
        await kit.engine.operate(saga_id, "skip", step="reserve-stock")
    await kit.engine.operate(
        saga_id, "skip", step="ship", operator="ann", reason="cancelled by phone"
    )
    await kit.run()
    await kit.advance(600)
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATION_FAILED"
    assert statuses(view)["ship"] == "COMPENSATION_SKIPPED"
    assert statuses(view)["charge-payment"] == "COMPENSATION_FAILED"
    await kit.engine.operate(saga_id, "skip", step="charge-payment", operator="ann")
    await kit.run()
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert statuses(view)["reserve-stock"] == "COMPENSATED"


async def test_abort_stops_an_instance_for_good(kit):
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o12"))
    view = await kit.engine.operate(saga_id, "abort", reason="test order", operator="ann")
    assert view.state == "ABORTED"
    assert view.wake_at is None
    [charge] = kit.held("payments")
    await kit.reply(charge, PaymentCharged(order_id="o12", payment_id="p"))
    await kit.advance(10_000)
    view = await kit.instance(saga_id)
    assert view.state == "ABORTED"
    assert view.history[-1].event.endswith("(ignored)")
    assert len(kit.commands()) == 2
    with pytest.raises(SagaActionError, match=r"cannot abort .*: it is ABORTED"):
        await kit.engine.operate(saga_id, "abort")


async def test_an_operator_retries_or_skips_a_stuck_step(tmp_path):
    engine = make_engine("stuck", order_saga(step_timeout=None, timeout=None))
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        saga_id = await kit.start("place-order", Order(order_id="o13"))
        await kit.advance(86_400)
        assert (await kit.instance(saga_id)).state == "RUNNING", "nothing should fire"
        await engine.operate(saga_id, "retry", step="charge-payment", operator="ann")
        await kit.run()
        assert len(kit.held("payments")) == 2
        with pytest.raises(SagaActionError, match="has no step 'nope'"):
            await engine.operate(saga_id, "skip", step="nope")
        await engine.operate(saga_id, "skip", step="charge-payment", operator="ann")
        await kit.run()
        view = await kit.instance(saga_id)
        assert view.state == "COMPLETED"
        assert names(kit.commands())[-1] == "ScheduleShipment"


async def test_parallel_steps_run_together_and_a_failure_waits_for_the_sibling_in_flight(tmp_path):
    calls = []

    async def audit(saga) -> None:
        calls.append(saga.attempt)
        await saga.ctx.execute("INSERT INTO confirmed (order_id, saga_id) VALUES ('x', 'y')")
        saga.data.notes.append("audited")
        saga.ctx.send(ReleaseStock(order_id="never"), to="inventory")
        raise StepFailed("audit says no")

    saga = Saga(
        "par",
        Order,
        steps=[
            Step(
                "reserve",
                Send(
                    "inventory",
                    lambda d: ReserveStock(order_id=d.order_id, qty=1),
                    success=StockReserved,
                ),
                compensation=Send(
                    "inventory", lambda d: ReleaseStock(order_id=d.order_id), success=StockReleased
                ),
            ),
            Parallel(
                "both",
                [
                    Step(
                        "ship",
                        Send(
                            "shipping",
                            lambda d: ScheduleShipment(order_id=d.order_id),
                            success=ShipmentScheduled,
                        ),
                        compensation=Send(
                            "shipping",
                            lambda d: CancelShipment(order_id=d.order_id),
                            success=ShipmentCancelled,
                        ),
                    ),
                    Step("audit", Call(audit, retry=Retry(attempts=3, backoff=0))),
                ],
            ),
        ],
    )
    engine = make_engine("par-orders", saga)
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    kit.participant("inventory").on(ReserveStock, StockReserved(order_id="o")).on(
        ReleaseStock, StockReleased(order_id="o")
    )
    kit.participant("shipping").on(ScheduleShipment, None).on(
        CancelShipment, ShipmentCancelled(order_id="o")
    )
    async with kit:
        saga_id = await kit.start(saga, Order(order_id="o14"))
        view = await kit.instance(saga_id)
        assert view.state == "RUNNING", "the saga must wait for the shipment in flight"
        assert statuses(view) == {"reserve": "COMPLETED", "ship": "RUNNING", "audit": "FAILED"}
        assert calls == [1], "StepFailed is final: no retries"
        assert view.data["notes"] == [], "a failed local step's change to data was kept"
        async with kit.runtime.database.read() as db:
            assert await db.fetch_value("SELECT count(*) FROM confirmed") == 0
        [shipment] = kit.held("shipping")
        await kit.reply(shipment, ShipmentScheduled(order_id="o14"))
        view = await kit.instance(saga_id)
        assert view.state == "COMPENSATED"
        assert names(kit.commands()) == [
            "ReserveStock",
            "ScheduleShipment",
            "CancelShipment",
            "ReleaseStock",
        ], "the failed local step's message was sent, or the order is wrong"


async def test_a_local_step_that_raises_is_retried_and_its_changes_kept_only_when_it_returns(
    tmp_path,
):
    attempts = []

    async def flaky(saga) -> None:
        attempts.append(saga.attempt)
        await saga.ctx.execute(
            "INSERT INTO confirmed (order_id, saga_id) VALUES (?, ?)", f"try-{saga.attempt}", "s"
        )
        if saga.attempt < 3:
            raise RuntimeError("busy")

    saga = Saga(
        "local",
        Order,
        steps=[Step("flaky", Call(flaky, retry=Retry(attempts=3, backoff=2, jitter=False)))],
    )
    engine = make_engine("local-orders", saga)
    async with SagaTestKit(engine, tmp_path) as kit:
        saga_id = await kit.start(saga, Order(order_id="o15"))
        view = await kit.instance(saga_id)
        assert statuses(view) == {"flaky": "RETRY_WAIT"}
        assert "raised RuntimeError('busy')" in view.steps[0].error
        await kit.advance(2)
        await kit.advance(4)
        assert (await kit.instance(saga_id)).state == "COMPLETED"
        assert attempts == [1, 2, 3]
        async with kit.runtime.database.read() as db:
            rows = await db.fetch_all("SELECT order_id FROM confirmed")
        assert [r[0] for r in rows] == ["try-3"]


async def test_state_survives_a_restart_and_deadlines_fire_after_it(kit):
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o16"))
    await kit.restart()
    await kit.advance(30)
    assert statuses(await kit.instance(saga_id))["charge-payment"] == "RETRY_WAIT"
    await kit.restart()
    await kit.advance(5)
    _, second = kit.held("payments")
    await kit.restart()
    await kit.reply(second, PaymentCharged(order_id="o16", payment_id="p"))
    assert (await kit.instance(saga_id)).state == "COMPLETED"


async def test_a_saga_id_is_used_once_and_a_rolled_back_start_leaves_nothing(kit):
    async with kit.runtime.unit_of_work() as ctx:
        await kit.engine.start(ctx, "place-order", Order(order_id="o17"), saga_id="order-17")
    with pytest.raises(SagaExistsError, match="'order-17' exists already"):
        async with kit.runtime.unit_of_work() as ctx:
            await kit.engine.start(ctx, "place-order", Order(order_id="o17"), saga_id="order-17")
    with pytest.raises(RuntimeError, match="the request failed"):
        async with kit.runtime.unit_of_work() as ctx:
            await kit.engine.start(ctx, "place-order", Order(order_id="o18"), saga_id="order-18")
            raise RuntimeError("the request failed")
    await kit.run()
    assert names(kit.commands()) == ["ReserveStock", "ChargePayment", "ScheduleShipment"]
    assert set(await kit.states()) == {"order-17"}
    with pytest.raises(TypeError, match="takes Order data, not dict"):
        async with kit.runtime.unit_of_work() as ctx:
            await kit.engine.start(ctx, "place-order", {"order_id": "x"})


async def test_a_taken_id_writes_and_sends_nothing_even_when_the_caller_goes_on(kit):
    async with kit.runtime.unit_of_work() as ctx:
        await kit.engine.start(ctx, "place-order", Order(order_id="o17b"), saga_id="order-17b")
    before = await kit.instance("order-17b")
    async with kit.runtime.unit_of_work() as ctx:
        with pytest.raises(SagaExistsError, match="'order-17b' exists already"):
            await kit.engine.start(ctx, "place-order", Order(order_id="x"), saga_id="order-17b")
        # the caller handles the error and commits its unit of work
    await kit.run()
    async with kit.runtime.database.read() as db:
        outbox = await db.fetch_value("SELECT count(*) FROM atoll_outbox")
    after = await kit.instance("order-17b")
    assert outbox == 0
    assert names(kit.commands()) == ["ReserveStock", "ChargePayment", "ScheduleShipment"]
    assert [h.seq for h in after.history] == [h.seq for h in before.history] + [2, 3, 4]
    assert after.data["order_id"] == "o17b"


@pytest.mark.parametrize("first", ["local step", "hook"])
async def test_a_taken_id_is_checked_before_a_local_step_or_hook_of_the_start_runs(tmp_path, first):
    effects = []

    async def local(saga) -> None:
        effects.append(saga.data.order_id)
        await saga.ctx.execute(
            "INSERT INTO confirmed (order_id, saga_id) VALUES (?, ?)", saga.data.order_id, "s"
        )
        saga.ctx.send(ReserveStock(order_id=saga.data.order_id, qty=1), to="inventory")

    async def completed(saga) -> None:
        await local(saga)

    reserve = Send(
        "inventory", lambda d: ReserveStock(order_id=d.order_id, qty=1), success=StockReserved
    )
    skipped = Step("skipped", reserve, when=lambda d: False)
    if first == "local step":
        steps = [skipped, Step("local", Call(local))]
        saga = Saga("starts-local", Order, steps=steps)
    else:
        saga = Saga("starts-hook", Order, steps=[skipped], on_completed=completed)
    engine = make_engine("first-orders", saga)
    async with SagaTestKit(engine, tmp_path) as kit:
        async with kit.runtime.unit_of_work() as ctx:
            await kit.engine.start(ctx, saga, Order(order_id="a"), saga_id="s-1")
        assert effects == ["a"]
        async with kit.runtime.unit_of_work() as ctx:
            with pytest.raises(SagaExistsError, match="'s-1' exists already"):
                await kit.engine.start(ctx, saga, Order(order_id="b"), saga_id="s-1")
        await kit.run()
        assert effects == ["a"], f"the {first} ran for a taken id"
        async with kit.runtime.database.read() as db:
            rows = await db.fetch_all("SELECT order_id FROM confirmed")
        assert [r[0] for r in rows] == ["a"]
        assert len(kit.commands()) == 1, "a message of the refused start was sent"
        view = await kit.instance("s-1")
        assert view.state == "COMPLETED"
        assert len(view.history) == 1


async def test_listeners_see_each_committed_transition(kit):
    seen = []
    kit.engine.add_listener(seen.append)
    kit.engine.add_listener(lambda t: 1 / 0)  # a broken listener changes nothing
    saga_id = await kit.start("place-order", Order(order_id="o19"))
    assert [(t.event, t.state_before, t.state_after) for t in seen] == [
        ("started", None, "RUNNING"),
        ("reply t.StockReserved", "RUNNING", "RUNNING"),
        ("reply t.PaymentCharged", "RUNNING", "RUNNING"),
        ("reply t.ShipmentScheduled", "RUNNING", "COMPLETED"),
    ]
    assert all(t.saga_id == saga_id and t.name == "place-order" for t in seen)
    assert [c.step for c in seen[1].changes] == ["reserve-stock", "charge-payment"]
    assert await kit.engine.counts() == {("place-order", "COMPLETED"): 1}


async def test_a_running_instance_keeps_its_version_and_a_migration_moves_it(tmp_path):
    v1 = order_saga(version=1)
    v2 = Saga(
        "place-order",
        Order,
        version=2,
        steps=[v1.steps[0].step, v1.steps[1].step, Step("confirm", v1.steps[3].step.action)],
    )
    engine = make_engine("versions", v1, v2)
    engine.migration(
        SagaMigration(
            "place-order",
            1,
            2,
            data=lambda d: {**d, "notes": [*d["notes"], "migrated"]},
            steps={"ship": None},
        )
    )
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        old = await kit.start(v1, Order(order_id="old"))
        new = await kit.start("place-order", Order(order_id="new"))
        assert (await kit.instance(old)).version == 1
        assert (await kit.instance(new)).version == 2
        first, second = kit.held("payments")
        await kit.reply(second, PaymentCharged(order_id="new", payment_id="p2"))
        assert (await kit.instance(new)).state == "COMPLETED"
        assert "ScheduleShipment" not in names(kit.commands())
        view = await engine.operate(old, "migrate", to_version=2, operator="ann")
        assert view.version == 2
        assert view.data["notes"] == ["migrated"]
        assert view.history[-1].event == "operator migrate"
        await kit.reply(first, PaymentCharged(order_id="old", payment_id="p1"))
        view = await kit.instance(old)
        assert view.state == "COMPLETED"
        assert [s.name for s in view.steps] == ["reserve-stock", "charge-payment", "confirm"]
        assert "ScheduleShipment" not in names(kit.commands()), "v1's ship step ran after moving"
        with pytest.raises(
            SagaActionError,
            match=r"no migration of .place-order. from v2 to v1 is declared",
        ):
            await engine.operate(new, "migrate", to_version=1)


async def test_a_migration_refuses_to_drop_a_step_that_owes_a_compensation(tmp_path):
    v1 = order_saga(version=1)
    v2 = Saga("place-order", Order, version=2, steps=[v1.steps[1].step])
    engine = make_engine("versions2", v1, v2)
    engine.migration(SagaMigration("place-order", 1, 2))
    kit = SagaTestKit(engine, tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        old = await kit.start(v1, Order(order_id="old"))
        with pytest.raises(
            SagaActionError, match="step 'reserve-stock' is COMPLETED and has a compensation"
        ):
            await engine.operate(old, "migrate", to_version=2)
        assert (await kit.instance(old)).version == 1


async def test_a_stale_cached_instance_is_caught_and_the_reply_handled_on_fresh_state(kit, caplog):
    """Another process moved the instance: the cache of this one no longer matches."""
    kit.participant("payments").on(ChargePayment, None)
    saga_id = await kit.start("place-order", Order(order_id="o20"))
    kit.engine._caching = False  # as if another process did the retry
    await kit.engine.operate(saga_id, "retry", step="charge-payment", operator="elsewhere")
    kit.engine._caching = True
    await kit.run()
    first, second = kit.held("payments")
    # The cached state does not know the second command: refused on it, then accepted fresh.
    await kit.reply(second, PaymentBusy(order_id="o20"))
    view = await kit.instance(saga_id)
    assert statuses(view)["charge-payment"] == "RETRY_WAIT"
    assert kit.dead_letters == []
    kit.engine._caching = False
    await kit.advance(5)  # the third attempt, sent "elsewhere" again
    kit.engine._caching = True
    # The cached revision is stale: the guarded UPDATE refuses, the reply is retried fresh.
    await kit.reply(first, PaymentCharged(order_id="o20", payment_id="p1"))
    view = await kit.instance(saga_id)
    assert view.state == "COMPLETED"
    assert view.data["payment_id"] == "p1"
    assert kit.dead_letters == []
    assert "ConcurrentTransitionError" in caplog.text, "the stale write was not refused"


async def test_a_deadline_whose_handling_fails_is_recorded_and_tried_again_later(tmp_path):
    broken = True

    async def compensated(saga) -> None:
        if broken:
            raise RuntimeError("the hook is broken")

    saga = Saga(
        "hooked",
        Order,
        on_compensated=compensated,
        steps=[
            Step(
                "pay",
                Send(
                    "payments",
                    lambda d: ChargePayment(order_id=d.order_id, amount=1),
                    success=PaymentCharged,
                    timeout=10,
                ),
            )
        ],
    )
    kit = SagaTestKit(make_engine("hooked-orders", saga), tmp_path)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        saga_id = await kit.start(saga, Order(order_id="o21"))
        await kit.advance(10)
        view = await kit.instance(saga_id)
        assert view.state == "RUNNING", "a failed transition was kept"
        assert view.error == "handling a deadline failed: RuntimeError('the hook is broken')"
        assert view.history[-1].event == "deadline (failed)"
        assert view.wake_at == kit.clock.time() + 30
        broken = False
        await kit.advance(30)
        view = await kit.instance(saga_id)
        assert view.state == "COMPENSATED"
        assert statuses(view) == {"pay": "TIMED_OUT"}, "no compensation declared: stays uncertain"


async def test_two_replies_of_one_saga_in_one_batch_both_count(tmp_path, caplog):
    saga = Saga(
        "pair",
        Order,
        steps=[
            Parallel(
                "both",
                [
                    Step("reserve", Send("inventory", reserve_for, success=StockReserved)),
                    Step("charge", Send("payments", charge_for, success=PaymentCharged)),
                ],
            )
        ],
    )
    kit = SagaTestKit(make_engine("pair-orders", saga), tmp_path)
    kit.participant("inventory").on(ReserveStock, None)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        saga_id = await kit.start(saga, Order(order_id="o22"))
        [reservation] = kit.held("inventory")
        [charge] = kit.held("payments")
        await kit.reply(reservation, StockReserved(order_id="o22"), run=False)
        await kit.reply(charge, PaymentCharged(order_id="o22", payment_id="p"), run=False)
        await kit.deliver_batch()
        assert (await kit.instance(saga_id)).state == "COMPLETED"
        assert "ConcurrentTransitionError" not in caplog.text, "the second reply was retried"


def reserve_for(order: Order) -> ReserveStock:
    return ReserveStock(order_id=order.order_id, qty=1)


def charge_for(order: Order) -> ChargePayment:
    return ChargePayment(order_id=order.order_id, amount=1)


async def test_a_transition_that_fails_after_moving_the_cached_instance_is_redone_fresh(tmp_path):
    """The cache hands its objects to the transition: one that fails half-way leaves none."""
    calls = 0

    async def completed(saga) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the hook fails once")

    saga = Saga(
        "flaky-end",
        Order,
        on_completed=completed,
        steps=[
            Step(
                "pay",
                Send(
                    "payments",
                    lambda d: ChargePayment(order_id=d.order_id, amount=1),
                    success=PaymentCharged,
                ),
            )
        ],
    )
    kit = SagaTestKit(make_engine("flaky-orders", saga), tmp_path)
    async with kit:
        saga_id = await kit.start(saga, Order(order_id="o30"))
        assert saga_id in kit.engine._cache
        [sent] = kit.held("payments")
        # The first handling moves the cached instance to COMPLETED, then the hook raises
        # and the unit of work rolls back; the redelivery must not see that state.
        await kit.reply(sent, PaymentCharged(order_id="o30", payment_id="p30"))
        assert calls == 2
        view = await kit.instance(saga_id)
        assert view.state == "COMPLETED"
        assert [h.event for h in view.history] == ["started", "reply t.PaymentCharged"]
        assert kit.dead_letters == []
        assert saga_id not in kit.engine._cache
