"""Catch-up subscriptions to the global log that switch to live, and the typed log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

from atoll.determinism import RandomSource
from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._codec import EventCodec, EventRecord, UnknownEvent
from atoll.eventstore._crypto import SubjectKeys
from atoll.eventstore._model import ANY, START, AppendResult, ExpectedVersion, RawEvent
from atoll.eventstore._wake import Waiter
from atoll.messages import Event
from atoll.persistence import Session

#: The first poll after seeing events held back by an open transaction (seconds).
HELD_BACK_FIRST_POLL = 0.002


class Subscription:
    """Reads the global log from ``after`` and then follows it live.

    Catching up and following are the same loop: read a page after the last position
    seen; when a page comes back short, wait for a wake-up hint or ``poll_interval``,
    whichever is first, and read again. Because every read goes through the store's
    ordered, watermarked log, switching from catch-up to live cannot skip or repeat an
    event. Use it as ``async with store_subscription as sub: async for event in sub``.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        after: int = START,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.position = after
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        #: Whether the last read found the end of the readable log.
        self.live = False
        self._waiter: Waiter | None = None
        self._held_back_poll = HELD_BACK_FIRST_POLL

    async def __aenter__(self) -> Self:
        self._waiter = self.store.waiter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None

    async def next_batch(self) -> list[RawEvent]:
        """The next page of events; an empty list after one idle wait with nothing new.

        :attr:`position` moves past the page returned.
        """
        if self._waiter is None:
            raise RuntimeError("use the subscription in `async with`")
        self._waiter.clear()
        batch = await self.store.read_all(after=self.position, limit=self.batch_size)
        if batch:
            self.position = batch[-1].position
            self.live = len(batch) < self.batch_size
            return batch
        self.live = True
        await self.idle(self._waiter)
        return []

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        """Pages of events, forever (waiting while there is nothing new)."""
        while True:
            batch = await self.next_batch()
            if batch:
                yield batch

    async def idle(self, waiter: Waiter) -> None:
        """Wait for a hint or the poll interval; poll soon if events are held back."""
        timeout = self.poll_interval
        if await self.store.has_held_back():
            timeout = min(self._held_back_poll, self.poll_interval)
            self._held_back_poll = min(self._held_back_poll * 2, self.poll_interval)
        else:
            self._held_back_poll = HELD_BACK_FIRST_POLL
        await waiter.wait(timeout, self.store.clock)

    async def __aiter__(self) -> AsyncIterator[RawEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event


class TypedSubscription(Subscription):
    """A :class:`Subscription` that yields decoded :class:`EventRecord` values."""

    def __init__(self, store: EventStore, codec: EventCodec, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.codec = codec

    async def records(self) -> AsyncIterator[EventRecord[Event | UnknownEvent]]:
        """Decoded events, forever."""
        async for batch in self.batches():
            for record in await self.codec.decode(batch):
                yield record


class EventLog:
    """Typed access to a store: append :class:`~atoll.messages.Event` values, read records.

    Event ids are drawn from ``random`` unless given; personal fields are sealed with
    ``keys`` (see :class:`~atoll.eventstore.SubjectKeys`).
    """

    def __init__(
        self,
        store: EventStore,
        codec: EventCodec | None = None,
        *,
        keys: SubjectKeys | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.store = store
        self.codec = codec if codec is not None else EventCodec(keys=keys)
        if keys is not None and self.codec.keys is None:
            self.codec.keys = keys
        self._random = random or RandomSource(clock=store.clock)

    def register(self, *classes: type[Event]) -> None:
        """Register event classes for decoding."""
        self.codec.register(*classes)

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: ExpectedVersion = ANY,
        *,
        tx: Transaction | None = None,
        event_ids: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AppendResult:
        """Encode and append ``events`` (see :meth:`EventStore.append`)."""
        if event_ids is not None and len(event_ids) != len(events):
            raise ValueError("event_ids must have one id per event")
        ids = list(event_ids) if event_ids is not None else [self._random.new_id() for _ in events]
        async with self.store._writing(tx) as w:
            data = [
                await self.codec.encode(event, event_id=event_id, metadata=metadata, tx=w)
                for event, event_id in zip(events, ids, strict=True)
            ]
            return await self.store.append(stream_id, data, expected_version, tx=w)

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
        tx: Session | Transaction | None = None,
    ) -> list[EventRecord[Event | UnknownEvent]]:
        """Decoded events of one stream (see :meth:`EventStore.read_stream`)."""
        raws = await self.store.read_stream(
            stream_id, from_version=from_version, backwards=backwards, limit=limit, tx=tx
        )
        return await self.codec.decode(raws, session=tx)

    async def read_all(
        self, *, after: int = START, limit: int = 500
    ) -> list[EventRecord[Event | UnknownEvent]]:
        """Decoded events of the global log (see :meth:`EventStore.read_all`)."""
        return await self.codec.decode(await self.store.read_all(after=after, limit=limit))

    def subscribe(
        self, *, after: int = START, batch_size: int = 500, poll_interval: float = 1.0
    ) -> TypedSubscription:
        """A live subscription yielding decoded records (use ``.records()``)."""
        return TypedSubscription(
            self.store,
            self.codec,
            after=after,
            batch_size=batch_size,
            poll_interval=poll_interval,
        )
