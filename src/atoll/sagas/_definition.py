"""Declaring an orchestrated saga: steps, their actions and compensations, parallel groups.

A definition is plain data, checked completely when it is constructed: a mistake
(a compensation for a step that does not exist, a reply type that means both success
and failure, two steps with one name) raises :class:`SagaDefinitionError` at import
time, naming the saga and the step, never later while instances run.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from atoll.messages import Command, Reply
from atoll.sagas._errors import SagaDefinitionError

if TYPE_CHECKING:
    from atoll.service import Context

D = TypeVar("D", bound=msgspec.Struct)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SERVICE = re.compile(r"^[A-Za-z0-9_-]+$")


def check_name(what: str, name: object) -> str:
    """``name`` if it is a usable saga or step name, else a clear error."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SagaDefinitionError(
            f"{what} name {name!r} must be 1-100 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Retry:
    """How often an action is attempted and how long to wait between attempts.

    ``attempts`` counts every attempt, the first included (``Retry(attempts=1)`` is no
    retry). The wait before attempt ``n + 1`` is ``min(max_backoff, backoff *
    factor ** (n - 1))``, drawn from its upper half when ``jitter`` is on (so retries of
    many instances spread out without ever being immediate). A zero ``backoff`` retries
    at once, in the same transition.
    """

    attempts: int = 1
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise SagaDefinitionError(f"Retry.attempts must be an int >= 1, not {self.attempts!r}")
        if self.backoff < 0 or self.max_backoff < 0 or self.factor < 1:
            raise SagaDefinitionError(
                "Retry.backoff and Retry.max_backoff must be >= 0 and Retry.factor >= 1"
            )

    def delay(self, failed_attempt: int, draw: float) -> float:
        """Seconds to wait after ``failed_attempt`` failed, given ``draw`` in ``[0, 1)``."""
        ceiling = min(self.max_backoff, self.backoff * self.factor ** (failed_attempt - 1))
        return ceiling * (0.5 + draw / 2) if self.jitter else ceiling


NO_RETRY = Retry()


def _reply_types(what: str, value: type[Reply] | Sequence[type[Reply]]) -> tuple[type[Reply], ...]:
    types = (value,) if isinstance(value, type) else tuple(value)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, Reply)):
            raise SagaDefinitionError(f"{what} must be Reply classes, not {t!r}")
    return types


