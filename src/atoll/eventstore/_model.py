"""What goes into the event store and what comes out, before any typing."""

from __future__ import annotations

import enum
import uuid
from typing import Any, Final

import msgspec

#: The position before the first event of the global log: read ``after=START`` for all.
START: Final = 0


class StreamState(enum.Enum):
    """Expected stream states that are not an exact version."""

    ANY = "any"
    """Append whatever the stream's version (no concurrency check)."""
    NO_STREAM = "no stream"
    """The stream must not exist yet."""
    STREAM_EXISTS = "an existing stream"
    """The stream must exist (have at least one event)."""


ANY: Final = StreamState.ANY
NO_STREAM: Final = StreamState.NO_STREAM
STREAM_EXISTS: Final = StreamState.STREAM_EXISTS

#: An exact version (``>= 0``, the version of the stream's last event) or a state.
ExpectedVersion = int | StreamState


def describe_expected(expected: ExpectedVersion) -> str:
    """``expected`` as words for error messages."""
    if isinstance(expected, StreamState):
        return expected.value
    return f"version {expected}"


def check_expected(expected: ExpectedVersion) -> None:
    """Reject an expected version that can never match."""
    if isinstance(expected, StreamState):
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise ValueError(
            f"expected_version must be an int >= 0 or ANY, NO_STREAM, STREAM_EXISTS; got "
            f"{expected!r}"
        )


def expected_matches(expected: ExpectedVersion, current: int) -> bool:
    """Whether a stream at ``current`` (``-1``: no events) satisfies ``expected``."""
    if expected is ANY:
        return True
    if expected is NO_STREAM:
        return current < 0
    if expected is STREAM_EXISTS:
        return current >= 0
    return current == expected


def normalize_event_id(event_id: str) -> str:
    """Event ids are UUIDs; the canonical form is 32 lowercase hex digits."""
    try:
        return uuid.UUID(event_id).hex
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"event id {event_id!r} is not a UUID") from None


class EventData(msgspec.Struct, frozen=True, kw_only=True):
    """One event to append: its id, type and serialised payload.

    ``event_id`` (a UUID) makes the append idempotent: appending the same events to the
    same stream again stores nothing and reports the earlier result.
    """

    event_id: str
    type: str
    data: bytes
    metadata: bytes = b""
    type_version: int = 1


class RawEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded event as stored.

    ``version`` is its place in its stream (the first event is version 0). ``position``
    is its place in the global log: it increases along the log but is not dense (on
    PostgreSQL it packs the order key and a sequence number, so compare positions, do
    not subtract them).
    """

    stream_id: str
    version: int
    position: int
    event_id: str
    type: str
    type_version: int
    data: bytes
    metadata: bytes
    recorded_at: float


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    """What an append did. ``deduplicated`` means the events were already stored."""

    stream_id: str
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    deduplicated: bool = False

    @property
    def next_expected_version(self) -> int:
        """The expected version for the next append to this stream."""
        return self.last_version


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's state: last version, deletion, truncation and metadata."""

    stream_id: str
    version: int
    deleted: bool
    truncated_before: int
    metadata: dict[str, Any]
    created_at: float
    updated_at: float


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate's serialised state as of ``version`` of its stream."""

    stream_id: str
    version: int
    type: str
    schema_version: int
    data: bytes
    recorded_at: float


class Backlog(msgspec.Struct, frozen=True, kw_only=True):
    """Committed events after a position: how far a reader is behind.

    ``events`` counts readable events (up to a cap, then ``capped``). ``held_back``
    counts committed events that readers cannot see yet because an older transaction is
    still open (PostgreSQL's visibility watermark; always 0 on SQLite), and
    ``blocked_by`` describes that transaction. ``oldest_recorded_at`` is when the oldest
    waiting event was appended.
    """

    events: int
    capped: bool
    held_back: int
    oldest_recorded_at: float | None
    blocked_by: str | None = None


_json = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """Stream or event metadata as JSON bytes (empty for no metadata)."""
    return _json.encode(metadata) if metadata else b""


def decode_metadata(data: bytes | None) -> dict[str, Any]:
    """The inverse of :func:`encode_metadata`; tolerates empty and ``NULL``."""
    if not data:
        return {}
    try:
        return _dict_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {"_undecodable": bytes(data).decode("utf-8", "replace")}
