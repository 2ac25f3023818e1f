"""Process managers: flows driven by events, stored and shown like sagas."""

import msgspec
import pytest
from order_saga import ReserveStock

from atoll import Event, Service
from atoll.sagas import Flow, ProcessManager, SagaActionError, SagaEngine, to_mermaid
from atoll.testing import RawEvent, SagaTestKit


class OrderPlaced(Event):
    message_type = "pm.OrderPlaced"
    order_id: str


class PaymentCaptured(Event):
    message_type = "pm.PaymentCaptured"
    order_id: str
    amount: int


class OrderShipped(Event):
    message_type = "pm.OrderShipped"
    order_id: str


class Reminder(Event):
    message_type = "pm.Reminder"
    order_id: str


class Audit(Event):
    message_type = "pm.Audit"
    order_id: str


class Fulfilment(msgspec.Struct):
    order_id: str
    paid: int = 0
    shipped: bool = False
    reminded: bool = False


def make(name="fulfilment-service", timeout=3600.0):
    pm = ProcessManager("fulfilment", Fulfilment, timeout=timeout)

    @pm.starts(OrderPlaced, key=lambda e: e.order_id)
    async def placed(event: OrderPlaced, flow: Flow[Fulfilment]) -> Fulfilment:
        flow.send(ReserveStock(order_id=event.order_id, qty=1), to="inventory")
        flow.schedule("remind", 600)
        return Fulfilment(order_id=event.order_id)

    @pm.on(PaymentCaptured, key=lambda e: e.order_id)
    async def paid(event: PaymentCaptured, flow: Flow[Fulfilment]) -> None:
        flow.data.paid += event.amount
        if flow.data.shipped:
            flow.complete("paid and shipped")

    @pm.on(OrderShipped, key=lambda e: e.order_id)
    async def shipped(event: OrderShipped, flow: Flow[Fulfilment]) -> None:
        flow.data.shipped = True
        flow.cancel("remind")
        if flow.data.paid:
            flow.complete("paid and shipped")

    @pm.on(Audit, key=lambda e: e.order_id, if_missing="ignore")
    async def audit(event: Audit, flow: Flow[Fulfilment]) -> None:
        return None

    @pm.on_timer("remind")
    async def remind(flow: Flow[Fulfilment]) -> None:
        flow.data.reminded = True
        flow.publish(Reminder(order_id=flow.data.order_id))

    engine = SagaEngine(Service(name), [pm])
    return engine, pm


@pytest.fixture
async def kit(tmp_path):
    engine, _ = make()
    kit = SagaTestKit(engine, tmp_path)
    kit.participant("inventory").on(ReserveStock, None)
    async with kit:
        yield kit


async def test_events_move_one_instance_per_key_to_completion(kit):
    await kit.publish(OrderPlaced(order_id="o1"))
    await kit.publish(OrderPlaced(order_id="o2"))
    await kit.publish(PaymentCaptured(order_id="o1", amount=5))
    view = await kit.instance("fulfilment:o1")
    assert view.kind == "process"
    assert view.state == "RUNNING"
    assert view.data == {"order_id": "o1", "paid": 5, "shipped": False, "reminded": False}
    assert view.timers == {"remind": kit.clock.time() + 600}
    assert view.wake_at == kit.clock.time() + 600
    await kit.publish(OrderShipped(order_id="o1"))
    view = await kit.instance("fulfilment:o1")
    assert view.state == "COMPLETED"
    assert view.timers == {}
    assert view.wake_at is None
    assert [h.event for h in view.history] == [
        "event pm.OrderPlaced",
        "event pm.PaymentCaptured",
        "event pm.OrderShipped",
    ]
    assert kit.commands("inventory") == [
        ReserveStock(order_id="o1", qty=1),
        ReserveStock(order_id="o2", qty=1),
    ]
    assert kit.sent[0].envelope.key == "o1", "a flow's commands are keyed by its key"
    assert len(kit.held("inventory")) == 2
    assert (await kit.states()) == {"fulfilment:o1": "COMPLETED", "fulfilment:o2": "RUNNING"}


async def test_a_durable_timer_fires_its_handler_and_the_deadline_fails_the_instance(kit):
    await kit.publish(OrderPlaced(order_id="o3"))
    await kit.advance(599)
    assert kit.published == []
    await kit.restart()
    await kit.advance(1)
    assert kit.published == [RawEvent(type="pm.Reminder", fields={"order_id": "o3"})]
    view = await kit.instance("fulfilment:o3")
    assert view.data["reminded"] is True
    assert view.timers == {}
    await kit.advance(3000)
    view = await kit.instance("fulfilment:o3")
    assert view.state == "FAILED"
    assert view.error == "the process's deadline passed (3600s)"
    assert view.history[-1].event == "deadline"


async def test_an_event_before_its_instance_is_retried_then_dead_lettered(kit):
    await kit.publish(PaymentCaptured(order_id="ghost", amount=1))
    [(envelope, reason)] = kit.dead_letters
    assert envelope.type == "pm.PaymentCaptured"
    assert "is for process 'fulfilment' key 'ghost', which has no instance" in reason
    await kit.publish(Audit(order_id="ghost"))
    assert len(kit.dead_letters) == 1, "if_missing='ignore' must not dead-letter"
    assert await kit.states() == {}


async def test_events_for_an_ended_instance_and_second_starts_are_recorded_and_ignored(kit):
    await kit.publish(OrderPlaced(order_id="o4"))
    await kit.publish(OrderPlaced(order_id="o4"))
    await kit.publish(PaymentCaptured(order_id="o4", amount=1))
    await kit.publish(OrderShipped(order_id="o4"))
    await kit.publish(PaymentCaptured(order_id="o4", amount=100))
    view = await kit.instance("fulfilment:o4")
    assert view.state == "COMPLETED"
    assert view.data["paid"] == 1
    ignored = [h.detail["ignored"] for h in view.history if h.event.endswith("(ignored)")]
    assert ignored == [
        "a start event for an instance that has started already",
        "the instance is COMPLETED",
    ]
    assert len(kit.commands("inventory")) == 1


async def test_operators_see_and_abort_process_instances(kit):
    await kit.publish(OrderPlaced(order_id="o5"))
    with pytest.raises(SagaActionError, match="can only be aborted"):
        await kit.engine.operate("fulfilment:o5", "retry")
    view = await kit.engine.operate(
        "fulfilment:o5", "abort", reason="duplicate order", operator="ann"
    )
    assert view.state == "ABORTED"
    assert view.wake_at is None
    assert view.error == "aborted by an operator: duplicate order"
    await kit.advance(10_000)
    assert kit.published == [], "an aborted instance's timer fired"
    [summary] = await kit.engine.list(state="ABORTED")
    assert summary.saga_id == "fulfilment:o5"


def test_a_process_diagram_shows_its_events_and_timers():
    _, pm = make("diagram-service")
    text = to_mermaid(pm)
    assert text.startswith("flowchart LR\n")
    for fragment in ["pm.OrderPlaced", '|"starts"|', "timer remind", "deadline 3600s"]:
        assert fragment in text
