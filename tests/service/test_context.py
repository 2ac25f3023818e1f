from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from atoll import Context
from atoll.determinism import RandomSource, VirtualClock


class CountingRandom(RandomSource):
    def __init__(self) -> None:
        super().__init__(seed=7)
        self.ids = 0

    def new_id(self) -> str:
        self.ids += 1
        return super().new_id()


def test_derive_takes_the_given_correlation_and_deadline_and_makes_no_id() -> None:
    random = CountingRandom()
    service: Any = SimpleNamespace(name="orders")
    uow: Any = object()
    other: Any = object()
    ctx = Context(service, uow, clock=VirtualClock(), random=random, trace={"traceparent": "x"})
    assert random.ids == 1  # a context with no envelope starts a conversation
    deadline = datetime(2030, 1, 1, tzinfo=UTC)
    derived = ctx.derive(correlation_id="saga-1", deadline=deadline)
    assert random.ids == 1  # the saga's id is its conversation: none is made and dropped
    assert derived.correlation_id == "saga-1"
    assert derived.deadline == deadline
    assert derived.trace == {"traceparent": "x"}
    assert derived.unit_of_work is uow
    assert ctx.derive(correlation_id="saga-2", deadline=None, uow=other).unit_of_work is other
