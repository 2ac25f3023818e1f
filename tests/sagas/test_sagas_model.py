"""A Hypothesis state machine drives sagas through random replies, duplicates, delays,
deadlines and crashes, and checks that each ends COMPLETED, COMPENSATED or
COMPENSATION_FAILED with exactly the compensations its completed steps call for.

Participants are modelled as real ones behave: idempotent per saga (a second attempt of
an action that took effect answers success), and each handles a saga's commands in the
order they were sent (the transport keeps per-key order; the key is the saga id).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
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
    make_engine,
    order_saga,
)

from atoll import _crash
from atoll.sagas import Retry, SagaState
from atoll.testing import SagaTestKit, SentCommand, SimulatedCrash

#: (participant, action command, compensation command, step name)
STEPS = {
    "inventory": (ReserveStock, ReleaseStock, "reserve-stock"),
    "payments": (ChargePayment, RefundPayment, "charge-payment"),
    "shipping": (ScheduleShipment, CancelShipment, "ship"),
}
GROUP = {"reserve-stock": 0, "charge-payment": 1, "ship": 2, "confirm": 2}
ENDED = {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED"}
SAGA = order_saga(
    timeout=600,
    step_timeout=30,
    retry=Retry(attempts=2, backoff=5, jitter=False),
    compensation_retry=Retry(attempts=3, backoff=5, jitter=False),
)


def crash(point: str) -> None:
    raise SimulatedCrash(point)


class Participants:
    """What the participants did: effects per (participant, saga), applied and undone."""

    def __init__(self) -> None:
        self.effect: dict[tuple[str, str], bool] = defaultdict(bool)
        self.applied: dict[tuple[str, str], int] = defaultdict(int)
        self.undone: dict[tuple[str, str], int] = defaultdict(int)

    def handle(self, sent: SentCommand, choice: int) -> object:
        """The reply to ``sent``; ``choice`` picks among the possible answers."""
        to, saga = sent.to, sent.saga_id
        action, _, _ = STEPS[to]
        order_id = sent.command.order_id  # type: ignore[attr-defined]
        key = (to, saga)
        if isinstance(sent.command, action):
            if self.effect[key]:
                choice = 0  # idempotent: it took effect already
            if to == "inventory":
                outcomes = [
                    StockReserved(order_id=order_id),
                    StockRejected(order_id=order_id, reason="no"),
                ]
            elif to == "payments":
                outcomes = [
                    PaymentCharged(order_id=order_id, payment_id=f"p-{saga}"),
                    PaymentDeclined(order_id=order_id, reason="no"),
                    PaymentBusy(order_id=order_id),
                ]
            else:
                outcomes = [ShipmentScheduled(order_id=order_id)]
            reply = outcomes[choice % len(outcomes)]
            if reply is outcomes[0] and not self.effect[key]:
                self.effect[key] = True
                self.applied[key] += 1
            return reply
        # A compensation: undo if there is something to undo; payments may fail to refund.
        if to == "payments" and choice % 4 == 3:
            return RefundFailed(order_id=order_id, reason="gateway down")
        if self.effect[key]:
            self.effect[key] = False
            self.undone[key] += 1
        return {
            "inventory": StockReleased(order_id=order_id),
            "payments": PaymentRefunded(order_id=order_id),
            "shipping": ShipmentCancelled(order_id=order_id),
        }[to]


class SagaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.kit = SagaTestKit(make_engine("model-orders", SAGA), Path(self.tmp.name))
        self.participants = Participants()
        self.queues: dict[tuple[str, str], list[SentCommand]] = defaultdict(list)
        self.taken = 0
        self.replies: list[tuple[SentCommand, object]] = []
        self.delivered: list[tuple[SentCommand, object]] = []
        self.sagas: list[str] = []
        self.run(self.kit.open())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.drain()
            self.check_end()
        finally:
            _crash.arm(None)
            self.run(self.kit.close())
            self.loop.close()
            self.tmp.cleanup()

    def collect(self) -> None:
        """New commands join their participant's queue for their saga (per-key order)."""
        for sent in self.kit.sent[self.taken :]:
            self.queues[(sent.to, sent.saga_id)].append(sent)
        self.taken = len(self.kit.sent)

    def act(self, coro) -> None:
        try:
            self.run(coro)
        except SimulatedCrash:
            _crash.arm(None)
            self.run(self.kit.restart())
            self.run(self.kit.run())
        self.collect()

    # -- rules ----------------------------------------------------------------------------

    @initialize()
    def first_saga(self) -> None:
        self.start(True)

    @precondition(lambda self: len(self.sagas) < 4)
    @rule(ship=st.booleans())
    def start(self, ship: bool) -> None:
        saga_id = f"s{len(self.sagas)}"
        self.sagas.append(saga_id)
        self.act(self.kit.start(SAGA, Order(order_id=saga_id, ship=ship), saga_id=saga_id))

    @precondition(lambda self: any(self.queues.values()))
    @rule(data=st.data())
    def participant_handles_a_command(self, data: st.DataObject) -> None:
        keys = sorted(k for k, q in self.queues.items() if q)
        key = data.draw(st.sampled_from(keys))
        sent = self.queues[key].pop(0)
        choice = data.draw(st.integers(0, 5))
        self.replies.append((sent, self.participants.handle(sent, choice)))

    @precondition(lambda self: any(self.queues.values()))
    @rule(data=st.data())
    def participant_answers_at_once(self, data: st.DataObject) -> None:
        keys = sorted(k for k, q in self.queues.items() if q)
        sent = self.queues[data.draw(st.sampled_from(keys))].pop(0)
        reply = self.participants.handle(sent, data.draw(st.integers(0, 5)))
        self.delivered.append((sent, reply))
        self.act(self.kit.reply(sent, reply))  # type: ignore[arg-type]

    @precondition(lambda self: self.replies)
    @rule(data=st.data(), crash_first=st.booleans())
    def a_reply_arrives(self, data: st.DataObject, crash_first: bool) -> None:
        index = data.draw(st.integers(0, len(self.replies) - 1))
        sent, reply = self.replies.pop(index)
        self.delivered.append((sent, reply))
        if crash_first:
            # The orchestrator dies mid-transition: nothing of it is kept, the reply stays queued.
            _crash.arm("saga.after_transition", handler=crash)
        self.act(self.kit.reply(sent, reply))  # type: ignore[arg-type]
        _crash.arm(None)

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def a_participant_answers_twice(self, data: st.DataObject) -> None:
        sent, reply = data.draw(st.sampled_from(self.delivered))
        self.act(self.kit.reply(sent, reply))  # type: ignore[arg-type]

    @rule(seconds=st.sampled_from([1, 5, 29, 31, 200]), crash_first=st.booleans())
    def time_passes(self, seconds: int, crash_first: bool) -> None:
        if crash_first:
            _crash.arm("saga.after_transition", handler=crash)
        self.act(self.kit.advance(seconds))
        _crash.arm(None)

    @rule()
    def the_orchestrator_restarts(self) -> None:
        self.act(self.kit.restart())

    # -- checks ---------------------------------------------------------------------------

    @invariant()
    def nothing_is_dead_lettered(self) -> None:
        assert self.kit.dead_letters == [], self.kit.dead_letters

    def drain(self) -> None:
        """Let everything finish: participants answer, replies arrive, time passes."""
        for _ in range(200):
            self.collect()
            busy = False
            for key in sorted(self.queues):
                while self.queues[key]:
                    sent = self.queues[key].pop(0)
                    self.replies.append((sent, self.participants.handle(sent, 0)))
                    busy = True
            while self.replies:
                sent, reply = self.replies.pop(0)
                self.act(self.kit.reply(sent, reply))  # type: ignore[arg-type]
                busy = True
            if busy:
                continue
            if set(self.run(self.kit.states()).values()) <= ENDED:
                return
            self.act(self.kit.advance(100))
        raise AssertionError(f"sagas did not end: {self.run(self.kit.states())}")

    def check_end(self) -> None:
        states = self.run(self.kit.states())
        assert set(states) == set(self.sagas)
        for saga_id, state in states.items():
            assert state in ENDED, f"{saga_id} ended {state}"
            view = self.run(self.kit.instance(saga_id))
            status = {s.name: s.status for s in view.steps}
            sent = [s for s in self.kit.sent if s.saga_id == saga_id]
            compensated_steps = [
                STEPS[s.to][2] for s in sent if isinstance(s.command, STEPS[s.to][1])
            ]
            order = [GROUP[name] for name in dict.fromkeys(compensated_steps)]
            assert order == sorted(order, reverse=True), f"{saga_id}: compensations out of order"
            for to, (_, _, step) in STEPS.items():
                effect = self.participants.effect[(to, saga_id)]
                assert self.participants.applied[(to, saga_id)] <= 1, f"{saga_id}: {step} twice"
                if state == SagaState.COMPLETED:
                    assert step not in compensated_steps, f"{saga_id}: a completed saga compensated"
                    assert effect == (status[step] == "COMPLETED"), (saga_id, step, status)
                elif state == SagaState.COMPENSATED:
                    assert not effect, (
                        f"{saga_id}: {step}'s effect outlived compensation ({status})"
                    )
                    assert status[step] in ("PENDING", "SKIPPED", "FAILED", "COMPENSATED"), status
                    if status[step] == "COMPENSATED":
                        assert step in compensated_steps
                    if status[step] == "FAILED":
                        assert step not in compensated_steps
            if state == SagaState.COMPENSATION_FAILED:
                assert "COMPENSATION_FAILED" in status.values()
                failed_group = min(
                    GROUP[n] for n, s in status.items() if s == "COMPENSATION_FAILED"
                )
                for name, s in status.items():
                    if GROUP[name] > failed_group and name in compensated_steps:
                        assert s == "COMPENSATED", (saga_id, status)


TestSagaMachine = SagaMachine.TestCase
TestSagaMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
