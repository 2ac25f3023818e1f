"""Aggregates: state rebuilt from their own stream of events."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, get_type_hints

import msgspec

from atoll.eventstore._errors import MissingApplierError
from atoll.messages import Event

F = TypeVar("F", bound=Callable[..., None])
_APPLIES = "__atoll_applies__"
_RESERVED = frozenset({"id", "version"})


def applies(fn: F) -> F:
    """Mark an aggregate method as the applier of the event type(s) it is annotated with::

    @applies
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount

    A union (``event: Opened | Reopened``) registers the method for each member.
    Appliers change state only: they never check rules or fail (the event happened).
    """
    setattr(fn, _APPLIES, True)
    return fn


class _Pending:
    __slots__ = ("event", "event_id")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.event_id: str | None = None


def _event_types(annotation: Any, where: str) -> list[type[Event]]:
    members = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    found: list[type[Event]] = []
    for member in members:
        if not (isinstance(member, type) and issubclass(member, Event)):
            raise TypeError(f"{where}: the event parameter must be annotated with Event types")
        found.append(member)
    return found


class Aggregate:
    """A consistency boundary whose state is the fold of its events.

    Declare state as annotated class attributes with defaults, and one ``@applies``
    method per event type::

        class Account(Aggregate):
            category = "account"          # streams are named "account-<id>"
            snapshot_every = 100          # optional: snapshot every 100 events

            owner: str = ""
            balance: int = 0

            def deposit(self, amount: int) -> None:
                if amount <= 0:
                    raise ValueError("deposit a positive amount")
                self.record(Deposited(amount=amount))

            @applies
            def _deposited(self, event: Deposited) -> None:
                self.balance += event.amount

    Commands check rules and call :meth:`record`, which applies the event at once and
    keeps it pending until a :class:`~atoll.eventstore.Repository` saves it. State
    fields marked ``Annotated[T, Personal]`` are encrypted in snapshots under the key of
    the subject named by ``data_subject`` (a state field, or ``"id"``).
    """

    category: ClassVar[str] = ""
    snapshot_every: ClassVar[int | None] = None
    snapshot_version: ClassVar[int] = 1
    data_subject: ClassVar[str | None] = None

    state_type: ClassVar[type[msgspec.Struct]]
    state_fields: ClassVar[tuple[str, ...]] = ()
    _appliers: ClassVar[dict[type[Event], Callable[[Any, Any], None]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("category"):
            cls.category = cls.__name__.lower()
        if "-" in cls.category:
            raise TypeError(f"{cls.__qualname__}.category must not contain '-'")
        if cls.snapshot_every is not None and cls.snapshot_every < 1:
            raise TypeError(f"{cls.__qualname__}.snapshot_every must be >= 1 or None")
        cls._build_state()
        cls._collect_appliers()

    @classmethod
    def _build_state(cls) -> None:
        hints = get_type_hints(cls, include_extras=True)
        fields: list[tuple[str, Any, Any]] = []
        for name, annotation in hints.items():
            if (
                name.startswith("_")
                or name in _RESERVED
                or typing.get_origin(annotation) is ClassVar
                or annotation is ClassVar
            ):
                continue
            if not hasattr(cls, name):
                raise TypeError(
                    f"{cls.__qualname__}.{name} needs a default: a new aggregate starts from it"
                )
            fields.append((name, annotation, getattr(cls, name)))
        cls.state_fields = tuple(name for name, _, _ in fields)
        cls.state_type = msgspec.defstruct(
            f"{cls.__name__}State", fields, kw_only=True, module=cls.__module__
        )

    @classmethod
    def _collect_appliers(cls) -> None:
        appliers: dict[type[Event], Callable[[Any, Any], None]] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                if not getattr(fn, _APPLIES, False):
                    continue
                where = f"{klass.__qualname__}.{attr}"
                params = list(inspect.signature(fn).parameters)
                if len(params) != 2:
                    raise TypeError(f"{where} must take (self, event)")
                annotation = get_type_hints(fn).get(params[1])
                for event_type in _event_types(annotation, where):
                    appliers[event_type] = fn
        cls._appliers = appliers

    @classmethod
    def event_types(cls) -> list[type[Event]]:
        """The event types this aggregate applies."""
        return list(cls._appliers)

    @classmethod
    def stream_id_for(cls, aggregate_id: str) -> str:
        """The stream of the aggregate with ``aggregate_id``: ``<category>-<id>``."""
        return f"{cls.category}-{aggregate_id}"

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        #: The version of the last stored event applied (``-1``: nothing stored yet).
        self.version = -1
        self._pending: list[_Pending] = []
        # Saving inside a transaction not yet committed: see Repository.save.
        self._tx: object | None = None
        self._tx_version = -1
        self._tx_count = 0
        self._restore(self.state_type())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, version={self.version})"

    @property
    def stream_id(self) -> str:
        """This aggregate's stream."""
        return self.stream_id_for(self.id)

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """Events recorded but not yet saved."""
        return tuple(p.event for p in self._pending)

    def record(self, event: Event) -> None:
        """Apply ``event`` now and keep it for the next save."""
        self.apply(event)
        self._pending.append(_Pending(event))

    def apply(self, event: Event) -> None:
        """Change state by one event (used by :meth:`record` and when loading)."""
        fn = self._appliers.get(type(event))
        if fn is None:
            raise MissingApplierError(
                f"{type(self).__qualname__} has no applier for {type(event).__qualname__} "
                f"({event.message_type!r}): add an @applies method for it"
            )
        fn(self, event)

    def state(self) -> msgspec.Struct:
        """The state fields as one struct (what a snapshot stores)."""
        return self.state_type(**{name: getattr(self, name) for name in self.state_fields})

    def _restore(self, state: msgspec.Struct) -> None:
        for name in self.state_fields:
            setattr(self, name, getattr(state, name))

    def subject(self) -> str | None:
        """The data subject of this aggregate's personal state fields, if any."""
        if self.data_subject is None:
            return None
        if self.data_subject == "id":
            return self.id
        return str(getattr(self, self.data_subject))
