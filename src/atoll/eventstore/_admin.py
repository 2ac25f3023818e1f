"""What the ``atoll events`` and ``atoll projections`` commands need.

Every function returns plain data (dicts of JSON values) so that the CLI can print it
as a table or as JSON; none of them prints.

* ``atoll events streams``        -> :func:`list_streams`
* ``atoll events show STREAM``    -> :func:`show_stream`
* ``atoll events tail``           -> :func:`tail`
* ``atoll projections status``    -> :func:`projections_status`
* ``atoll projections rebuild N`` -> :func:`rebuild_projection`
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option
from atoll.eventstore._base import EventStore
from atoll.eventstore._codec import EventCodec, EventRecord, UnknownEvent
from atoll.eventstore._crypto import SubjectKeys
from atoll.eventstore._errors import EventDecodeError, KeyStoreError
from atoll.eventstore._model import RawEvent, decode_metadata
from atoll.eventstore._postgres import PostgresEventStore, format_position
from atoll.eventstore._projection import Projection, ProjectionRunner
from atoll.eventstore._sqlite import SQLiteEventStore
from atoll.eventstore._subscription import Subscription
from atoll.messages import Event
from atoll.persistence._url import sqlite_path

_json_any = msgspec.json.Decoder()


def store_from_url(url: str, *, base_dir: Path | None = None) -> EventStore:
    """An (unopened) event store for a service database URL.

    ``sqlite:///orders.db`` is the service's own database file (the store's tables live
    in it); ``postgresql://user@host/db?schema=orders&prefix=atoll_es_`` picks the
    schema and table prefix (defaults ``public`` and ``atoll_es_``).
    """
    scheme = urlsplit(url).scheme
    options = query_options(url)
    prefix = take_option(options, "prefix", str, "atoll_es_", url)
    if scheme == "sqlite":
        synchronous = take_option(options, "synchronous", str.upper, "FULL", url)
        reject_unknown(options, url)
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise URLError(f"{url}: option synchronous={synchronous!r} is invalid")
        return SQLiteEventStore.from_path(
            sqlite_path(url, base_dir or Path.cwd()),
            prefix=prefix,
            synchronous=synchronous,  # type: ignore[arg-type]
        )
    if scheme in ("postgresql", "postgres"):
        schema = take_option(options, "schema", str, "public", url)
        reject_unknown(options, url)
        dsn = urlunsplit(urlsplit(url)._replace(query=""))
        return PostgresEventStore(dsn, schema=schema, prefix=prefix, max_connections=3)
    raise URLError(f"{redact(url)}: no event store backend for scheme {scheme!r}")


def describe_position(store: EventStore, position: int) -> str:
    """A position as people read it (``xid:seq`` on PostgreSQL)."""
    return format_position(position) if isinstance(store, PostgresEventStore) else str(position)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def _payload(data: bytes) -> Any:
    try:
        return _json_any.decode(data)
    except msgspec.DecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def event_row(
    store: EventStore, raw: RawEvent, record: EventRecord[Event | UnknownEvent] | None = None
) -> dict[str, Any]:
    """One event as JSON-ready data: decoded (typed, upcast, decrypted) when possible.

    Without a record the payload is shown as stored; personal fields then appear only
    in their sealed (encrypted) form.
    """
    row: dict[str, Any] = {
        "stream": raw.stream_id,
        "version": raw.version,
        "position": describe_position(store, raw.position),
        "event_id": raw.event_id,
        "type": raw.type,
        "type_version": raw.type_version,
        "recorded_at": _iso(raw.recorded_at),
        "metadata": decode_metadata(raw.metadata),
    }
    if record is not None and not isinstance(record.event, UnknownEvent):
        row["data"] = msgspec.to_builtins(record.event)
        if record.erased:
            row["erased"] = sorted(record.erased)
    else:
        row["data"] = _payload(raw.data)
        if record is not None:
            row["unknown_type"] = True
    return row


async def _rows(
    store: EventStore, raws: list[RawEvent], codec: EventCodec | None
) -> list[dict[str, Any]]:
    if codec is None:
        return [event_row(store, raw) for raw in raws]
    try:
        records = await codec.decode(raws)
    except (EventDecodeError, KeyStoreError):
        # Show what is stored, one by one, marking the events that cannot be decoded.
        rows: list[dict[str, Any]] = []
        for raw in raws:
            try:
                (record,) = await codec.decode([raw])
                rows.append(event_row(store, raw, record))
            except (EventDecodeError, KeyStoreError) as exc:
                rows.append({**event_row(store, raw), "error": str(exc)})
        return rows
    return [event_row(store, raw, rec) for raw, rec in zip(raws, records, strict=True)]


async def list_streams(
    store: EventStore, *, prefix: str | None = None, after: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """``atoll events streams``: streams with their version and state."""
    return [
        {
            "stream": info.stream_id,
            "version": info.version,
            "events": max(0, info.version + 1 - info.truncated_before),
            "deleted": info.deleted,
            "truncated_before": info.truncated_before,
            "metadata": info.metadata,
            "updated_at": _iso(info.updated_at),
        }
        for info in await store.list_streams(after=after, limit=limit, prefix=prefix)
    ]


async def show_stream(
    store: EventStore,
    stream_id: str,
    *,
    codec: EventCodec | None = None,
    from_version: int | None = None,
    limit: int = 100,
    backwards: bool = False,
) -> list[dict[str, Any]]:
    """``atoll events show STREAM``: its events, decoded if a codec is given."""
    raws = await store.read_stream(
        stream_id, from_version=from_version, backwards=backwards, limit=limit
    )
    return await _rows(store, raws, codec)


async def tail(
    store: EventStore,
    *,
    last: int = 10,
    after: int | None = None,
    follow: bool = False,
    codec: EventCodec | None = None,
    poll_interval: float = 1.0,
) -> AsyncIterator[dict[str, Any]]:
    """``atoll events tail``: the last ``last`` events (or those after ``after``).

    With ``follow`` it keeps yielding new events as they commit, until cancelled.
    """
    if after is None:
        raws = await store.read_last(last)
        for row in await _rows(store, raws, codec):
            yield row
        after = raws[-1].position if raws else await store.head_position()
    elif not follow:
        for row in await _rows(store, await store.read_all(after=after, limit=last), codec):
            yield row
    if not follow:
        return
    async with Subscription(store, after=after, poll_interval=poll_interval) as sub:
        async for batch in sub.batches():
            for row in await _rows(store, batch, codec):
                yield row


async def projections_status(
    store: EventStore, *, stall_after: float = 60.0
) -> list[dict[str, Any]]:
    """``atoll projections status``: every projection's checkpoint and lag.

    Computed from the database alone (no running service needed). ``stalled`` is true
    when events wait and the checkpoint has not moved for ``stall_after`` seconds.
    """
    now = store.clock.time()
    rows: list[dict[str, Any]] = []
    for name, position, updated_at in await store.list_checkpoints():
        backlog = await store.backlog(position)
        waiting = backlog.events > 0 or backlog.held_back > 0
        seconds = (
            max(0.0, now - backlog.oldest_recorded_at)
            if waiting and backlog.oldest_recorded_at is not None
            else 0.0
        )
        rows.append(
            {
                "projection": name,
                "position": describe_position(store, position),
                "events_behind": backlog.events,
                "events_behind_capped": backlog.capped,
                "held_back": backlog.held_back,
                "seconds_behind": round(seconds, 3),
                "checkpoint_updated_at": _iso(updated_at),
                "stalled": waiting and now - updated_at > stall_after,
                "blocked_by": backlog.blocked_by,
            }
        )
    return rows


async def rebuild_projection(
    store: EventStore,
    projection: Projection,
    *,
    codec: EventCodec | None = None,
    keys: SubjectKeys | None = None,
) -> int:
    """``atoll projections rebuild NAME``: clear and replay; returns the events applied.

    A service running the same projection notices the reset checkpoint and follows.
    """
    runner = ProjectionRunner(projection, store, codec=codec, keys=keys)
    return await runner.rebuild()
