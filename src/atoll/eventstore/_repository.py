"""Loading and saving aggregates: snapshots, optimistic concurrency, the outbox."""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

from atoll.determinism import RandomSource
from atoll.eventstore._aggregate import Aggregate, _Pending
from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._codec import EventCodec, UnknownEvent
from atoll.eventstore._crypto import SubjectKeys
from atoll.eventstore._errors import (
    AggregateNotFoundError,
    EventDecodeError,
    EventStoreError,
    UnknownEventTypeError,
)
from atoll.eventstore._model import NO_STREAM, AppendResult, EventData, RawEvent, Snapshot
from atoll.persistence import Session
from atoll.service import Context

log = logging.getLogger("atoll.eventstore")

A = TypeVar("A", bound=Aggregate)

#: Events read per round trip while loading an aggregate.
_PAGE = 1000


class Repository(Generic[A]):
    """Loads aggregates of one type from their streams and saves their new events.

    :meth:`save` appends in the caller's transaction with the version the aggregate was
    loaded at as the expected version, so a concurrent change raises
    :class:`~atoll.eventstore.ConcurrencyError` and nothing is stored. Given an
    :class:`atoll.service.Context`, it also publishes each new event through the
    service's outbox in that same transaction, under the event's own id: the event is
    stored and published exactly once, or neither.

    Every ``snapshot_every`` events (per aggregate class) it stores a snapshot, and
    :meth:`load` starts from the latest one.
    """

    def __init__(
        self,
        aggregate: type[A],
        store: EventStore,
        *,
        codec: EventCodec | None = None,
        keys: SubjectKeys | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.aggregate = aggregate
        self.store = store
        self.codec = codec if codec is not None else EventCodec(keys=keys)
        if keys is not None and self.codec.keys is None:
            self.codec.keys = keys
        self.codec.register(*aggregate.event_types())
        self._random = random or RandomSource(clock=store.clock)
        subject = aggregate.data_subject
        self._state_shape = self.codec.shape(
            aggregate.state_type,
            # "id" is not a state field: the subject is then the aggregate's id.
            subject=None if subject == "id" else subject,
            external_subject=subject == "id",
        )

    def __repr__(self) -> str:
        return f"Repository({self.aggregate.__qualname__}, {self.store!r})"

    def create(self, aggregate_id: str) -> A:
        """A new, empty aggregate (nothing is stored until it is saved)."""
        return self.aggregate(aggregate_id)

    async def get(self, aggregate_id: str, *, tx: Session | Transaction | None = None) -> A | None:
        """The aggregate, or ``None`` if it has no events."""
        try:
            return await self.load(aggregate_id, tx=tx)
        except AggregateNotFoundError:
            return None

    async def load(self, aggregate_id: str, *, tx: Session | Transaction | None = None) -> A:
        """The aggregate rebuilt from its latest snapshot and the events after it.

        Pass ``tx`` to load inside the transaction that will save it.
        """
        aggregate = self.aggregate(aggregate_id)
        stream_id = aggregate.stream_id
        if self.aggregate.snapshot_every is not None:
            await self._restore_snapshot(aggregate, tx)
        start = aggregate.version + 1
        while True:
            raws = await self.store.read_stream(
                stream_id, from_version=aggregate.version + 1, limit=_PAGE, tx=tx
            )
            if not raws:
                break
            if raws[0].version != aggregate.version + 1:
                raise EventStoreError(
                    f"{self.aggregate.__qualname__} {aggregate_id!r}: stream {stream_id!r} "
                    f"starts at v{raws[0].version} (truncated) but the latest usable snapshot "
                    f"ends at v{aggregate.version}: the aggregate cannot be rebuilt"
                )
            for record in await self.codec.decode(raws, session=tx):
                if isinstance(record.event, UnknownEvent):
                    raise UnknownEventTypeError(
                        record.stream_id,
                        record.version,
                        record.position,
                        f"unknown event type {record.type!r}: {self.aggregate.__qualname__} "
                        "cannot be rebuilt without it",
                    )
                aggregate.apply(record.event)
                aggregate.version = record.version
            if len(raws) < _PAGE:
                break
        if aggregate.version < 0:
            info = await self.store.stream_info(stream_id, tx=tx)
            if info is not None and info.version >= start:
                raise EventStoreError(
                    f"{self.aggregate.__qualname__} {aggregate_id!r}: stream {stream_id!r} was "
                    "truncated and has no usable snapshot: the aggregate cannot be rebuilt"
                )
            raise AggregateNotFoundError(self.aggregate.__qualname__, aggregate_id, stream_id)
        return aggregate

    async def _restore_snapshot(self, aggregate: A, tx: Session | Transaction | None) -> None:
        snapshot = await self.store.load_snapshot(aggregate.stream_id, tx=tx)
        if (
            snapshot is None
            or snapshot.type != self.aggregate.category
            or snapshot.schema_version != self.aggregate.snapshot_version
        ):
            return
        raw = RawEvent(
            stream_id=snapshot.stream_id,
            version=snapshot.version,
            position=-1,
            event_id="",
            type=f"snapshot of {snapshot.type}",
            type_version=snapshot.schema_version,
            data=snapshot.data,
            metadata=b"",
            recorded_at=snapshot.recorded_at,
        )
        try:
            data = self.codec.parse(raw)
            subjects = self.codec.sealed_subjects(data)
            keys = await self.codec.keys_for(subjects, tx)
            state, _ = self.codec.open_sealed(
                raw,
                self._state_shape,
                data,
                keys,
                _snapshot_aad(snapshot.stream_id, snapshot.version),
            )
        except EventDecodeError as exc:
            # A snapshot is a cache: replay the stream instead.
            log.warning("ignoring the snapshot of %r: %s", snapshot.stream_id, exc)
            return
        aggregate._restore(state)
        aggregate.version = snapshot.version

    async def save(
        self, aggregate: A, tx: Transaction | None = None, *, publish: bool = True
    ) -> AppendResult | None:
        """Append the aggregate's pending events; ``None`` if there were none.

        ``tx`` is the unit of work (an :class:`atoll.service.Context` also publishes the
        events through the outbox, unless ``publish=False``). Without ``tx`` the save is
        its own transaction. The aggregate takes its new version when ``tx`` commits; if
        ``tx`` rolls back, the events stay pending with the same ids, so saving again is
        safe even when the outcome of the first commit is unknown (the store recognises
        the ids and the outbox is not written twice).
        """
        if not aggregate._pending:
            return None
        if tx is None:
            async with self.store.transaction() as own:
                return await self.save(aggregate, own, publish=publish)
        if aggregate._tx is tx:
            base, done = aggregate._tx_version, aggregate._tx_count
        else:
            base, done = aggregate.version, 0
        batch = aggregate._pending[done:]
        if not batch:
            return None
        data = await self._encode(batch, tx)
        result = await self.store.append(
            aggregate.stream_id, data, NO_STREAM if base < 0 else base, tx=tx
        )
        aggregate._tx, aggregate._tx_version = tx, result.last_version
        aggregate._tx_count = count = done + len(batch)
        if not result.deduplicated:
            if publish and isinstance(tx, Context):
                for pending in batch:
                    tx.publish(pending.event, key=aggregate.stream_id, message_id=pending.event_id)
            await self._maybe_snapshot(aggregate, base, result.last_version, tx)

        def committed() -> None:
            # Only the last save of this transaction settles the aggregate.
            if aggregate._tx is tx and aggregate._tx_count == count:
                aggregate.version = result.last_version
                del aggregate._pending[:count]
                aggregate._tx, aggregate._tx_count = None, 0

        tx.on_commit(committed)
        return result

    async def _encode(self, batch: list[_Pending], tx: Transaction) -> list[EventData]:
        """Give each event its id (once: a retry reuses it) and encode it."""
        random = tx.random if isinstance(tx, Context) else self._random
        for pending in batch:
            pending.event_id = pending.event_id or random.new_id()
        metadata = self._metadata(tx)
        return [
            await self.codec.encode(p.event, event_id=p.event_id or "", metadata=metadata, tx=tx)
            for p in batch
        ]

    def _metadata(self, tx: Transaction) -> dict[str, Any]:
        metadata: dict[str, Any] = {"aggregate": self.aggregate.category}
        if isinstance(tx, Context):
            metadata["correlation_id"] = tx.correlation_id
            if tx.envelope is not None:
                metadata["causation_id"] = tx.envelope.id
        return metadata

    async def _maybe_snapshot(self, aggregate: A, before: int, after: int, tx: Transaction) -> None:
        every = self.aggregate.snapshot_every
        if every is None or (after + 1) // every == (before + 1) // every:
            return
        state = aggregate.state()
        aad = _snapshot_aad(aggregate.stream_id, after)
        if self._state_shape.personal:
            data = await self.codec.seal(
                state, self._state_shape, aggregate.subject() or "", aad, tx
            )
        else:
            data = self.codec.dump(state)
        await self.store.save_snapshot(
            Snapshot(
                stream_id=aggregate.stream_id,
                version=after,
                type=self.aggregate.category,
                schema_version=self.aggregate.snapshot_version,
                data=data,
                recorded_at=self.store.clock.time(),
            ),
            tx=tx,
        )


def _snapshot_aad(stream_id: str, version: int) -> bytes:
    return f"snapshot:{stream_id}:{version}".encode()
