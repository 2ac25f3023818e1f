"""The saga engine of one orchestrating service: starts, replies, deadlines, repairs.

Everything an instance does happens in a unit of work of the orchestrating service:
the reply's handler (with its inbox record), the deadline poller's, an HTTP route's.
The instance row, its history entry and the commands it sends commit together.

Deadlines and retry times are a column of the instance row (``wake_at``, indexed):
one poller per service process fires what is due, each instance in its own unit of
work. A timer is therefore durable (it is in the database), works on every transport
(it is not a message), and costs nothing per step: the row update that a transition
makes anyway carries it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atoll._crash import crashpoint
from atoll.determinism import Clock
from atoll.messages import Event, Message, Reply
from atoll.observability import annotate, attributes
from atoll.observability._tracing import SpanKind
from atoll.persistence import DatabaseError, Session
from atoll.sagas import _store as store
from atoll.sagas._definition import Saga, SagaMigration
from atoll.sagas._errors import (
    SagaActionError,
    SagaDefinitionError,
    SagaError,
    SagaExistsError,
    SagaNotFoundError,
)
from atoll.sagas._process import EventRoute, Flow, ProcessManager, ProcessProgress
from atoll.sagas._state import (
    COMPENSATION_ACTIVE,
    FORWARD_ACTIVE,
    RESTING_STATES,
    SagaState,
    SagaSummary,
    SagaView,
    StepChange,
    StepState,
    StepStatus,
    StepView,
    Transition,
)
from atoll.sagas._store import Instance
from atoll.sagas._transitions import SAGA, Run
from atoll.service import Context, MessageRejected, Service

if TYPE_CHECKING:
    from atoll.observability._lean import LeanTracer
    from atoll.service import ServiceRuntime

log = logging.getLogger("atoll.sagas")

D = TypeVar("D", bound=msgspec.Struct)
Definition = Saga[Any] | ProcessManager[Any]
Listener = Callable[[Transition], None]

_encoder = msgspec.json.Encoder()
_progress_decoder = msgspec.json.Decoder(ProcessProgress)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])

_SAGA_ID = attributes.SAGA_ID
_SAGA_NAME = attributes.SAGA_NAME

#: The engine of each service, so ``atoll sagas diagram`` finds it after importing services.
ENGINES: weakref.WeakKeyDictionary[Service, SagaEngine] = weakref.WeakKeyDictionary()


def engine_of(service: Service) -> SagaEngine | None:
    """The saga engine of ``service``, if it has one."""
    return ENGINES.get(service)


class ProcessNotStartedError(SagaError):
    """An event arrived for a process instance that does not exist (yet)."""


class SagaEngine:
    """Runs the sagas and process managers of one orchestrating service.

    ::

        orders = Service("orders")
        sagas = SagaEngine(orders, [place_order, fulfilment])

        async with orders.unit_of_work() as ctx:
            saga_id = await sagas.start(ctx, place_order, OrderData(...))

    Construct it where the service is declared (module level): it adds the saga tables
    to the service's migrations, a handler for every reply type its sagas expect and
    every event its process managers follow, the deadline poller (started and stopped
    with the service), and the operator API under ``http_prefix`` of the service's HTTP
    app (``None`` leaves it out).

    ``add_listener(fn)`` calls ``fn(transition)`` after each transition commits: the
    hook for tracing (saga id and step as span attributes) and metrics (instances by
    state, see :meth:`counts`).
    """

    def __init__(
        self,
        service: Service,
        definitions: Sequence[Definition] = (),
        *,
        http_prefix: str | None = "/atoll/sagas",
        poll_interval: float = 1.0,
        batch_size: int = 100,
        retention: float | None = 30 * 86_400.0,
    ) -> None:
        if service in ENGINES:
            raise SagaDefinitionError(f"service {service.name!r} has a saga engine already")
        self.service = service
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.retention = retention
        #: Fire deadlines only when told (:meth:`fire_due`): the test kit sets it.
        self.manual_timers = False
        self._definitions: dict[str, dict[int, Definition]] = {}
        self._migrations: dict[tuple[str, int, int], SagaMigration] = {}
        self._replies: set[str] = set()
        self._events: dict[str, list[str]] = {}
        self._listeners: list[Listener] = []
        self._tracer: LeanTracer | None = None
        self.last_counts: dict[tuple[str, str], int] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._planned: float | None = None
        self._last_prune = 0.0
        self._locking = False
        self._caching = False
        #: Unfinished sagas whose committed rows this process keeps (SQLite only).
        self.cache_size = 10_000
        #: By saga id: the instance as last written and its decoded steps (``None`` if
        #: not at hand). An entry is taken out while a transition uses it.
        self._cache: OrderedDict[str, tuple[Instance, list[StepState] | None]] = OrderedDict()
        service.migration("atoll-sagas", store.SCHEMA)
        service.on_start(self._on_start)
        service.on_stop(self._on_stop)
        for definition in definitions:
            self.register(definition)
        if http_prefix is not None:
            from atoll.sagas._admin import admin_router  # noqa: PLC0415 - cycle

            service.http.include_router(admin_router(self), prefix=http_prefix)
        ENGINES[service] = self

    def __repr__(self) -> str:
        return f"SagaEngine({self.service.name!r})"

    # -- declarations ---------------------------------------------------------------------

    def register(self, definition: Definition) -> None:
        """Add a saga or process definition (a new version of a name is kept beside the old)."""
        versions = self._definitions.setdefault(definition.name, {})
        existing = next(iter(versions.values()), None)
        if existing is not None and existing.kind != definition.kind:
            raise SagaDefinitionError(
                f"{definition.name!r} is a {existing.kind} already; a {definition.kind} needs"
                " another name"
            )
        if definition.version in versions:
            raise SagaDefinitionError(
                f"{definition.kind} {definition.name!r} v{definition.version} is registered"
                f" already with service {self.service.name!r}"
            )
        versions[definition.version] = definition
        if isinstance(definition, Saga):
            for reply_type in definition.reply_types:
                self._subscribe_reply(reply_type, definition)
        else:
            definition._engines.append(self)
            for route in definition.routes.values():
                self._subscribe(route.event_type, definition.name)

    def _subscribe_reply(self, reply_type: type[Reply], definition: Saga[Any]) -> None:
        if reply_type.message_type in self._replies:
            return
        if reply_type.message_type in self.service.handlers:
            raise SagaDefinitionError(
                f"saga {definition.name!r} waits for {reply_type.message_type!r}, but service"
                f" {self.service.name!r} has its own handler for it; a reply type belongs to"
                " the sagas or to a handler, not both"
            )
        self.service.handles(reply_type)(self._on_reply)
        self._replies.add(reply_type.message_type)

    def _subscribe(self, event_type: type[Event], name: str) -> None:
        """Follow ``event_type`` for process ``name`` (called as routes are declared)."""
        names = self._events.setdefault(event_type.message_type, [])
        if name not in names:
            names.append(name)
        spec = self.service.handlers.get(event_type.message_type)
        if spec is not None:
            if spec.handler == self._on_event:
                return
            raise SagaDefinitionError(
                f"a process manager follows {event_type.message_type!r}, but service"
                f" {self.service.name!r} has its own handler for it"
            )
        self.service.subscribes(event_type)(self._on_event)

    def migration(self, migration: SagaMigration) -> None:
        """Declare how instances move between two versions (see :meth:`migrate`)."""
        key = (migration.name, migration.from_version, migration.to_version)
        self._migrations[key] = migration

    def definition(self, name: str, version: int | None = None) -> Definition:
        """The definition of ``name`` at ``version`` (default: the newest)."""
        versions = self._definitions.get(name)
        if not versions:
            raise SagaDefinitionError(
                f"service {self.service.name!r} has no saga or process {name!r}"
                f" (it has: {', '.join(sorted(self._definitions)) or 'none'})"
            )
        if version is None:
            return versions[max(versions)]
        found = versions.get(version)
        if found is None:
            raise SagaDefinitionError(
                f"{name!r} has no version {version} here (versions: {sorted(versions)})"
            )
        return found

    @property
    def definitions(self) -> list[Definition]:
        """Every registered definition, by name and version."""
        return [
            self._definitions[name][version]
            for name in sorted(self._definitions)
            for version in sorted(self._definitions[name])
        ]

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(transition)`` after each committed transition.

        It runs on the event loop after the commit; it must be quick and not raise (an
        exception is logged and ignored: it cannot undo a committed transition).
        """
        self._listeners.append(listener)

    # -- starting -------------------------------------------------------------------------

    async def start(
        self,
        ctx: Context,
        saga: Saga[D] | str,
        data: D,
        *,
        saga_id: str | None = None,
    ) -> str:
        """Start an instance in ``ctx``'s unit of work; return its id.

        The instance exists, and its first commands are sent, if and only if the unit of
        work commits. ``saga_id`` (default: a new id) must be unused, else
        :class:`SagaExistsError` (and nothing was written).
        """
        if isinstance(saga, str):
            found = self.definition(saga)
            if not isinstance(found, Saga):
                raise SagaDefinitionError(f"{saga!r} is a process manager: events start it")
            definition: Saga[Any] = found
        else:
            definition = saga
            versions = self._definitions.get(saga.name)
            if versions is None or versions.get(saga.version) is not saga:
                raise SagaDefinitionError(
                    f"saga {saga.name!r} v{saga.version} is not registered with the engine of"
                    f" service {self.service.name!r}"
                )
        if not isinstance(data, definition.data_type):
            raise TypeError(
                f"saga {definition.name!r} takes {definition.data_type.__name__} data,"
                f" not {type(data).__name__}"
            )
        now = ctx.clock.time()
        instance = Instance(
            saga_id=saga_id or ctx.random.new_id(),
            name=definition.name,
            version=definition.version,
            kind=definition.kind,
            state=SagaState.RUNNING,
            data="",  # written by run.finish()
            steps="",
            revision=0,
            wake_at=None,
            deadline_at=None if definition.timeout is None else now + definition.timeout,
            correlation_id=ctx.correlation_id,
            error=None,
            created_at=now,
            updated_at=now,
        )

        def taken() -> SagaExistsError:
            return SagaExistsError(f"a saga or process with id {instance.saga_id!r} exists already")

        async def check() -> None:
            if await store.exists(ctx, instance.saga_id):
                raise taken()

        run = Run(
            definition,
            instance,
            ctx,
            self.service,
            "started",
            new=True,
            data=data,
            steps=[StepState() for _ in definition.steps],
        )
        # No SELECT for the id first (a statement per start): the INSERT refuses a taken
        # id, and until it has, the first commands wait in a buffer. Should a local step
        # or a hook come first (they use the unit of work), the id is checked before it.
        buffered = await run.begin_unchecked(check)
        run.finish()
        if not await store.insert(ctx.unit_of_work, instance):
            # A taken id found by the INSERT: the buffered commands are dropped. Checked
            # before already, only a concurrent start of the same id (PostgreSQL) gets
            # here: what this start did is in the unit of work, which the exception rolls
            # back.
            raise taken()
        if buffered is not None:
            buffered.flush()
        await self._write(
            ctx,
            instance,
            before=None,
            expected=0,
            event=run.event,
            changes=run.changes,
            detail=run.detail,
            inserted=True,
            steps=run.steps,
        )
        return instance.saga_id

    # -- handling -------------------------------------------------------------------------

    def _for_update(self) -> bool:
        # PostgreSQL runs units of work concurrently: lock the row for the transition.
        # SQLite has one writer, and FOR UPDATE is not its syntax.
        return self._locking

    async def _on_reply(self, reply: Message, ctx: Context) -> None:
        envelope = ctx.envelope
        assert envelope is not None
        # Taken out, not read: the transition moves these very objects, and puts them back
        # once written. If it fails before that, the next reply loads the row afresh.
        cached = self._cache.pop(envelope.correlation_id, None)
        if cached is None:
            await self._handle_reply(reply, ctx, None, None)
            return
        try:
            await self._handle_reply(reply, ctx, *cached)
        except MessageRejected:
            # Decided on the cached state: make sure it is not stale. Nothing was written.
            await self._handle_reply(reply, ctx, None, None)

    async def _handle_reply(
        self,
        reply: Message,
        ctx: Context,
        instance: Instance | None,
        steps: list[StepState] | None,
    ) -> None:
        envelope = ctx.envelope
        assert envelope is not None
        if instance is None:
            instance = await store.load(ctx, envelope.correlation_id, for_update=self._for_update())
        if instance is None:
            raise MessageRejected(
                f"reply {envelope.type} (message {envelope.id} from {envelope.source}) is for"
                f" saga {envelope.correlation_id!r}, which service {self.service.name!r}"
                " does not have"
            )
        definition = self._definition_of(instance, envelope.type)
        if not isinstance(definition, Saga):
            raise MessageRejected(
                f"reply {envelope.type} (message {envelope.id}) is for {instance.saga_id!r},"
                " a process manager instance: process managers take events, not replies"
            )
        run = Run(definition, instance, ctx, self.service, f"reply {envelope.type}", steps=steps)
        await run.on_reply(envelope, reply)
        await self._save(ctx, run)
        crashpoint("saga.after_transition")

    def _definition_of(self, instance: Instance, what: str) -> Definition:
        found = self._definitions.get(instance.name, {}).get(instance.version)
        if found is None:
            raise MessageRejected(
                f"{what} for {instance.kind} {instance.saga_id!r}: this service has no"
                f" definition of {instance.name!r} v{instance.version}; deploy code that"
                " has it and replay this dead letter, or migrate the instance"
            )
        return found

    async def _on_event(self, event: Message, ctx: Context) -> None:
        envelope = ctx.envelope
        assert envelope is not None
        for name in self._events.get(envelope.type, ()):
            await self._process_event(name, event, ctx)
        crashpoint("saga.after_transition")

    async def _process_event(self, name: str, event: Message, ctx: Context) -> None:
        envelope = ctx.envelope
        assert envelope is not None
        newest = self.definition(name)
        assert isinstance(newest, ProcessManager)
        route = newest.routes.get(envelope.type) or next(
            pm.routes[envelope.type]
            for pm in reversed(list(self._definitions[name].values()))
            if isinstance(pm, ProcessManager) and envelope.type in pm.routes
        )
        key = str(route.key(event))
        instance_id = newest.instance_id(key)
        instance = await store.load(ctx, instance_id, for_update=self._for_update())
        now = ctx.clock.time()
        event_name = f"event {envelope.type}"
        if instance is None:
            start = newest.routes.get(envelope.type)
            if start is None or not start.starts:
                if route.if_missing == "ignore" or route.starts:
                    return
                raise ProcessNotStartedError(
                    f"event {envelope.type} (message {envelope.id}) is for process"
                    f" {name!r} key {key!r}, which has no instance: retried in case the"
                    " start event is behind it, then dead-lettered"
                )
            await self._start_process(newest, start, event, ctx, instance_id=instance_id, key=key)
            return
        definition = self._definition_of(instance, event_name)
        if not isinstance(definition, ProcessManager):
            raise MessageRejected(f"{event_name} is for {instance_id!r}, which is a saga")
        before = instance.state
        progress = _progress_decoder.decode(instance.steps)
        flow = Flow(
            instance_id,
            key,
            definition.decoder.decode(instance.data),
            ctx,
            timers=progress.timers,
            now=now,
            state=instance.state,
        )
        detail: dict[str, Any] = {"event": {"type": envelope.type, "id": envelope.id}}
        this_route = definition.routes.get(envelope.type)
        if instance.state in RESTING_STATES:
            detail["ignored"] = f"the instance is {instance.state.value}"
        elif this_route is None:
            detail["ignored"] = f"v{instance.version} does not follow this event"
        elif this_route.starts:
            detail["ignored"] = "a start event for an instance that has started already"
        else:
            await this_route.handler(event, flow)
        await self._save_flow(ctx, instance, flow, before=before, event=event_name, detail=detail)

    async def _start_process(
        self,
        pm: ProcessManager[Any],
        route: EventRoute[Any],
        event: Message,
        ctx: Context,
        *,
        instance_id: str,
        key: str,
    ) -> None:
        assert ctx.envelope is not None
        now = ctx.clock.time()
        instance = Instance(
            saga_id=instance_id,
            name=pm.name,
            version=pm.version,
            kind=pm.kind,
            state=SagaState.RUNNING,
            data="null",
            steps=_encoder.encode(ProcessProgress(key=key)).decode(),
            revision=0,
            wake_at=None,
            deadline_at=None if pm.timeout is None else now + pm.timeout,
            correlation_id=ctx.correlation_id,
            error=None,
            created_at=now,
            updated_at=now,
        )
        if not await store.insert(ctx, instance):
            raise SagaExistsError(f"instance {instance_id!r} appeared concurrently")
        flow: Flow[Any] = Flow(
            instance_id, key, None, ctx, timers={}, now=now, state=SagaState.RUNNING
        )
        flow.notes.append(StepChange("(process)", "", "RUNNING", "started"))
        data = await route.handler(event, flow)
        if not isinstance(data, pm.data_type):
            raise TypeError(
                f"the start handler of process {pm.name!r} returned"
                f" {type(data).__name__}, not {pm.data_type.__name__}"
            )
        flow.data = data
        detail = {"event": {"type": ctx.envelope.type, "id": ctx.envelope.id}}
        await self._save_flow(
            ctx, instance, flow, before=None, event=f"event {ctx.envelope.type}", detail=detail
        )

    async def _save_flow(
        self,
        ctx: Context,
        instance: Instance,
        flow: Flow[Any],
        *,
        before: SagaState | None,
        event: str,
        detail: dict[str, Any],
    ) -> None:
        expected = instance.revision
        instance.state = flow.state
        if flow.state is not SagaState.RUNNING:
            flow.timers.clear()
            instance.deadline_at = None
        if flow.error is not None:
            instance.error = flow.error
        if flow._data is not None:
            instance.data = _encoder.encode(flow._data).decode()
        progress = ProcessProgress(key=flow.key, timers=flow.timers)
        instance.steps = _encoder.encode(progress).decode()
        dues = list(flow.timers.values())
        if instance.state is SagaState.RUNNING and instance.deadline_at is not None:
            dues.append(instance.deadline_at)
        instance.wake_at = min(dues) if dues else None
        instance.updated_at = flow.now
        instance.revision += 1
        if detail.get("ignored"):
            event += " (ignored)"
        await self._write(
            ctx,
            instance,
            before=before,
            expected=expected,
            event=event,
            changes=flow.notes,
            detail=detail,
        )

    async def _save(self, ctx: Context, run: Run[Any]) -> None:
        run.finish()
        await self._write(
            ctx,
            run.inst,
            before=run.state_before,
            expected=run.expected_revision,
            event=run.event,
            changes=run.changes,
            detail=run.detail,
            steps=run.steps,
        )

    async def _write(
        self,
        ctx: Context,
        instance: Instance,
        *,
        before: SagaState | None,
        expected: int,
        event: str,
        changes: Sequence[StepChange],
        detail: dict[str, Any],
        inserted: bool = False,
        steps: list[StepState] | None = None,
    ) -> None:
        if not inserted:
            await store.update(ctx.unit_of_work, instance, expected)
        if self._caching and instance.kind == "saga":
            # At once, not on commit: a second reply for this saga in the same batch must
            # see this transition. If the unit of work rolls back instead, the revision
            # guard refuses the next transition made from this row and it is retried fresh.
            self._remember(instance, steps)
        await store.add_history(
            ctx.unit_of_work,
            saga_id=instance.saga_id,
            seq=instance.revision,
            at=instance.updated_at,
            event=event,
            state=instance.state,
            changes=changes,
            detail=detail,
        )
        annotate(**{_SAGA_ID: instance.saga_id, _SAGA_NAME: instance.name})
        if self._tracer is not None:
            # A span per transition, child of the span that caused it (the reply's process
            # span, the request that started the saga, the deadline poller), recorded once
            # the transition is committed.
            names = sorted({change.step for change in changes})
            self._trace_later(ctx, instance, event, before, names)
        if self._listeners:
            transition = Transition(
                saga_id=instance.saga_id,
                name=instance.name,
                version=instance.version,
                kind=instance.kind,
                event=event,
                state_before=None if before is None else before.value,
                state_after=instance.state.value,
                changes=tuple(changes),
                at=instance.updated_at,
                correlation_id=instance.correlation_id,
            )
            ctx.on_commit(lambda: self._notify(transition))
        wake = instance.wake_at
        if wake is not None and (self._planned is None or wake < self._planned):
            ctx.on_commit(self._poke)

    def _remember(self, instance: Instance, steps: list[StepState] | None) -> None:
        """Keep a saga as last written, so its next reply needs no SELECT (nor decoding).

        Only where this process is the database's one writer (SQLite). The entry can be
        stale if another process moved the instance or if the write was rolled back;
        then the revision guard of the UPDATE refuses the transition, the entry is
        dropped and the reply retried on fresh state. ``steps`` are the decoded form of
        ``instance.steps`` (``None``: decoded when needed); nothing changes either once
        written, until the next transition takes them out of the cache.
        """
        saga_id = instance.saga_id
        cache = self._cache
        cache.pop(saga_id, None)
        if instance.state in RESTING_STATES:
            return
        cache[saga_id] = (instance, steps)
        if len(cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _trace_later(
        self,
        ctx: Context,
        instance: Instance,
        event: str,
        before: SagaState | None,
        steps: list[str],
    ) -> None:
        from atoll.observability._lean import current_span_context  # noqa: PLC0415 - otel extra

        tracer = self._tracer
        assert tracer is not None
        parent = current_span_context()
        state_after = instance.state.value
        started = ctx.clock.time()
        span_attributes: dict[str, Any] = {
            attributes.SAGA_ID: instance.saga_id,
            attributes.SAGA_NAME: instance.name,
            attributes.SAGA_STATE: state_after,
            "atoll.saga.state_before": "" if before is None else before.value,
            "atoll.saga.event": event,
            "atoll.saga.version": instance.version,
        }
        # The steps this transition changed, by name ("a,b" when it changed several);
        # the saga-level entry is in atoll.saga.state already.
        named = [step for step in steps if step != SAGA]
        if named:
            span_attributes[attributes.SAGA_STEP] = ",".join(named)

        def record() -> None:
            span = tracer.span(
                f"saga {instance.name}: {event}",
                parent=parent if parent.is_valid else None,
                kind=SpanKind.INTERNAL,
                attributes=span_attributes,
            )
            span._start = int(started * 1e9)  # a point in time, already past
            span.end()

        ctx.on_commit(record)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _notify(self, transition: Transition) -> None:
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                log.exception("saga listener %r failed", listener)

    # -- deadlines and retries ------------------------------------------------------------

    async def _on_start(self, runtime: ServiceRuntime) -> None:
        self._tracer = runtime.tracing.lean
        runtime.metrics.add_refresher(self._refresh_counts)
        runtime.metrics.registry.register(_SagaCollector(self, runtime.service.name))
        self._locking = runtime.database.dialect == "postgresql"
        self._caching = runtime.database.dialect == "sqlite"
        self._cache.clear()
        self._wake = asyncio.Event()
        self._planned = None
        if not self.manual_timers:
            self._poller = asyncio.get_running_loop().create_task(self._poll(runtime))

    async def _on_stop(self, runtime: ServiceRuntime) -> None:
        del runtime
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.wait([poller])

    async def _poll(self, runtime: ServiceRuntime) -> None:
        clock = runtime.clock
        failures = 0
        while True:
            try:
                fired = await self.fire_due(runtime)
                if fired >= self.batch_size:
                    continue
                await self._maybe_prune(runtime)
                async with runtime.database.read() as session:
                    planned = await store.next_wake(session)
                self._planned = planned
                timeout = self.poll_interval
                if planned is not None:
                    timeout = max(0.0, min(timeout, planned - clock.time()))
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                timeout = min(self.poll_interval * 2**failures, 30.0)
                log.warning(
                    "service %s: firing saga deadlines failed (%r); again in %.1fs",
                    self.service.name,
                    exc,
                    timeout,
                )
            if timeout > 0:
                await self._wait(clock, timeout)

    async def _wait(self, clock: Clock, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or less if a commit set an earlier deadline."""
        assert self._wake is not None
        if not self._wake.is_set():
            sleeper = asyncio.ensure_future(clock.sleep(timeout))
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
        self._wake.clear()

    async def fire_due(self, runtime: ServiceRuntime | None = None) -> int:
        """Handle every deadline and retry that is due now; return how many instances.

        The poller calls it; tests on a virtual clock call it after moving the clock.
        """
        runtime = runtime or self.service.runtime
        now = runtime.clock.time()
        async with runtime.database.read() as session:
            due = await store.due(session, now, self.batch_size)
        if not due:
            return 0
        # One transaction for the lot (one commit, not one per instance); each instance
        # in its own unit of work inside it, so one that fails is rolled back alone.
        async with runtime.database.batch():
            for saga_id in due:
                try:
                    async with runtime.unit_of_work() as ctx:
                        await self._on_wake(ctx, saga_id)
                except DatabaseError:
                    raise
                except Exception as exc:
                    log.exception("saga %s: handling its deadline failed", saga_id)
                    await self._postpone(runtime, saga_id, exc)
        return len(due)

    async def _on_wake(self, ctx: Context, saga_id: str) -> None:
        instance = await store.load(ctx, saga_id, for_update=self._for_update())
        if instance is None or instance.wake_at is None or instance.wake_at > ctx.clock.time():
            return  # another process or unit of work got there first
        definition = self._definitions.get(instance.name, {}).get(instance.version)
        if definition is None:
            raise SagaError(f"no definition of {instance.name!r} v{instance.version}")
        if isinstance(definition, Saga):
            run = Run(definition, instance, ctx, self.service, "deadline")
            await run.on_timer()
            await self._save(ctx, run)
        else:
            await self._process_timer(ctx, definition, instance)
        crashpoint("saga.after_transition")

    async def _process_timer(
        self, ctx: Context, pm: ProcessManager[Any], instance: Instance
    ) -> None:
        now = ctx.clock.time()
        progress = _progress_decoder.decode(instance.steps)
        before = instance.state
        flow = Flow(
            instance.saga_id,
            progress.key,
            pm.decoder.decode(instance.data),
            ctx,
            timers=progress.timers,
            now=now,
            state=instance.state,
        )
        if (
            instance.state is SagaState.RUNNING
            and instance.deadline_at is not None
            and instance.deadline_at <= now
        ):
            instance.deadline_at = None
            if pm.deadline_handler is not None:
                await pm.deadline_handler(flow)
            if flow.state is SagaState.RUNNING:
                flow.fail(f"the process's deadline passed ({pm.timeout:g}s)")
            await self._save_flow(ctx, instance, flow, before=before, event="deadline", detail={})
            return
        due = sorted((at, name) for name, at in flow.timers.items() if at <= now)
        for _, name in due:
            flow.timers.pop(name, None)
            handler = pm.timer_handlers.get(name)
            flow.notes.append(StepChange(name, "SCHEDULED", "FIRED"))
            if handler is None:
                flow.notes.append(StepChange(name, "FIRED", "FIRED", "no on_timer handler"))
            elif flow.state is SagaState.RUNNING:
                await handler(flow)
        await self._save_flow(ctx, instance, flow, before=before, event="timer", detail={})

    async def _postpone(self, runtime: ServiceRuntime, saga_id: str, exc: Exception) -> None:
        """Record a failing deadline handler and try it again later, not in a hot loop."""
        try:
            async with runtime.unit_of_work() as ctx:
                instance = await store.load(ctx, saga_id, for_update=self._for_update())
                if instance is None:
                    return
                expected = instance.revision
                now = ctx.clock.time()
                instance.error = f"handling a deadline failed: {exc!r}"
                instance.wake_at = now + max(self.poll_interval * 30, 30.0)
                instance.updated_at = now
                instance.revision += 1
                await self._write(
                    ctx,
                    instance,
                    before=instance.state,
                    expected=expected,
                    event="deadline (failed)",
                    changes=[],
                    detail={"error": repr(exc), "next_try": instance.wake_at},
                )
        except Exception:
            log.exception("saga %s: recording a failed deadline failed too", saga_id)

    async def _maybe_prune(self, runtime: ServiceRuntime) -> None:
        now = runtime.clock.time()
        if self.retention is None or now - self._last_prune < 3600:
            return
        self._last_prune = now
        async with runtime.unit_of_work() as ctx:
            pruned = await store.prune(
                ctx,
                now - self.retention,
                [SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED, SagaState.ABORTED],
            )
        if pruned:
            log.info("service %s: pruned %d ended saga instances", self.service.name, pruned)

    # -- operating ------------------------------------------------------------------------

    async def operate(
        self,
        saga_id: str,
        action: str,
        *,
        step: str | None = None,
        reason: str = "",
        operator: str = "",
        to_version: int | None = None,
    ) -> SagaView:
        """Apply an operator action (retry, skip, compensate, abort, migrate); return the view.

        Each action is one transition, recorded in the history with the operator's name
        and reason. Raises :class:`SagaNotFoundError` or :class:`SagaActionError`.
        """
        runtime = self.service.runtime
        async with runtime.unit_of_work() as ctx:
            instance = await store.load(ctx, saga_id, for_update=self._for_update())
            if instance is None:
                raise SagaNotFoundError(f"service {self.service.name!r} has no saga {saga_id!r}")
            detail: dict[str, Any] = {"operator": operator or "unknown", "reason": reason}
            if step is not None:
                detail["step"] = step
            event = f"operator {action}"
            if action == "migrate":
                if to_version is None:
                    raise SagaActionError("migrate needs a version to move to")
                await self._migrate(ctx, instance, to_version, detail)
            elif instance.kind == "process":
                await self._operate_process(ctx, instance, action, event=event, detail=detail)
            else:
                await self._operate_saga(ctx, instance, action, event=event, detail=detail)
        return await self.view(saga_id)

    async def _operate_saga(
        self, ctx: Context, instance: Instance, action: str, *, event: str, detail: dict[str, Any]
    ) -> None:
        definition = self._definitions.get(instance.name, {}).get(instance.version)
        if not isinstance(definition, Saga):
            raise SagaActionError(
                f"this service has no definition of {instance.name!r}"
                f" v{instance.version}; migrate the instance first"
            )
        run = Run(definition, instance, ctx, self.service, event)
        run.detail.update(detail)
        step: str | None = detail.get("step")
        reason: str = detail.get("reason") or "no reason given"
        try:
            if action == "retry":
                await run.retry(step)
            elif action == "skip":
                if step is None:
                    raise SagaActionError("skip needs the name of a step")
                await run.skip(step)
            elif action == "compensate":
                await run.compensate(reason)
            elif action == "abort":
                run.abort(reason)
            else:
                raise SagaActionError(f"unknown action {action!r}")
        except SagaDefinitionError as exc:
            raise SagaActionError(str(exc)) from None
        await self._save(ctx, run)

    async def _operate_process(
        self, ctx: Context, instance: Instance, action: str, *, event: str, detail: dict[str, Any]
    ) -> None:
        reason = detail.get("reason")
        if action != "abort":
            raise SagaActionError(
                f"{instance.saga_id!r} is a process manager instance: it can only be aborted"
            )
        if instance.state in RESTING_STATES:
            raise SagaActionError(
                f"cannot abort {instance.saga_id!r}: it is {instance.state.value}"
            )
        expected = instance.revision
        before = instance.state
        instance.state = SagaState.ABORTED
        instance.error = f"aborted by an operator: {reason or 'no reason given'}"
        instance.wake_at = None
        instance.updated_at = ctx.clock.time()
        instance.revision += 1
        changes = [StepChange("(process)", before.value, "ABORTED", instance.error)]
        await self._write(
            ctx,
            instance,
            before=before,
            expected=expected,
            event=event,
            changes=changes,
            detail=detail,
        )

    async def _migrate(
        self, ctx: Context, instance: Instance, to_version: int, detail: dict[str, Any]
    ) -> None:
        old = self._definitions.get(instance.name, {}).get(instance.version)
        new = self._definitions.get(instance.name, {}).get(to_version)
        if new is None or old is None:
            raise SagaActionError(
                f"{instance.name!r} v{instance.version} -> v{to_version}: both versions must be"
                " registered"
            )
        migration = self._migrations.get((instance.name, instance.version, to_version))
        if migration is None:
            raise SagaActionError(
                f"no migration of {instance.name!r} from v{instance.version} to v{to_version}"
                " is declared (engine.migration(SagaMigration(...)))"
            )
        if instance.state in RESTING_STATES - {SagaState.COMPENSATION_FAILED}:
            raise SagaActionError(
                f"{instance.saga_id!r} is {instance.state.value}: nothing to move"
            )
        data = _dict_decoder.decode(instance.data)
        if migration.data is not None:
            data = migration.data(data)
        try:
            typed = msgspec.convert(data, new.data_type)
        except msgspec.ValidationError as exc:
            raise SagaActionError(f"migrated data does not fit v{to_version}: {exc}") from None
        changes: list[StepChange] = []
        if isinstance(old, Saga) and isinstance(new, Saga):
            steps = _migrate_steps(old, new, instance.step_states(), migration, changes)
            instance.steps = store.encode_steps(steps)
            dues = [s.due for s in steps if s.due is not None]
            if instance.state is SagaState.RUNNING and instance.deadline_at is not None:
                dues.append(instance.deadline_at)
            instance.wake_at = min(dues) if dues else None
        expected = instance.revision
        changes.append(
            StepChange(SAGA, f"v{instance.version}", f"v{to_version}", "migrated by an operator")
        )
        instance.version = to_version
        instance.data = _encoder.encode(typed).decode()
        instance.updated_at = ctx.clock.time()
        instance.revision += 1
        await self._write(
            ctx,
            instance,
            before=instance.state,
            expected=expected,
            event="operator migrate",
            changes=changes,
            detail=detail,
        )

    async def migrate(
        self, name: str, from_version: int, to_version: int, *, operator: str = ""
    ) -> list[str]:
        """Move every unfinished instance of ``name`` at ``from_version``; return their ids."""
        async with self.service.read() as session:
            rows = await session.fetch_all(
                "SELECT saga_id FROM atoll_sagas WHERE name = ? AND version = ?"
                " AND state IN ('RUNNING', 'COMPENSATING', 'COMPENSATION_FAILED')",
                name,
                from_version,
            )
        moved = []
        for row in rows:
            await self.operate(row[0], "migrate", to_version=to_version, operator=operator)
            moved.append(row[0])
        return moved

    # -- reading --------------------------------------------------------------------------

    async def view(self, saga_id: str, session: Session | None = None) -> SagaView:
        """An instance with its steps and history, or :class:`SagaNotFoundError`."""
        if session is None:
            async with self.service.read() as reader:
                return await self.view(saga_id, reader)
        instance = await store.load(session, saga_id, for_update=False)
        if instance is None:
            raise SagaNotFoundError(f"service {self.service.name!r} has no saga {saga_id!r}")
        history = await store.history(session, saga_id)
        definition = self._definitions.get(instance.name, {}).get(instance.version)
        steps: list[StepView] = []
        timers: dict[str, float] = {}
        if instance.kind == "process":
            timers = _progress_decoder.decode(instance.steps).timers
        else:
            for i, state in enumerate(instance.step_states()):
                flat = definition.steps[i] if isinstance(definition, Saga) else None
                steps.append(
                    StepView(
                        name=flat.step.name if flat else f"#{i}",
                        group=flat.group if flat else i,
                        parallel=flat.parallel if flat else None,
                        status=state.status.value,
                        attempt=state.attempt,
                        due=state.due,
                        error=state.error,
                        commands_sent=len(state.sent),
                        compensations_sent=len(state.csent),
                        has_compensation=bool(flat and flat.step.compensation is not None),
                    )
                )
        return SagaView(
            saga_id=instance.saga_id,
            name=instance.name,
            version=instance.version,
            kind=instance.kind,
            state=instance.state.value,
            error=instance.error,
            wake_at=instance.wake_at,
            created_at=instance.created_at,
            updated_at=instance.updated_at,
            correlation_id=instance.correlation_id,
            deadline_at=instance.deadline_at,
            revision=instance.revision,
            data=_dict_decoder.decode(instance.data) if instance.data != "null" else {},
            steps=steps,
            timers=timers,
            history=history,
        )

    async def list(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        limit: int = 100,
        before: float | None = None,
    ) -> list[SagaSummary]:
        """Instances, most recently changed first."""
        async with self.service.read() as session:
            return await store.list_instances(
                session, state=state, name=name, limit=limit, before=before
            )

    async def counts(self) -> dict[tuple[str, str], int]:
        """Instances by ``(name, state)``: the gauge for metrics."""
        async with self.service.read() as session:
            return await store.counts(session)

    async def _refresh_counts(self) -> None:
        self.last_counts = await self.counts()


class _SagaCollector(Collector):
    """``atoll_sagas{service, saga, state}``: instances by state, counted at scrape time."""

    def __init__(self, engine: SagaEngine, service: str) -> None:
        self._engine = engine
        self._service = service

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "atoll_sagas",
            "Saga and process instances by state.",
            labels=["service", "saga", "state"],
        )
        for (name, state), count in sorted(self._engine.last_counts.items()):
            gauge.add_metric([self._service, name, state], count)
        yield gauge


def _migrate_steps(
    old: Saga[Any],
    new: Saga[Any],
    states: list[StepState],
    migration: SagaMigration,
    changes: list[StepChange],
) -> list[StepState]:
    """The new version's step states from the old ones, or a :class:`SagaActionError`."""
    result = [StepState() for _ in new.steps]
    mapped: set[int] = set()
    for flat, state in zip(old.steps, states, strict=True):
        name = flat.step.name
        target = migration.steps.get(name, name)
        if target is None or target not in new.index:
            busy = state.status in FORWARD_ACTIVE | COMPENSATION_ACTIVE
            owes = state.status in (StepStatus.COMPLETED, StepStatus.TIMED_OUT) and (
                flat.step.compensation is not None
            )
            if busy or owes:
                raise SagaActionError(
                    f"step {name!r} is {state.status.value}"
                    + (" and has a compensation" if owes else "")
                    + f"; map it to a step of v{new.version}"
                )
            if state.status is not StepStatus.PENDING:
                changes.append(
                    StepChange(name, state.status.value, "DROPPED", "not in new version")
                )
            continue
        index = new.index[target]
        if state.status in FORWARD_ACTIVE | COMPENSATION_ACTIVE:
            new_flat = new.steps[index].step
            action = (
                new_flat.compensation if state.status in COMPENSATION_ACTIVE else new_flat.action
            )
            old_action = (
                flat.step.compensation if state.status in COMPENSATION_ACTIVE else flat.step.action
            )
            old_types = {t.message_type for t in getattr(old_action, "reply_types", ())}
            new_types = {t.message_type for t in getattr(action, "reply_types", ())}
            if not old_types <= new_types:
                raise SagaActionError(
                    f"step {name!r} waits for {sorted(old_types)}, but {target!r} of"
                    f" v{new.version} does not accept all of them"
                )
        result[index] = state
        mapped.add(index)
        if target != name:
            changes.append(StepChange(name, name, target, "renamed"))
    reached = max(
        (new.steps[i].group for i in mapped if result[i].status is not StepStatus.PENDING),
        default=-1,
    )
    for flat in new.steps:
        if flat.index not in mapped and flat.group < reached:
            result[flat.index] = StepState(status=StepStatus.SKIPPED)
            changes.append(
                StepChange(flat.step.name, "", "SKIPPED", "added before the instance's position")
            )
    return result
