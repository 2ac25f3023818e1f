"""The states of saga instances and their steps, and what operators and listeners see."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class SagaState(StrEnum):
    """Where a saga instance (or process instance) is.

    ``RUNNING`` and ``COMPENSATING`` move on by themselves (replies, deadlines, retries).
    ``COMPENSATION_FAILED`` waits for an operator: it is visible, never silent.
    ``COMPLETED``, ``COMPENSATED``, ``FAILED`` (a process manager that failed) and
    ``ABORTED`` (an operator stopped it) are final.
    """

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


#: States no reply, event or deadline moves any more.
FINAL_STATES = frozenset(
    {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED, SagaState.ABORTED}
)
#: States where an instance rests until something from outside happens.
RESTING_STATES = FINAL_STATES | {SagaState.COMPENSATION_FAILED}


class StepStatus(StrEnum):
    """Where one step of a saga instance is."""

    PENDING = "PENDING"
    SKIPPED = "SKIPPED"
    RUNNING = "RUNNING"
    RETRY_WAIT = "RETRY_WAIT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    COMPENSATING = "COMPENSATING"
    COMPENSATION_RETRY_WAIT = "COMPENSATION_RETRY_WAIT"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    COMPENSATION_SKIPPED = "COMPENSATION_SKIPPED"


FORWARD_ACTIVE = frozenset({StepStatus.RUNNING, StepStatus.RETRY_WAIT})
COMPENSATION_ACTIVE = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRY_WAIT})
#: Statuses after which a step's effect may exist, so it is compensated if it can be.
TO_COMPENSATE = frozenset({StepStatus.COMPLETED, StepStatus.TIMED_OUT})


class StepState(msgspec.Struct, array_like=True):
    """The stored progress of one step (compact: one JSON array per step).

    ``attempt`` counts attempts of the current phase (action, then compensation);
    ``sent``/``csent`` hold the message ids of the commands sent for the action and the
    compensation, which is how a reply (whose causation id is the command's id) finds
    its step. ``due`` is when the attempt in flight times out or the next attempt is
    due. ``uncertain`` is set once an attempt timed out: the effect may exist.
    """

    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    sent: list[str] = msgspec.field(default_factory=list)
    csent: list[str] = msgspec.field(default_factory=list)
    due: float | None = None
    uncertain: bool = False
    error: str | None = None


class StepView(msgspec.Struct, kw_only=True):
    """One step as operators see it."""

    name: str
    group: int
    parallel: str | None
    status: str
    attempt: int
    due: float | None
    error: str | None
    commands_sent: int
    compensations_sent: int
    has_compensation: bool


class HistoryEntry(msgspec.Struct, kw_only=True):
    """One recorded transition of an instance (or an ignored input, or an operator action)."""

    seq: int
    at: float
    event: str
    state: str
    changes: list[list[str]]
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class SagaSummary(msgspec.Struct, kw_only=True):
    """An instance in a listing."""

    saga_id: str
    name: str
    version: int
    kind: str
    state: str
    error: str | None
    wake_at: float | None
    created_at: float
    updated_at: float


class SagaView(SagaSummary, kw_only=True):
    """An instance with its data, its steps and its history."""

    correlation_id: str | None
    deadline_at: float | None
    revision: int
    data: dict[str, Any]
    steps: list[StepView]
    timers: dict[str, float]
    history: list[HistoryEntry]


class StepChange(msgspec.Struct, frozen=True, array_like=True):
    """One step's status change within a transition."""

    step: str
    before: str
    after: str
    note: str = ""


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """What listeners get after a transition is committed.

    For tracing: ``saga_id`` and each change's ``step`` are the span attributes; for
    metrics: ``state_before`` -> ``state_after`` moves one instance between counts.
    """

    saga_id: str
    name: str
    version: int
    kind: str
    event: str
    state_before: str | None
    state_after: str
    changes: tuple[StepChange, ...]
    at: float
    correlation_id: str | None