class Send(Generic[D]):
    """An action that sends a command to a service and waits for its reply.

    ``command(data)`` builds the command; it goes to service ``to`` with the saga id as
    its key and correlation id, so a participant can use ``ctx.correlation_id`` as an
    idempotency key, and an action and its compensation reach the participant in order.

    Replies: ``success`` means done; ``failure`` means the participant did nothing and
    will not (final, not retried); ``retry_on`` means it did nothing this time (the
    attempt is retried under ``retry``). ``on_reply(data, reply)`` runs before the
    transition and may change ``data`` (e.g. keep the payment id for the refund).

    ``timeout`` seconds without a reply fails the attempt; the step is retried under
    ``retry``, and when attempts run out it is ``TIMED_OUT``: its effect is uncertain,
    so it is compensated like a completed step. For a compensation every reply that is
    not a success, and every timeout, is retried; when attempts run out the saga stops
    in ``COMPENSATION_FAILED``.
    """

    __slots__ = (
        "_outcomes",
        "command",
        "failure",
        "on_reply",
        "retry",
        "retry_on",
        "success",
        "timeout",
        "to",
    )

    def __init__(
        self,
        to: str,
        command: Callable[[D], Command],
        *,
        success: type[Reply] | Sequence[type[Reply]],
        failure: type[Reply] | Sequence[type[Reply]] = (),
        retry_on: type[Reply] | Sequence[type[Reply]] = (),
        on_reply: Callable[[D, Any], None] | None = None,
        timeout: float | None = None,
        retry: Retry = NO_RETRY,
    ) -> None:
        if not isinstance(to, str) or not _SERVICE.match(to):
            raise SagaDefinitionError(f"Send: service name {to!r} must be letters, digits, - or _")
        if not callable(command):
            raise SagaDefinitionError(f"Send to {to!r}: command must be a callable data -> Command")
        self.to = to
        self.command = command
        self.success = _reply_types(f"Send to {to!r}: success", success)
        self.failure = _reply_types(f"Send to {to!r}: failure", failure)
        self.retry_on = _reply_types(f"Send to {to!r}: retry_on", retry_on)
        if not self.success:
            raise SagaDefinitionError(f"Send to {to!r}: name at least one success reply type")
        seen: dict[str, str] = {}
        for kind, types in (
            ("success", self.success),
            ("failure", self.failure),
            ("retry_on", self.retry_on),
        ):
            for t in types:
                if t.message_type in seen:
                    raise SagaDefinitionError(
                        f"Send to {to!r}: reply {t.message_type!r} is listed as both"
                        f" {seen[t.message_type]} and {kind}"
                    )
                seen[t.message_type] = kind
        if timeout is not None and timeout <= 0:
            raise SagaDefinitionError(f"Send to {to!r}: timeout must be > 0, not {timeout!r}")
        if not isinstance(retry, Retry):
            raise SagaDefinitionError(f"Send to {to!r}: retry must be a Retry, not {retry!r}")
        self.on_reply = on_reply
        self.timeout = timeout
        self.retry = retry
        self._outcomes = {
            message_type: {"success": "success", "failure": "failure", "retry_on": "retry"}[kind]
            for message_type, kind in seen.items()
        }

    @property
    def reply_types(self) -> tuple[type[Reply], ...]:
        """Every reply type this action accepts."""
        return self.success + self.failure + self.retry_on

    def outcome_of(self, message_type: str) -> str | None:
        """``"success"``, ``"failure"``, ``"retry"`` for a reply type, ``None`` if unexpected."""
        return self._outcomes.get(message_type)

    def describe(self) -> str:
        """A short label: the service and what it is sent."""
        return f"send to {self.to}"

    def __repr__(self) -> str:
        return f"Send({self.to!r}, success={[t.message_type for t in self.success]})"


class Call(Generic[D]):
    """An action that runs a local coroutine in the orchestrator's unit of work.

    ``fn(saga)`` gets a :class:`SagaContext` (the data, the saga id, and ``saga.ctx``
    for queries and messages). Its database changes and messages are kept only if it
    returns; raising :class:`StepFailed` fails the step for good, any other exception
    fails the attempt, which is retried under ``retry``.
    """

    __slots__ = ("fn", "retry")

    def __init__(
        self, fn: Callable[[SagaContext[D]], Awaitable[None]], *, retry: Retry = NO_RETRY
    ) -> None:
        if not callable(fn):
            raise SagaDefinitionError(f"Call: {fn!r} is not callable")
        if not isinstance(retry, Retry):
            raise SagaDefinitionError(f"Call: retry must be a Retry, not {retry!r}")
        self.fn = fn
        self.retry = retry

    @property
    def timeout(self) -> None:
        """Local calls finish inside the transition: no timeout."""
        return None

    def describe(self) -> str:
        """A short label: the function called."""
        return f"call {getattr(self.fn, '__name__', 'local')}"

    def __repr__(self) -> str:
        return f"Call({getattr(self.fn, '__qualname__', self.fn)!r})"


Action = Send[D] | Call[D]


class Step(Generic[D]):
    """One step: an action, optionally a compensation, optionally a condition.

    ``when(data)``, if given, is evaluated when the step is reached; if false the step is
    ``SKIPPED`` (and needs no compensation). A step without a compensation is one whose
    effect needs no undoing (a read, a notification) or cannot be undone (the pivot).
    """

    __slots__ = ("action", "compensation", "name", "when")

    def __init__(
        self,
        name: str,
        action: Send[D] | Call[D],
        *,
        compensation: Send[D] | Call[D] | None = None,
        when: Callable[[D], bool] | None = None,
    ) -> None:
        self.name = check_name("step", name)
        if not isinstance(action, Send | Call):
            raise SagaDefinitionError(f"step {name!r}: action must be Send or Call, not {action!r}")
        if compensation is not None and not isinstance(compensation, Send | Call):
            raise SagaDefinitionError(
                f"step {name!r}: compensation must be Send, Call or None, not {compensation!r}"
            )
        if when is not None and not callable(when):
            raise SagaDefinitionError(f"step {name!r}: when must be a callable data -> bool")
        self.action = action
        self.compensation = compensation
        self.when = when

    def with_compensation(self, compensation: Send[D] | Call[D]) -> Step[D]:
        """A copy of this step with ``compensation``."""
        return Step(self.name, self.action, compensation=compensation, when=self.when)

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


