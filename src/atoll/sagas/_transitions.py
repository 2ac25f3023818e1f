"""The state machine of one saga instance: what a reply, a deadline or an operator does.

A :class:`Run` loads nothing and commits nothing: it is handed an instance loaded in
a unit of work, moves it (sending commands and running local steps through that unit
of work), and leaves the new row and the history entry for the engine to write in the
same unit of work. So a crash anywhere leaves either the old state with nothing sent,
or the new state with its commands in the outbox.

Rules (docs/sagas.md has the diagram):

* Steps run group by group (a plain step is a group of one). A group is settled when
  none of its steps is in flight; then the saga moves on if each step completed or
  was skipped, else it compensates.
* An attempt fails on a timeout, a ``retry_on`` reply, or an error building the
  command or running a local step; it is retried under the action's :class:`Retry`.
  With no attempts left the step is ``FAILED``, or ``TIMED_OUT`` if any attempt timed
  out: its effect is uncertain, so it is compensated like a completed step.
* Compensation goes group by group in reverse; steps ``COMPLETED`` or ``TIMED_OUT``
  with a compensation are compensated, the steps of a group together. A compensation
  that runs out of attempts stops the saga in ``COMPENSATION_FAILED`` (after its
  group's other compensations settle), for an operator to retry or skip.
* A reply is matched to its step by its causation id (the id of the command it
  answers). One of an unexpected type is refused (dead-lettered); one for a step that
  no longer waits (duplicate, late, after a deadline) is recorded and ignored. A
  success from any attempt counts (participants are idempotent per saga); a failure
  counts only from the latest attempt, since a later attempt may still take effect.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic

import msgspec

from atoll.messages import Command, Envelope, Message
from atoll.persistence import Row, UnitOfWork
from atoll.sagas._definition import Call, D, Saga, SagaContext, Send
from atoll.sagas._errors import SagaActionError, StepFailed
from atoll.sagas._state import (
    COMPENSATION_ACTIVE,
    FORWARD_ACTIVE,
    RESTING_STATES,
    TO_COMPENSATE,
    SagaState,
    StepChange,
    StepState,
    StepStatus,
)
from atoll.sagas._store import Instance
from atoll.service import Context, MessageRejected, Service

log = logging.getLogger("atoll.sagas")

_encoder = msgspec.json.Encoder()
_steps_encode = _encoder.encode
SAGA = "(saga)"
# Enum members as module constants: the hot path reads them often, and a module
# global is cheaper than an enum class attribute.
_S_COMPENSATED = StepStatus.COMPENSATED
_S_COMPENSATING = StepStatus.COMPENSATING
_S_COMPENSATION_FAILED = StepStatus.COMPENSATION_FAILED
_S_COMPENSATION_RETRY_WAIT = StepStatus.COMPENSATION_RETRY_WAIT
_S_COMPENSATION_SKIPPED = StepStatus.COMPENSATION_SKIPPED
_S_COMPLETED = StepStatus.COMPLETED
_S_FAILED = StepStatus.FAILED
_S_PENDING = StepStatus.PENDING
_S_RETRY_WAIT = StepStatus.RETRY_WAIT
_S_RUNNING = StepStatus.RUNNING
_S_SKIPPED = StepStatus.SKIPPED
_S_TIMED_OUT = StepStatus.TIMED_OUT
_ABORTED = SagaState.ABORTED
_COMPENSATED = SagaState.COMPENSATED
_COMPENSATING = SagaState.COMPENSATING
_COMPENSATION_FAILED = SagaState.COMPENSATION_FAILED
_COMPLETED = SagaState.COMPLETED
_RUNNING = SagaState.RUNNING
_FORWARD_DONE = frozenset({_S_COMPLETED, _S_SKIPPED})


class BufferedUnitOfWork(UnitOfWork):
    """A view of a unit of work whose messages wait until the local step succeeds.

    Queries go straight to the real unit of work (a SQL savepoint around the step
    undoes them on failure); messages and commit callbacks are handed over only by
    :meth:`flush`, because some backends buffer outbox records in memory where a
    savepoint cannot reach them.
    """

    __slots__ = ("_callbacks", "_inner", "_outgoing")

    def __init__(self, inner: UnitOfWork) -> None:
        self._inner = inner
        self._outgoing: list[dict[str, Any]] = []
        self._callbacks: list[Callable[[], None]] = []

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._inner.execute(sql, *params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._inner.executemany(sql, rows)

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        return await self._inner.fetch_all(sql, *params)

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        return await self._inner.fetch_one(sql, *params)

    def add_outgoing(
        self,
        *,
        message_id: str,
        topic: str,
        key: str | None,
        body: bytes,
        deliver_at: float | None = None,
        traceparent: str | None = None,
    ) -> None:
        self._outgoing.append(
            {
                "message_id": message_id,
                "topic": topic,
                "key": key,
                "body": body,
                "deliver_at": deliver_at,
                "traceparent": traceparent,
            }
        )

    async def claim_inbox(self, consumer: str, message_id: str) -> bool:
        raise RuntimeError(f"a saga's local step cannot claim {message_id} for {consumer}")

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def flush(self) -> None:
        """Hand the buffered messages and callbacks to the real unit of work."""
        for record in self._outgoing:
            self._inner.add_outgoing(**record)
        for callback in self._callbacks:
            self._inner.on_commit(callback)


def saga_context(
    service: Service, ctx: Context, saga_id: str, uow: UnitOfWork | None = None
) -> Context:
    """A :class:`Context` on ``ctx``'s unit of work whose messages belong to the saga.

    Their correlation id and key default to the saga id (replies come back with it);
    they keep the trace and causation of what is being handled, and no deadline: a
    saga outlives the request that started it.
    """
    del service
    return ctx.derive(correlation_id=saga_id, deadline=None, uow=uow)


class Run(Generic[D]):
    """One transition of one saga instance."""

    __slots__ = (
        "_before_effects",
        "_data",
        "_sender",
        "changes",
        "ctx",
        "definition",
        "detail",
        "event",
        "expected_revision",
        "inst",
        "now",
        "service",
        "state_before",
        "steps",
    )

    def __init__(
        self,
        definition: Saga[D],
        inst: Instance,
        ctx: Context,
        service: Service,
        event: str,
        *,
        new: bool = False,
        data: D | None = None,
        steps: list[StepState] | None = None,
    ) -> None:
        self.definition = definition
        self.inst = inst
        self.ctx = ctx
        self.service = service
        self.now = ctx.clock.time()
        self.event = event
        self.detail: dict[str, Any] = {}
        self.changes: list[StepChange] = []
        self.steps: list[StepState] = inst.step_states() if steps is None else steps
        self.state_before: SagaState | None = None if new else inst.state
        self.expected_revision = inst.revision
        self._data: D | None = data
        self._sender: Context | None = None
        #: Awaited (once) before a local step or a hook may touch the unit of work.
        self._before_effects: Callable[[], Awaitable[None]] | None = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def data(self) -> D:
        """The instance's data, decoded on first use."""
        if self._data is None:
            self._data = self.definition.decoder.decode(self.inst.data)
        return self._data

    def _name(self, i: int) -> str:
        return self.definition.steps[i].step.name

    def _set(self, i: int, status: StepStatus, note: str = "") -> None:
        step = self.steps[i]
        if step.status != status or note:
            # Members of a StrEnum are strings already: no .value on this hot path.
            name = self.definition.steps[i].step.name
            self.changes.append(StepChange(name, step.status, status, note))
        step.status = status

    def _saga_note(self, after: SagaState, note: str) -> None:
        self.changes.append(StepChange(SAGA, self.inst.state, after, note))
        self.inst.state = after

    def _sending(self) -> Context:
        if self._sender is None:
            ctx = self.ctx
            if ctx.correlation_id == self.inst.saga_id and ctx.deadline is None:
                self._sender = ctx  # a reply's context is the saga's already
            else:
                self._sender = saga_context(self.service, ctx, self.inst.saga_id)
        return self._sender

    def _context(self, ctx: Context, step: str | None = None, attempt: int = 0) -> SagaContext[D]:
        return SagaContext(
            saga_id=self.inst.saga_id,
            name=self.inst.name,
            version=self.inst.version,
            data=self.data,
            ctx=ctx,
            step=step,
            attempt=attempt,
            state=self.inst.state.value,
            error=self.inst.error,
        )

    def ignore(self, why: str) -> None:
        """Record an input that changes nothing (a duplicate or late reply)."""
        self.event += " (ignored)"
        self.detail["ignored"] = why

    def finish(self) -> None:
        """Fold the run's results into the instance, ready to be written."""
        if self._data is not None:
            self.inst.data = _encoder.encode(self._data).decode()
        inst = self.inst
        inst.steps = _steps_encode(self.steps).decode()
        wake: float | None = None
        state = inst.state
        if state is _RUNNING or state is _COMPENSATING:
            if state is _RUNNING:
                wake = inst.deadline_at
            for step in self.steps:
                due = step.due
                if due is not None and (wake is None or due < wake):
                    wake = due
        inst.wake_at = wake
        inst.updated_at = self.now
        inst.revision += 1

    # -- the state machine ----------------------------------------------------------------

    def _forward_group(self) -> int | None:
        steps = self.steps
        for g, members in enumerate(self.definition.groups):
            for i in members:
                if steps[i].status not in _FORWARD_DONE:
                    return g
        return None

    def _needs_compensation(self, i: int) -> bool:
        return (
            self.steps[i].status in TO_COMPENSATE
            and self.definition.steps[i].step.compensation is not None
        )

    def _compensation_group(self) -> int | None:
        for g in reversed(range(len(self.definition.groups))):
            for i in self.definition.groups[g]:
                status = self.steps[i].status
                if (
                    status in COMPENSATION_ACTIVE
                    or status is _S_COMPENSATION_FAILED
                    or self._needs_compensation(i)
                ):
                    return g
        return None

    async def advance(self) -> None:
        """Move on as far as possible without waiting for anything."""
        while True:
            if self.inst.state is _RUNNING:
                moved = await self._advance_forward()
            elif self.inst.state is _COMPENSATING:
                moved = await self._advance_compensation()
            else:
                moved = False
            if not moved:
                return

    async def _advance_forward(self) -> bool:
        """One step forward; ``False`` once there is nothing to do but wait (or the end)."""
        g = self._forward_group()
        if g is None:
            await self._end(_COMPLETED, "every step completed")
            return False
        members = self.definition.groups[g]
        steps = self.steps
        pending = [i for i in members if steps[i].status is _S_PENDING]
        if pending:
            await self._enter_all(pending)
            # What the next call would find out (without it): the group waits for a step.
            return not self._waits(members)
        for i in members:
            if steps[i].status in FORWARD_ACTIVE:
                return False
        failed = [
            f"{self._name(i)}: {self.steps[i].error or self.steps[i].status.value}"
            for i in members
            if self.steps[i].status not in _FORWARD_DONE
        ]
        self._begin_compensation("; ".join(failed))
        return True

    async def _enter_all(self, pending: list[int]) -> None:
        flat = self.definition.steps
        for i in pending:
            step = flat[i].step
            action = step.action
            if step.when is None and isinstance(action, Send):
                # _enter and _attempt for the common case, without their coroutines.
                self.steps[i].attempt = 0
                reason = self._send(i, action, compensation=False)
                if reason is not None:
                    await self._attempt_failed(i, False, reason, timed_out=False)
            else:
                await self._enter(i)

    def _waits(self, members: Sequence[int]) -> bool:
        """Whether a forward group has no step left to enter and one in flight."""
        steps = self.steps
        waiting = False
        for i in members:
            status = steps[i].status
            if status is _S_PENDING:
                return False
            if status in FORWARD_ACTIVE:
                waiting = True
        return waiting

    async def _advance_compensation(self) -> bool:
        """One step back; ``False`` once there is nothing to do but wait (or the end)."""
        g = self._compensation_group()
        if g is None:
            await self._end(_COMPENSATED, "every completed step is compensated")
            return False
        members = self.definition.groups[g]
        todo = [i for i in members if self._needs_compensation(i)]
        if todo:
            for i in todo:
                self.steps[i].attempt = 0
                await self._attempt(i, compensation=True)
            return True
        if any(self.steps[i].status in COMPENSATION_ACTIVE for i in members):
            return False
        failed = [self._name(i) for i in members if self.steps[i].status is _S_COMPENSATION_FAILED]
        await self._end(
            _COMPENSATION_FAILED,
            f"compensation of {', '.join(failed)} failed; an operator can retry or skip it",
        )
        return False

    def _begin_compensation(self, reason: str) -> None:
        if self.inst.error is None or self.inst.state is _RUNNING:
            self.inst.error = reason
        self._saga_note(_COMPENSATING, reason)

    async def _end(self, state: SagaState, note: str) -> None:
        self._saga_note(state, note)
        self.inst.deadline_at = None if state in RESTING_STATES else self.inst.deadline_at
        if state is _COMPLETED:
            self.inst.error = None
        if state is _COMPLETED:
            hook = self.definition.on_completed
        elif state is _COMPENSATED:
            hook = self.definition.on_compensated
        elif state is _COMPENSATION_FAILED:
            hook = self.definition.on_compensation_failed
        else:
            hook = None
        if hook is not None:
            await self._effects()
            context = self._context(self._sending())
            await hook(context)
            self._data = context.data

    async def _enter(self, i: int) -> None:
        step = self.definition.steps[i].step
        if step.when is not None:
            try:
                go = bool(step.when(self.data))
            except Exception as exc:
                self.steps[i].error = f"when() raised {exc!r}"
                self._set(i, _S_FAILED, self.steps[i].error or "")
                return
            if not go:
                self._set(i, _S_SKIPPED, "condition is false")
                return
        self.steps[i].attempt = 0
        await self._attempt(i, compensation=False)

    async def _attempt(self, i: int, *, compensation: bool) -> None:
        """Start the next attempt of the step's action or compensation."""
        step = self.definition.steps[i].step
        action = step.compensation if compensation else step.action
        assert action is not None
        if isinstance(action, Send):
            reason = self._send(i, action, compensation=compensation)
            if reason is not None:
                await self._attempt_failed(i, compensation, reason, timed_out=False)
            return
        state = self.steps[i]
        state.attempt += 1
        state.due = None
        outcome, reason = await self._call(action, i, state.attempt)
        if outcome == "ok":
            state.error = None
            self._set(
                i,
                _S_COMPENSATED if compensation else _S_COMPLETED,
                f"{action.describe()} returned (attempt {state.attempt})",
            )
        elif outcome == "failed" and not compensation:
            state.error = reason
            self._set(i, _S_FAILED, f"{action.describe()} failed: {reason}")
        else:
            await self._attempt_failed(i, compensation, reason, timed_out=False)

    def _send(self, i: int, action: Send[D], *, compensation: bool) -> str | None:
        """Start the next attempt of a :class:`Send`; why it failed if the command could
        not be built (the caller counts the attempt as failed)."""
        state = self.steps[i]
        state.attempt += 1
        state.due = None
        command = self._build(action)
        if isinstance(command, str):
            return command
        message_id = self._sending().send(command, to=action.to, key=self.inst.saga_id)
        (state.csent if compensation else state.sent).append(message_id)
        if action.timeout is not None:
            state.due = self.now + action.timeout
        self._set(
            i,
            _S_COMPENSATING if compensation else _S_RUNNING,
            f"sent {command.message_type} to {action.to} (attempt {state.attempt})",
        )
        return None

    def _build(self, action: Send[D]) -> Command | str:
        """The action's command, or why it could not be built."""
        try:
            command: object = action.command(self.data)
        except Exception as exc:
            return f"building the command failed: {exc!r}"
        if not isinstance(command, Command):
            return f"building the command failed: got {type(command).__name__}, not a Command"
        return command

    async def _call(self, action: Call[D], i: int, attempt: int) -> tuple[str, str]:
        """Run a local step in a savepoint; its messages wait until it returns."""
        await self._effects()
        snapshot = _encoder.encode(self.data)
        buffered = BufferedUnitOfWork(self.ctx.unit_of_work)
        local = saga_context(self.service, self.ctx, self.inst.saga_id, buffered)
        context = self._context(local, self._name(i), attempt)
        await self.ctx.execute("SAVEPOINT atoll_saga_step")
        try:
            await action.fn(context)
        except Exception as exc:
            await self.ctx.execute("ROLLBACK TO SAVEPOINT atoll_saga_step")
            await self.ctx.execute("RELEASE SAVEPOINT atoll_saga_step")
            self._data = self.definition.decoder.decode(snapshot)
            if isinstance(exc, StepFailed):
                return "failed", str(exc)
            log.info("saga %s: local step %s raised %r", self.inst.saga_id, self._name(i), exc)
            return "error", f"{action.describe()} raised {exc!r}"
        await self.ctx.execute("RELEASE SAVEPOINT atoll_saga_step")
        buffered.flush()
        self._data = context.data
        return "ok", ""

    async def _attempt_failed(
        self, i: int, compensation: bool, reason: str, *, timed_out: bool
    ) -> None:
        step = self.definition.steps[i].step
        action = step.compensation if compensation else step.action
        assert action is not None
        state = self.steps[i]
        state.error = reason
        state.due = None
        if timed_out and not compensation:
            state.uncertain = True
        policy = action.retry
        if state.attempt < policy.attempts:
            delay = policy.delay(state.attempt, self.ctx.random.random())
            if delay <= 0:
                self.changes.append(
                    StepChange(
                        self._name(i),
                        state.status,
                        state.status,
                        f"attempt {state.attempt} failed: {reason}; retrying now",
                    )
                )
                await self._attempt(i, compensation=compensation)
                return
            state.due = self.now + delay
            self._set(
                i,
                _S_COMPENSATION_RETRY_WAIT if compensation else _S_RETRY_WAIT,
                f"attempt {state.attempt} failed: {reason}; next attempt in {delay:.3g}s",
            )
            return
        if compensation:
            final = _S_COMPENSATION_FAILED
        else:
            final = _S_TIMED_OUT if state.uncertain else _S_FAILED
        self._set(i, final, f"attempt {state.attempt} failed: {reason}; no attempts left")

    def _abandon_forward(self, reason: str) -> None:
        """Stop waiting for the steps in flight: their effect is uncertain if a command went."""
        for i, state in enumerate(self.steps):
            if state.status not in FORWARD_ACTIVE:
                continue
            state.due = None
            uncertain = state.status is _S_RUNNING and bool(state.sent)
            if uncertain or state.uncertain:
                state.uncertain = True
                self._set(i, _S_TIMED_OUT, reason)
            else:
                self._set(i, _S_FAILED, reason)
            state.error = state.error or reason

    # -- inputs ---------------------------------------------------------------------------

    async def begin(self) -> None:
        """A new instance: enter the first group."""
        self.changes.append(StepChange(SAGA, "", _RUNNING, "started"))
        await self.advance()

    async def begin_unchecked(
        self, check: Callable[[], Awaitable[None]]
    ) -> BufferedUnitOfWork | None:
        """:meth:`begin` for an instance whose id may be taken, not checked yet.

        The commands it sends wait in a buffer. Only a local step or a hook touches the
        unit of work otherwise: ``check()`` (which raises if the id is taken) is awaited
        before the first of them, and the buffer handed over then. Returns the buffer if
        that did not happen: the caller inserts the row (which refuses a taken id) and
        then flushes it, so a taken id has written and sent nothing.
        """
        buffered = BufferedUnitOfWork(self.ctx.unit_of_work)
        self._sender = saga_context(self.service, self.ctx, self.inst.saga_id, buffered)
        pending: list[BufferedUnitOfWork] = [buffered]

        async def before_effects() -> None:
            await check()
            pending.clear()
            buffered.flush()
            self._sender = None  # from now on, straight into the unit of work

        self._before_effects = before_effects
        await self.begin()
        self._before_effects = None
        return pending[0] if pending else None

    async def _effects(self) -> None:
        before, self._before_effects = self._before_effects, None
        if before is not None:
            await before()

    def match(self, causation_id: str | None) -> tuple[int, bool] | None:
        """The step (and whether its compensation) whose command has this message id."""
        if causation_id is None:
            return None
        for i, state in enumerate(self.steps):
            if causation_id in state.sent:
                return i, False
            if causation_id in state.csent:
                return i, True
        return None

    def _match_reply(self, envelope: Envelope) -> tuple[int, bool, Send[D], str]:
        """The step, phase, action and outcome a reply is for, or :class:`MessageRejected`."""
        found = self.match(envelope.causation_id)
        if found is None:
            raise MessageRejected(
                f"{_reply_name(envelope)} answers no command of {self._saga_name()}"
                f" (its causation id {envelope.causation_id!r} is not a command the saga sent)"
            )
        i, compensation = found
        step = self.definition.steps[i].step
        action = step.compensation if compensation else step.action
        if not isinstance(action, Send):  # the ids were recorded by a Send
            raise MessageRejected(
                f"{_reply_name(envelope)}: step {step.name!r} of {self._saga_name()}"
                " sends no command"
            )
        outcome = action.outcome_of(envelope.type)
        if outcome is None:
            expected = ", ".join(t.message_type for t in action.reply_types)
            phase = "compensation" if compensation else "action"
            raise MessageRejected(
                f"{_reply_name(envelope)} is not a reply {self._saga_name()} expects from the"
                f" {phase} of step {step.name!r} (it expects {expected})"
            )
        return i, compensation, action, outcome

    def _saga_name(self) -> str:
        return f"saga {self.inst.saga_id!r} ({self.inst.name} v{self.inst.version})"

    async def on_reply(self, envelope: Envelope, reply: Message) -> None:
        """A reply to one of the saga's commands."""
        i, compensation, action, outcome = self._match_reply(envelope)
        step = self.definition.steps[i].step
        detail = self.detail
        detail["reply"] = {"type": envelope.type, "id": envelope.id, "from": envelope.source}
        detail["step"] = step.name
        state = self.steps[i]
        sent = state.csent if compensation else state.sent
        causation = envelope.causation_id or ""
        active = COMPENSATION_ACTIVE if compensation else FORWARD_ACTIVE
        if self.inst.state in RESTING_STATES or state.status not in active:
            phase = "compensation" if compensation else "action"
            self.ignore(
                f"step {step.name!r} is {state.status.value} and the saga"
                f" {self.inst.state.value}: a duplicate or late reply to its {phase}"
            )
            return
        success = outcome == "success"
        if not success:
            # A success from any attempt is final (participants are idempotent per saga). A
            # failure is not while a later attempt may still succeed: the latest decides.
            latest = sent[-1] == causation
            waiting = state.status in (_S_RETRY_WAIT, _S_COMPENSATION_RETRY_WAIT)
            if not latest:
                self.ignore(
                    f"a failure of an earlier attempt of step {step.name!r}: the latest decides"
                )
                return
            if waiting and (compensation or outcome == "retry"):
                self.ignore(f"answers an attempt of step {step.name!r} already counted as failed")
                return
        if action.on_reply is not None:
            action.on_reply(self.data, reply)
        if success:
            state.due = None
            state.error = None
            if not compensation:
                state.uncertain = False
            self._set(
                i,
                _S_COMPENSATED if compensation else _S_COMPLETED,
                f"{envelope.type} (attempt {sent.index(causation) + 1})",
            )
        elif compensation or outcome == "retry":
            await self._attempt_failed(i, compensation, _reply_text(envelope), timed_out=False)
        else:
            state.due = None
            state.uncertain = False
            state.error = _reply_text(envelope)
            self._set(i, _S_FAILED, state.error)
        await self.advance()

    async def on_timer(self) -> None:
        """Deadlines and retries that are due."""
        if (
            self.inst.state is _RUNNING
            and self.inst.deadline_at is not None
            and self.inst.deadline_at <= self.now
        ):
            reason = f"the saga's deadline passed ({self.definition.timeout:g}s)"
            self._abandon_forward(reason)
            self.inst.error = reason
            self._saga_note(_COMPENSATING, reason)
            await self.advance()
            return
        if self.inst.state not in (_RUNNING, _COMPENSATING):
            return
        for i, state in enumerate(self.steps):
            if state.due is None or state.due > self.now:
                continue
            step = self.definition.steps[i].step
            if state.status is _S_RUNNING:
                await self._attempt_failed(
                    i, False, f"no reply within {step.action.timeout or 0:g}s", timed_out=True
                )
            elif state.status is _S_RETRY_WAIT:
                await self._attempt(i, compensation=False)
            elif state.status is _S_COMPENSATING:
                timeout = step.compensation.timeout if step.compensation else None
                await self._attempt_failed(
                    i, True, f"no reply within {timeout or 0:g}s", timed_out=True
                )
            elif state.status is _S_COMPENSATION_RETRY_WAIT:
                await self._attempt(i, compensation=True)
            else:
                state.due = None
        await self.advance()

    # -- operator actions -----------------------------------------------------------------

    def _targets(self, step: str | None, statuses: frozenset[StepStatus]) -> list[int]:
        if step is not None:
            i = self.definition.step(step).index
            if self.steps[i].status not in statuses:
                raise SagaActionError(
                    f"step {step!r} of saga {self.inst.saga_id!r} is"
                    f" {self.steps[i].status.value}; this action needs it"
                    f" {' or '.join(sorted(s.value for s in statuses))}"
                )
            return [i]
        found = [i for i, s in enumerate(self.steps) if s.status in statuses]
        if not found:
            raise SagaActionError(
                f"saga {self.inst.saga_id!r} has no step that is"
                f" {' or '.join(sorted(s.value for s in statuses))}"
            )
        return found

    def _refuse(self, action: str) -> SagaActionError:
        return SagaActionError(
            f"cannot {action} saga {self.inst.saga_id!r}: it is {self.inst.state.value}"
        )

    async def retry(self, step: str | None) -> None:
        """Try the step(s) in flight or failed again now, with fresh attempts."""
        state = self.inst.state
        if state in (_COMPENSATION_FAILED, _COMPENSATING):
            targets = self._targets(step, COMPENSATION_ACTIVE | {_S_COMPENSATION_FAILED})
            if state is _COMPENSATION_FAILED:
                self._saga_note(_COMPENSATING, "retrying compensation")
            for i in targets:
                self.steps[i].attempt = 0
                await self._attempt(i, compensation=True)
        elif state is _RUNNING:
            for i in self._targets(step, FORWARD_ACTIVE):
                self.steps[i].attempt = 0
                await self._attempt(i, compensation=False)
        else:
            raise self._refuse("retry")
        await self.advance()

    async def skip(self, step: str) -> None:
        """Go on as if the step's action (or compensation) had succeeded."""
        state = self.inst.state
        if state in (_COMPENSATION_FAILED, _COMPENSATING):
            (i,) = self._targets(step, COMPENSATION_ACTIVE | {_S_COMPENSATION_FAILED})
            self.steps[i].due = None
            self._set(i, _S_COMPENSATION_SKIPPED, "skipped by an operator")
            if state is _COMPENSATION_FAILED:
                self._saga_note(_COMPENSATING, "compensation goes on")
        elif state is _RUNNING:
            (i,) = self._targets(step, FORWARD_ACTIVE)
            self.steps[i].due = None
            self._set(i, _S_COMPLETED, "skipped by an operator: treated as completed")
        else:
            raise self._refuse("skip a step of")
        await self.advance()

    async def compensate(self, reason: str) -> None:
        """Stop going forward and undo what was done."""
        state = self.inst.state
        if state is _RUNNING:
            self._abandon_forward(f"compensation forced: {reason}")
            self.inst.error = f"compensation forced by an operator: {reason}"
            self._saga_note(_COMPENSATING, self.inst.error)
        elif state is _COMPLETED:
            self.inst.error = f"compensation forced by an operator: {reason}"
            self._saga_note(_COMPENSATING, self.inst.error)
        elif state is _COMPENSATION_FAILED:
            await self.retry(None)
            return
        else:
            raise self._refuse("compensate")
        await self.advance()

    def abort(self, reason: str) -> None:
        """Stop the instance where it is; nothing more is sent or compensated."""
        if self.inst.state in RESTING_STATES - {_COMPENSATION_FAILED}:
            raise self._refuse("abort")
        for state in self.steps:
            state.due = None
        self.inst.error = f"aborted by an operator: {reason}"
        self._saga_note(_ABORTED, self.inst.error)


def _reply_name(envelope: Envelope) -> str:
    return f"reply {envelope.type} (message {envelope.id} from {envelope.source})"


def _reply_text(envelope: Envelope) -> str:
    payload = bytes(envelope.payload).decode("utf-8", errors="replace")
    if len(payload) > 300:
        payload = payload[:297] + "..."
    return f"{envelope.type} {payload}"
