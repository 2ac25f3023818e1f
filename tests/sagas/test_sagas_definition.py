"""Definitions are checked where they are declared, with messages that name the problem."""

import msgspec
import pytest
from order_saga import (
    ChargePayment,
    Order,
    PaymentCharged,
    PaymentDeclined,
    ReserveStock,
    StockReserved,
    charge,
    order_saga,
    release,
    reserve,
)

from atoll import Command, Service
from atoll.sagas import (
    Call,
    Parallel,
    ProcessManager,
    Retry,
    Saga,
    SagaDefinitionError,
    SagaEngine,
    Send,
    Step,
)


async def noop(saga) -> None:
    return None


def reserve_step(**kwargs) -> Step[Order]:
    return Step("reserve", Send("inventory", reserve, success=StockReserved), **kwargs)


def test_a_compensation_for_a_missing_step_is_refused_with_the_steps_named():
    with pytest.raises(SagaDefinitionError) as caught:
        Saga(
            "s",
            Order,
            steps=[
                reserve_step(),
                Step("charge", Send("payments", charge, success=PaymentCharged)),
            ],
            compensations={"reserv": Send("inventory", release, success=StockReserved)},
        )
    assert str(caught.value) == (
        "saga 's' v1: a compensation refers to step 'reserv', which does not exist"
        " (steps: reserve, charge)"
    )


def test_compensations_declared_apart_attach_to_their_step():
    saga = Saga(
        "s",
        Order,
        steps=[reserve_step()],
        compensations={"reserve": Send("inventory", release, success=StockReserved)},
    )
    assert saga.step("reserve").step.compensation is not None
    with pytest.raises(SagaDefinitionError, match="has a compensation already"):
        Saga(
            "s",
            Order,
            steps=[reserve_step(compensation=Call(noop))],
            compensations={"reserve": Call(noop)},
        )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Saga("s", Order, steps=[]), "saga 's' v1 has no steps"),
        (lambda: Saga("s", dict, steps=[reserve_step()]), "data must be a msgspec.Struct"),
        (lambda: Saga("bad name", Order, steps=[reserve_step()]), "saga name 'bad name'"),
        (lambda: Saga("s", Order, steps=[reserve_step()], version=0), "version must be an int"),
        (lambda: Saga("s", Order, steps=[reserve_step()], timeout=0), "timeout must be > 0"),
        (
            lambda: Saga("s", Order, steps=[reserve_step(), reserve_step()]),
            "two steps or groups named 'reserve'",
        ),
        (
            lambda: Saga(
                "s", Order, steps=[Parallel("reserve", [Step("x", Call(noop))]), reserve_step()]
            ),
            "two steps or groups named 'reserve'",
        ),
        (lambda: Parallel("p", []), "parallel group 'p' has no steps"),
        (
            lambda: Parallel("p", [Parallel("q", [Step("x", Call(noop))])]),
            "is not a Step (groups do not nest)",
        ),
        (lambda: Send("inventory", reserve, success=()), "at least one success reply type"),
        (lambda: Send("inventory", reserve, success=ReserveStock), "must be Reply classes"),
        (
            lambda: Send("payments", charge, success=PaymentCharged, failure=PaymentCharged),
            "'t.PaymentCharged' is listed as both success and failure",
        ),
        (lambda: Send("no such/service", charge, success=PaymentCharged), "service name"),
        (
            lambda: Send("payments", charge, success=PaymentCharged, timeout=-1),
            "timeout must be > 0",
        ),
        (lambda: Retry(attempts=0), "Retry.attempts must be an int >= 1"),
        (lambda: Retry(factor=0.5), "Retry.factor >= 1"),
        (lambda: Step("s", "not an action"), "action must be Send or Call"),
        (lambda: Step("s", Call(noop), compensation="nope"), "compensation must be Send, Call"),
        (lambda: Call("not callable"), "is not callable"),
        (lambda: ProcessManager("p", Order, timeout=0), "timeout must be > 0"),
    ],
)
def test_bad_definitions_are_refused_at_declaration(build, message):
    with pytest.raises(SagaDefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_steps_are_numbered_in_groups_and_reply_types_collected():
    saga = order_saga()
    assert [(f.step.name, f.group, f.parallel) for f in saga.steps] == [
        ("reserve-stock", 0, None),
        ("charge-payment", 1, None),
        ("ship", 2, "fulfil"),
        ("confirm", 2, "fulfil"),
    ]
    assert saga.groups == ((0,), (1,), (2, 3))
    types = {t.message_type for t in saga.reply_types}
    assert {"t.StockReserved", "t.StockRejected", "t.PaymentBusy", "t.RefundFailed"} <= types
    with pytest.raises(SagaDefinitionError, match="has no step 'nope'"):
        saga.step("nope")


def test_retry_backoff_grows_caps_and_jitters_in_the_upper_half():
    policy = Retry(attempts=5, backoff=1.0, factor=2.0, max_backoff=5.0, jitter=False)
    assert [policy.delay(n, 0.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    jittered = Retry(attempts=5, backoff=4.0)
    assert jittered.delay(1, 0.0) == 2.0
    assert jittered.delay(1, 0.999) == pytest.approx(4.0, abs=0.01)


def test_the_engine_refuses_a_reply_type_the_service_handles_itself():
    service = Service("own-handler")

    @service.handles(StockReserved)
    async def mine(reply, ctx) -> None:
        return None

    with pytest.raises(SagaDefinitionError, match="has its own handler for it"):
        SagaEngine(service, [order_saga()])


def test_the_engine_refuses_the_same_version_twice_and_a_second_engine():
    service = Service("twice")
    engine = SagaEngine(service, [order_saga()])
    with pytest.raises(SagaDefinitionError, match="v1 is registered already"):
        engine.register(order_saga())
    engine.register(order_saga(version=2))
    assert engine.definition("place-order").version == 2
    assert engine.definition("place-order", 1).version == 1
    with pytest.raises(SagaDefinitionError, match="has no saga or process 'nope'"):
        engine.definition("nope")
    with pytest.raises(SagaDefinitionError, match="has a saga engine already"):
        SagaEngine(service)


def test_a_process_manager_refuses_non_events_and_a_second_route_for_an_event():
    pm = ProcessManager("p", Order)
    with pytest.raises(SagaDefinitionError, match="is not an Event class"):
        pm.on(ChargePayment, key=lambda e: "k")  # type: ignore[type-var]

    class Happened(msgspec.Struct):
        pass

    with pytest.raises(SagaDefinitionError, match="is not an Event class"):
        pm.on(Happened, key=lambda e: "k")  # type: ignore[type-var]


def test_send_knows_the_outcome_of_each_reply_type():
    send = Send("payments", charge, success=PaymentCharged, failure=PaymentDeclined)
    assert send.outcome_of("t.PaymentCharged") == "success"
    assert send.outcome_of("t.PaymentDeclined") == "failure"
    assert send.outcome_of("t.StockReserved") is None
    assert isinstance(charge(Order(order_id="o")), Command)
