"""The breaker against a plain model of its documented state machine (Hypothesis, stateful).

The model is written from the documentation, not from the implementation: a count
window as a list, a state, an "epoch" that changes on every transition (calls only
count in the epoch they started in), trial permits while half-open, and a wait that
grows after each failed recovery. Calls may overlap: a rule starts a call (entering
the breaker) and a later rule finishes one of the calls in flight.
"""

import asyncio
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from atoll.determinism import VirtualClock
from atoll.resilience import BreakerOpenError, BulkheadFullError, CircuitBreaker


class FailureError(Exception):
    pass


@dataclass
class Model:
    size: int
    minimum: int
    rate: float
    slow_after: float | None
    slow_rate: float
    wait: float
    multiplier: float
    max_wait: float
    permitted: int
    needed: int
    state: str = "closed"
    epoch: int = 0
    window: list[tuple[bool, bool]] = field(default_factory=list)  # (failed, slow)
    open_until: float = 0.0
    reopens: int = 0
    probes: int = 0
    successes: int = 0
    failures: int = 0

    def move(self, state, now):
        previous = self.state
        self.state = state
        self.epoch += 1
        self.probes = self.successes = self.failures = 0
        if state == "open":
            self.reopens = self.reopens + 1 if previous == "half_open" else 0
            self.open_until = now + min(self.max_wait, self.wait * self.multiplier**self.reopens)
        elif state == "closed":
            self.reopens = 0
            self.window = []

    def admit(self, now):
        """The epoch of an admitted call, or None if refused."""
        if self.state == "open":
            if now < self.open_until:
                return None
            self.move("half_open", now)
        if self.state == "half_open":
            if self.probes >= self.permitted:
                return None
            self.probes += 1
        return self.epoch

    def finish(self, epoch, outcome, started, now):
        if epoch != self.epoch:
            return
        if outcome == "ignored":
            if self.state == "half_open":
                self.probes -= 1
            return
        failed = outcome == "failure"
        slow = self.slow_after is not None and now - started >= self.slow_after
        if self.state == "closed":
            self.window = [*self.window, (failed, slow)][-self.size :]
            calls = len(self.window)
            bad = sum(f for f, _ in self.window)
            sluggish = sum(s for _, s in self.window)
            if calls >= self.minimum and (
                bad >= self.rate * calls
                or (self.slow_after is not None and sluggish >= self.slow_rate * calls)
            ):
                self.move("open", now)
        elif failed or slow:
            self.failures += 1
            if self.failures > self.permitted - self.needed:
                self.move("open", now)
        else:
            self.successes += 1
            if self.successes >= self.needed:
                self.move("closed", now)


async def _await_gate(gate):
    return await gate


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualClock()
        self.pending = []  # (task, gate, epoch, started)

    def teardown(self):
        for task, _, _, _ in self.pending:
            task.cancel()
        if self.pending:
            self.loop.run_until_complete(asyncio.wait([p[0] for p in self.pending]))
        self.loop.close()

    @initialize(
        size=st.integers(1, 8),
        minimum=st.integers(1, 8),
        rate=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        slow_after=st.sampled_from([None, 1.0]),
        slow_rate=st.sampled_from([0.5, 1.0]),
        wait=st.sampled_from([1.0, 2.5]),
        multiplier=st.sampled_from([1.0, 2.0]),
        extra_wait=st.sampled_from([0.0, 3.0]),
        permitted=st.integers(1, 3),
        needed=st.integers(1, 3),
    )
    def configure(
        self,
        *,
        size,
        minimum,
        rate,
        slow_after,
        slow_rate,
        wait,
        multiplier,
        extra_wait,
        permitted,
        needed,
    ):
        minimum = min(minimum, size)
        needed = min(needed, permitted)
        self.model = Model(
            size,
            minimum,
            rate,
            slow_after,
            slow_rate,
            wait,
            multiplier,
            wait + extra_wait,
            permitted,
            needed,
        )
        self.breaker = CircuitBreaker(
            "model",
            window_size=size,
            minimum_calls=minimum,
            failure_rate=rate,
            slow_call_duration=slow_after,
            slow_call_rate=slow_rate,
            wait=wait,
            wait_multiplier=multiplier,
            max_wait=wait + extra_wait,
            half_open_calls=permitted,
            half_open_successes=needed,
            clock=self.clock,
        )
        self.decorated = self.breaker(_await_gate)

    def _start(self, via):
        """Start a call through ``via``; return it if admitted, None if refused."""
        now = self.clock.monotonic()
        epoch = self.model.admit(now)
        gate = self.loop.create_future()
        if via == "call":
            coro = self.breaker.call(_await_gate, gate)
        elif via == "decorator":
            coro = self.decorated(gate)
        else:

            async def guarded():
                async with self.breaker:
                    return await gate

            coro = guarded()
        task = self.loop.create_task(coro)
        self.loop.run_until_complete(asyncio.sleep(0))  # the call enters the breaker
        if task.done():
            assert isinstance(task.exception(), BreakerOpenError)
            assert epoch is None, "the breaker refused a call the model admits"
            return None
        assert epoch is not None, "the breaker admitted a call the model refuses"
        return task, gate, epoch, now

    def _finish(self, call, outcome):
        task, gate, epoch, started = call
        self.model.finish(epoch, outcome, started, self.clock.monotonic())
        exc = None
        if outcome == "success":
            gate.set_result("ok")
        else:
            exc = FailureError() if outcome == "failure" else BulkheadFullError("local", "full")
            gate.set_exception(exc)
        self.loop.run_until_complete(asyncio.wait([task]))
        if exc is None:
            assert task.result() == "ok"
        else:
            assert task.exception() is exc, "the breaker changed or swallowed an exception"

    @rule(
        outcome=st.sampled_from(["success", "failure", "ignored"]),
        via=st.sampled_from(["call", "decorator", "with"]),
    )
    def call(self, outcome, via):
        call = self._start(via)
        if call is not None:
            self._finish(call, outcome)

    @precondition(lambda self: len(self.pending) < 4)
    @rule(via=st.sampled_from(["call", "decorator", "with"]))
    def start_call(self, via):
        call = self._start(via)
        if call is not None:
            self.pending.append(call)

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 3), outcome=st.sampled_from(["success", "failure", "ignored"]))
    def finish_call(self, index, outcome):
        self._finish(self.pending.pop(index % len(self.pending)), outcome)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.5, 4.0]))
    def advance(self, seconds):
        self.loop.run_until_complete(self.clock.advance(seconds))

    @invariant()
    def same_state(self):
        if not hasattr(self, "model"):
            return
        assert self.breaker.state.value == self.model.state
        if self.model.state == "closed":
            snap = self.breaker.snapshot()
            assert snap.window_calls == len(self.model.window)
            assert snap.window_failures == sum(f for f, _ in self.model.window)
            assert snap.window_slow == sum(s for _, s in self.model.window)


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_its_model = BreakerMachine.TestCase