class Parallel(Generic[D]):
    """Steps started together; the saga goes on when all of them have completed.

    If one fails, the others still run to their end (a command in flight cannot be
    recalled), then every completed step is compensated.
    """

    __slots__ = ("name", "steps")

    def __init__(self, name: str, steps: Sequence[Step[D]]) -> None:
        self.name = check_name("parallel group", name)
        steps = tuple(steps)
        if not steps:
            raise SagaDefinitionError(f"parallel group {name!r} has no steps")
        for step in steps:
            if not isinstance(step, Step):
                raise SagaDefinitionError(
                    f"parallel group {name!r}: {step!r} is not a Step (groups do not nest)"
                )
        self.steps = steps

    def __repr__(self) -> str:
        return f"Parallel({self.name!r}, {list(self.steps)!r})"


Hook = Callable[["SagaContext[D]"], Awaitable[None]]


@dataclass(slots=True)
class SagaContext(Generic[D]):
    """What local steps and hooks get: the instance's data and a unit of work.

    ``ctx`` is the orchestrator's :class:`Context` for this transition: queries run in
    its transaction, and messages sent through it carry the saga id as correlation id.
    """

    saga_id: str
    name: str
    version: int
    data: D
    ctx: Context
    step: str | None = None
    attempt: int = 0
    state: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FlatStep(Generic[D]):
    """A step with its position: ``index`` in the saga, ``group`` it belongs to."""

    index: int
    group: int
    step: Step[D]
    parallel: str | None = None


class Saga(Generic[D]):
    """An orchestrated saga: an ordered list of steps and parallel groups.

    ::

        place_order = Saga(
            "place-order",
            OrderData,
            steps=[
                Step("reserve", Send("inventory", reserve, success=Reserved,
                                     failure=OutOfStock, timeout=30, retry=Retry(3)),
                     compensation=Send("inventory", release, success=Released)),
                Step("charge", Send("payments", charge, success=Charged, failure=Declined),
                     compensation=Send("payments", refund, success=Refunded)),
                Parallel("fulfil", [Step("ship", Send("shipping", ship, success=Shipped)),
                                    Step("confirm", Call(confirm))]),
            ],
            timeout=600,
        )

    Steps run in order; on a failure the completed steps are compensated in reverse
    order (the steps of a parallel group together). ``compensations`` declares
    compensations apart from their steps, by step name. ``data`` is a
    :class:`msgspec.Struct` kept with the instance; ``version`` tells definitions apart:
    an instance stays on the version it started with.
    """

    kind = "saga"

    def __init__(
        self,
        name: str,
        data: type[D],
        *,
        steps: Sequence[Step[D] | Parallel[D]],
        version: int = 1,
        timeout: float | None = None,
        compensations: Mapping[str, Send[D] | Call[D]] | None = None,
        on_completed: Hook[D] | None = None,
        on_compensated: Hook[D] | None = None,
        on_compensation_failed: Hook[D] | None = None,
    ) -> None:
        self.name = check_name("saga", name)
        where = f"saga {name!r}"
        if not (isinstance(data, type) and issubclass(data, msgspec.Struct)):
            raise SagaDefinitionError(f"{where}: data must be a msgspec.Struct class, not {data!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SagaDefinitionError(f"{where}: version must be an int >= 1, not {version!r}")
        if timeout is not None and timeout <= 0:
            raise SagaDefinitionError(f"{where}: timeout must be > 0, not {timeout!r}")
        where = f"saga {name!r} v{version}"
        if not steps:
            raise SagaDefinitionError(f"{where} has no steps")
        self.data_type = data
        self.version = version
        self.timeout = timeout
        self.on_completed = on_completed
        self.on_compensated = on_compensated
        self.on_compensation_failed = on_compensation_failed
        flat, groups = _flatten(where, steps)
        _attach_compensations(where, flat, compensations or {})
        self.steps: tuple[FlatStep[D], ...] = tuple(flat)
        self.groups: tuple[tuple[int, ...], ...] = tuple(groups)
        self.index: dict[str, int] = {f.step.name: f.index for f in flat}
        self.decoder: msgspec.json.Decoder[D] = msgspec.json.Decoder(data)

    @property
    def reply_types(self) -> list[type[Reply]]:
        """Every reply type some action or compensation of this saga accepts."""
        found: dict[str, type[Reply]] = {}
        for flat in self.steps:
            for action in (flat.step.action, flat.step.compensation):
                if isinstance(action, Send):
                    for t in action.reply_types:
                        found.setdefault(t.message_type, t)
        return list(found.values())

    def step(self, name: str) -> FlatStep[D]:
        """The step called ``name``, or a :class:`SagaDefinitionError`."""
        index = self.index.get(name)
        if index is None:
            raise SagaDefinitionError(
                f"saga {self.name!r} v{self.version} has no step {name!r}"
                f" (steps: {', '.join(self.index)})"
            )
        return self.steps[index]

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, version={self.version})"


