"""Projections: read models updated from the global log, exactly once, with visible lag."""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
import typing
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar, get_type_hints

import msgspec

from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._codec import EventCodec, EventRecord, UnknownEvent
from atoll.eventstore._crypto import SubjectKeys
from atoll.eventstore._errors import CheckpointConflictError, ProjectionFailedError
from atoll.eventstore._model import START, RawEvent
from atoll.eventstore._subscription import HELD_BACK_FIRST_POLL
from atoll.messages import Event

log = logging.getLogger("atoll.eventstore")

F = TypeVar("F", bound=Callable[..., Awaitable[None]])
AnyRecord = EventRecord[Event | UnknownEvent]
Handler = Callable[[Any, Any, Transaction], Awaitable[None]]
_ON = "__atoll_projection_on__"

State = Literal["stopped", "catching_up", "live", "failing"]


def on(fn: F) -> F:
    """Mark a projection method as the handler of the event type in its annotation::

    @on
    async def placed(self, record: EventRecord[OrderPlaced], tx: Transaction) -> None:
        await tx.execute("INSERT INTO order_totals ...", record.event.order_id, ...)
    """
    setattr(fn, _ON, True)
    return fn


class Projection:
    """A read model kept up to date from the global log.

    Subclass it, name it, create its tables in :meth:`setup`, clear them in
    :meth:`reset` (for rebuilds), and handle events with ``@on`` methods (or override
    :meth:`handle`). Handlers write through ``tx``: the same transaction records the
    projection's checkpoint, so each event changes the read model exactly once. Events
    of other types (and :class:`~atoll.eventstore.UnknownEvent`) are skipped.
    """

    name: ClassVar[str] = ""
    _handlers: ClassVar[dict[type[Event], Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        handlers: dict[type[Event], Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                if getattr(fn, _ON, False):
                    for event_type in _handled_types(fn, f"{klass.__qualname__}.{attr}"):
                        handlers[event_type] = fn
        cls._handlers = handlers

    @classmethod
    def event_types(cls) -> list[type[Event]]:
        """The event types this projection handles."""
        return list(cls._handlers)

    async def setup(self, tx: Transaction) -> None:
        """Create the read model's tables if they do not exist."""

    async def reset(self, tx: Transaction) -> None:
        """Remove the read model's rows (a rebuild then replays every event)."""
        raise NotImplementedError(f"{type(self).__qualname__} cannot be rebuilt: define reset()")

    async def handle(self, record: AnyRecord, tx: Transaction) -> None:
        """Apply one event to the read model."""
        handler = self._handlers.get(type(record.event))  # type: ignore[arg-type]
        if handler is not None:
            await handler(self, record, tx)


def _handled_types(fn: Callable[..., Any], where: str) -> list[type[Event]]:
    params = list(inspect.signature(fn).parameters)
    if len(params) != 3:
        raise TypeError(f"{where} must take (self, record: EventRecord[SomeEvent], tx)")
    annotation = get_type_hints(fn).get(params[1])
    if typing.get_origin(annotation) is not EventRecord:
        raise TypeError(f"{where}: annotate the record as EventRecord[SomeEvent]")
    (inner,) = typing.get_args(annotation)
    members = (
        typing.get_args(inner)
        if isinstance(inner, types.UnionType) or typing.get_origin(inner) is typing.Union
        else (inner,)
    )
    if not all(isinstance(m, type) and issubclass(m, Event) for m in members):
        raise TypeError(f"{where}: EventRecord[...] must name Event types")
    return list(members)


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """How far a projection is behind, as data for ``/readyz``, the CLI and metrics.

    ``stalled`` is true when the projection is failing, or has events waiting and made
    no progress for ``stall_after`` seconds (including events held back behind an open
    transaction, with ``blocked_by`` naming it): a stalled projection is never silent.
    """

    name: str
    state: State
    position: int
    events_behind: int
    events_behind_capped: bool
    held_back: int
    seconds_behind: float
    stalled: bool
    handled: int
    failures: int
    last_error: str | None = None
    last_progress_at: float | None = None
    blocked_by: str | None = None


class ProjectionMetrics:
    """Prometheus series for projections, registered once per registry."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[Any, ProjectionMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge  # noqa: PLC0415 - import cost at use

        labels = ["projection"]
        self.events_behind = Gauge(
            "atoll_projection_events_behind",
            "Committed events the projection has not processed yet.",
            labels,
            registry=registry,
        )
        self.seconds_behind = Gauge(
            "atoll_projection_seconds_behind",
            "Age of the oldest event the projection has not processed yet.",
            labels,
            registry=registry,
        )
        self.held_back = Gauge(
            "atoll_projection_held_back_events",
            "Committed events readers cannot see yet: an older transaction is still open.",
            labels,
            registry=registry,
        )
        self.stalled = Gauge(
            "atoll_projection_stalled",
            "1 if the projection is failing or has made no progress while behind.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "atoll_projection_events",
            "Events the projection has processed.",
            labels,
            registry=registry,
        )
        self.failures = Counter(
            "atoll_projection_failures",
            "Failed attempts to process a batch of events.",
            labels,
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: Any) -> ProjectionMetrics:
        """The metrics of ``registry`` (a ``prometheus_client.CollectorRegistry``)."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics

    def observe(self, status: ProjectionStatus) -> None:
        """Export one status."""
        name = status.name
        self.events_behind.labels(name).set(status.events_behind)
        self.seconds_behind.labels(name).set(status.seconds_behind)
        self.held_back.labels(name).set(status.held_back)
        self.stalled.labels(name).set(1 if status.stalled else 0)


class ProjectionRunner:
    """Runs one projection: catch up from its checkpoint, then follow the log live.

    Each batch is applied and its checkpoint moved in one transaction; the checkpoint
    only moves if it is still where this runner read it, so two runners (two replicas
    of a service, or the CLI rebuilding while the service runs) never apply an event
    twice. A handler that raises stops the projection *at* that event (it is retried
    with backoff and reported as failing), never after it: nothing is skipped.
    """

    def __init__(
        self,
        projection: Projection,
        store: EventStore,
        *,
        codec: EventCodec | None = None,
        keys: SubjectKeys | None = None,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        stall_after: float = 30.0,
        max_backoff: float = 30.0,
        status_interval: float = 5.0,
        registry: Any = None,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self.store = store
        self.codec = codec if codec is not None else EventCodec(keys=keys)
        if keys is not None and self.codec.keys is None:
            self.codec.keys = keys
        self.codec.register(*projection.event_types())
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.stall_after = stall_after
        self.max_backoff = max_backoff
        self.status_interval = status_interval
        self.metrics = None if registry is None else ProjectionMetrics.for_registry(registry)
        self.clock = store.clock
        self.state: State = "stopped"
        self.checkpoint: int | None = None
        self.handled = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_progress_at: float | None = None
        self._progress_monotonic = self.clock.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._set_up = False

    def __repr__(self) -> str:
        return f"ProjectionRunner({self.name!r}, state={self.state!r})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the read model's tables and follow the log in the background."""
        if self._task is not None and not self._task.done():
            return
        await self._setup()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"projection {self.name}"
        )

    async def stop(self) -> None:
        """Stop following the log (a batch in hand is finished or rolled back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
        self.state = "stopped"

    async def _setup(self) -> None:
        if not self._set_up:
            async with self.store.transaction() as tx:
                # Replicas start together: CREATE TABLE IF NOT EXISTS races on PostgreSQL.
                await self.store.exclusive(tx, f"projection setup {self.name}")
                await self.projection.setup(tx)
            self._set_up = True
        self.checkpoint = await self.store.load_checkpoint(self.name)

    # -- processing -----------------------------------------------------------------------

    async def run_until_caught_up(self) -> int:
        """Process every event readable now (in this task); return how many.

        Raises :class:`~atoll.eventstore.ProjectionFailedError` at the first event a
        handler fails on (the events before it are kept).
        """
        await self._setup()
        total = 0
        while True:
            count, conflicted = await self._step()
            total += count
            if count < self.batch_size and not conflicted:
                return total

    async def step(self) -> int:
        """Read one batch after the checkpoint and apply it; return how many were applied."""
        count, _ = await self._step()
        return count

    async def _step(self) -> tuple[int, bool]:
        start = START if self.checkpoint is None else self.checkpoint
        raws = await self.store.read_all(after=start, limit=self.batch_size)
        if not raws:
            return 0, False
        try:
            applied = await self._apply_batch(raws)
        except CheckpointConflictError:
            # Another runner moved the checkpoint (or a rebuild reset it): follow it, once
            # that move is committed. Runners sharing a SQLite database can meet in one
            # open group transaction, whose change a read does not see yet: without
            # waiting for that commit, this loop would read the old checkpoint, conflict
            # again and never let the commit run. An empty transaction ends after it.
            async with self.store.transaction():
                pass
            self.checkpoint = await self.store.load_checkpoint(self.name)
            return 0, True
        self._progressed(applied)
        return applied, False

    async def _apply_batch(self, raws: list[RawEvent]) -> int:
        try:
            records = await self.codec.decode(raws)
            await self._commit(records)
        except CheckpointConflictError:
            raise
        except Exception as exc:
            if len(raws) == 1:
                raise self._failed(raws[0], exc) from exc
            # Find the event that fails: commit those before it, stop at it.
            applied = 0
            for raw in raws:
                try:
                    await self._commit(await self.codec.decode([raw]))
                except CheckpointConflictError:
                    raise
                except Exception as one:
                    if applied:
                        self._progressed(applied)
                    raise self._failed(raw, one) from one
                applied += 1
            return applied
        return len(records)

    async def _commit(self, records: Sequence[AnyRecord]) -> None:
        expected = self.checkpoint
        async with self.store.transaction() as tx:
            # Claim the batch first: a replica that lost the race stops here, before any
            # handler runs (on PostgreSQL the row lock makes the loser wait, then fail).
            await self.store.save_checkpoint(
                self.name, records[-1].position, expected=expected, tx=tx
            )
            for record in records:
                await self.projection.handle(record, tx)
        self.checkpoint = records[-1].position

    def _failed(self, raw: RawEvent, exc: BaseException) -> ProjectionFailedError:
        return ProjectionFailedError(self.name, raw.stream_id, raw.version, raw.position, exc)

    def _progressed(self, count: int) -> None:
        self.handled += count
        self.last_error = None
        self.last_progress_at = self.clock.time()
        self._progress_monotonic = self.clock.monotonic()
        if self.metrics is not None:
            self.metrics.handled.labels(self.name).inc(count)

    async def _run(self) -> None:
        backoff = 0.1
        held_back_poll = HELD_BACK_FIRST_POLL
        next_status = self.clock.monotonic()
        with self.store.waiter() as waiter:
            while True:
                waiter.clear()
                try:
                    count, conflicted = await self._step()
                except Exception as exc:  # a handler or the database: report, retry, never skip
                    self._failing(exc)
                    await self.clock.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                backoff = 0.1
                if count >= self.batch_size or conflicted:
                    self.state = "catching_up"
                    continue
                self.state = "live"
                self._progress_monotonic = self.clock.monotonic()
                if self.clock.monotonic() >= next_status:
                    next_status = self.clock.monotonic() + self.status_interval
                    await self._refresh_status()
                timeout = self.poll_interval
                if await self.store.has_held_back():
                    timeout = min(held_back_poll, self.poll_interval)
                    held_back_poll = min(held_back_poll * 2, self.poll_interval)
                else:
                    held_back_poll = HELD_BACK_FIRST_POLL
                await waiter.wait(timeout, self.clock)

    def _failing(self, exc: BaseException) -> None:
        self.state = "failing"
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("projection %s: %s", self.name, self.last_error)
        if self.metrics is not None:
            self.metrics.failures.labels(self.name).inc()
            self.metrics.stalled.labels(self.name).set(1)

    async def _refresh_status(self) -> None:
        try:
            await self.status()
        except Exception as exc:
            log.warning("projection %s: lag unavailable: %s", self.name, exc)

    # -- rebuild and status ---------------------------------------------------------------

    async def rebuild(self) -> int:
        """Clear the read model and its checkpoint in one transaction, then replay the log.

        Runs in the calling task (stop the background runner first, or let it follow:
        its next batch sees the checkpoint moved and starts over from zero). Personal
        data of forgotten subjects reads as erased during the replay.
        """
        await self._setup()
        async with self.store.transaction() as tx:
            await self.projection.reset(tx)
            await self.store.delete_checkpoint(self.name, tx=tx)
        self.checkpoint = None
        return await self.run_until_caught_up()

    async def wait_until(self, position: int, *, timeout: float = 10.0) -> None:
        """Return once the checkpoint reaches ``position``; ``TimeoutError`` otherwise."""
        deadline = self.clock.monotonic() + timeout
        while self.checkpoint is None or self.checkpoint < position:
            if self.clock.monotonic() >= deadline:
                raise TimeoutError(
                    f"projection {self.name!r} did not reach position {position} in {timeout} s "
                    f"(at {self.checkpoint}, {self.state}, last error: {self.last_error})"
                )
            await self.clock.sleep(0.005)

    async def lag(self) -> ProjectionStatus:
        """Alias of :meth:`status`: how far behind the projection is."""
        return await self.status()

    async def status(self) -> ProjectionStatus:
        """The projection's lag and health, freshly measured (also exported as metrics)."""
        position = START if self.checkpoint is None else self.checkpoint
        backlog = await self.store.backlog(position)
        now = self.clock.time()
        waiting = backlog.events > 0 or backlog.held_back > 0
        seconds = (
            max(0.0, now - backlog.oldest_recorded_at)
            if waiting and backlog.oldest_recorded_at is not None
            else 0.0
        )
        idle_for = self.clock.monotonic() - self._progress_monotonic
        stalled = self.state == "failing" or (
            waiting and (idle_for > self.stall_after or seconds > self.stall_after)
        )
        status = ProjectionStatus(
            name=self.name,
            state=self.state,
            position=position,
            events_behind=backlog.events,
            events_behind_capped=backlog.capped,
            held_back=backlog.held_back,
            seconds_behind=seconds,
            stalled=stalled,
            handled=self.handled,
            failures=self.failures,
            last_error=self.last_error,
            last_progress_at=self.last_progress_at,
            blocked_by=backlog.blocked_by,
        )
        if self.metrics is not None:
            self.metrics.observe(status)
        return status


async def projections_readiness(
    runners: Sequence[ProjectionRunner], *, max_seconds_behind: float | None = None
) -> dict[str, Any]:
    """Projection details for a service's ``/readyz``: status of each, and overall.

    ``ready`` is false if any projection is stalled, or more than ``max_seconds_behind``
    behind when that is given.
    """
    statuses = [await runner.status() for runner in runners]
    ready = all(
        not s.stalled and (max_seconds_behind is None or s.seconds_behind <= max_seconds_behind)
        for s in statuses
    )
    return {"ready": ready, "projections": [msgspec.to_builtins(s) for s in statuses]}