def _flatten(
    where: str, steps: Sequence[Step[D] | Parallel[D]]
) -> tuple[list[FlatStep[D]], list[tuple[int, ...]]]:
    """Number the steps and their groups; refuse duplicate names."""
    flat: list[FlatStep[D]] = []
    groups: list[tuple[int, ...]] = []
    names: set[str] = set()
    for node in steps:
        if isinstance(node, Step):
            members: Sequence[Step[D]] = (node,)
            parallel = None
        elif isinstance(node, Parallel):
            members, parallel = node.steps, node.name
            if node.name in names:
                raise SagaDefinitionError(f"{where}: two steps or groups named {node.name!r}")
            names.add(node.name)
        else:
            raise SagaDefinitionError(f"{where}: {node!r} is not a Step or Parallel")
        indexes = []
        for step in members:
            if step.name in names:
                raise SagaDefinitionError(f"{where}: two steps or groups named {step.name!r}")
            names.add(step.name)
            indexes.append(len(flat))
            flat.append(FlatStep(len(flat), len(groups), step, parallel))
        groups.append(tuple(indexes))
    return flat, groups


def _attach_compensations(
    where: str, flat: list[FlatStep[D]], compensations: Mapping[str, Send[D] | Call[D]]
) -> None:
    """Give the named steps their compensations; refuse names that are no step."""
    by_name = {f.step.name: f for f in flat}
    for step_name, compensation in compensations.items():
        target = by_name.get(step_name)
        if target is None:
            raise SagaDefinitionError(
                f"{where}: a compensation refers to step {step_name!r}, which does not"
                f" exist (steps: {', '.join(by_name)})"
            )
        if target.step.compensation is not None:
            raise SagaDefinitionError(
                f"{where}: step {step_name!r} has a compensation already; declare it in one place"
            )
        if not isinstance(compensation, Send | Call):
            raise SagaDefinitionError(
                f"{where}: compensation of {step_name!r} must be Send or Call"
            )
        flat[target.index] = FlatStep(
            target.index, target.group, target.step.with_compensation(compensation), target.parallel
        )


@dataclass(frozen=True, slots=True)
class SagaMigration:
    """How instances of ``name`` move from ``from_version`` to ``to_version``.

    ``data(old)`` turns the stored data (a dict) into the new version's; ``steps`` maps
    old step names to new ones (unlisted steps keep their name; ``None`` drops a step
    that has nothing left to do). Steps of the new version that nothing maps to start
    ``PENDING`` if the instance has not got that far, else ``SKIPPED``.
    """

    name: str
    from_version: int
    to_version: int
    data: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    steps: Mapping[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.to_version <= self.from_version:
            raise SagaDefinitionError(
                f"migration of {self.name!r}: to_version {self.to_version} must be newer"
                f" than from_version {self.from_version}"
            )
