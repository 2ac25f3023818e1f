"""Errors of the event store. Each names the stream and the versions involved."""

from __future__ import annotations

from atoll._errors import AtollError


class EventStoreError(AtollError):
    """An event store operation failed."""


class ConcurrencyError(EventStoreError):
    """The stream was not at the version the writer expected; nothing was appended.

    Reload the stream (or aggregate), decide again, and retry.
    """

    def __init__(self, stream_id: str, expected: str, actual: int) -> None:
        actual_text = "does not exist" if actual < 0 else f"is at version {actual}"
        super().__init__(f"stream {stream_id!r}: expected {expected}, but it {actual_text}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class StreamDeletedError(EventStoreError):
    """The stream was deleted (tombstoned): it cannot be read or appended to again."""

    def __init__(self, stream_id: str, version: int) -> None:
        super().__init__(f"stream {stream_id!r} was deleted at version {version}")
        self.stream_id = stream_id
        self.version = version


class DuplicateEventError(EventStoreError):
    """Some of the appended event ids exist already, but not as this exact append.

    Appending the same events (same ids, same order) to the same stream again is
    idempotent; this error means the ids were reused for different events or another
    stream. Nothing was appended.
    """

    def __init__(self, stream_id: str, detail: str) -> None:
        super().__init__(f"stream {stream_id!r}: {detail}; nothing was appended")
        self.stream_id = stream_id


class EventDecodeError(EventStoreError):
    """A stored event could not be turned into a typed event."""

    def __init__(self, stream_id: str, version: int, position: int, detail: str) -> None:
        super().__init__(
            f"event {stream_id!r} v{version} (position {position}) cannot be read: {detail}"
        )
        self.stream_id = stream_id
        self.version = version
        self.position = position
        self.detail = detail


class CorruptEventError(EventDecodeError):
    """The stored bytes are not valid for the event's type (or fail authentication)."""


class UpcastFailedError(EventDecodeError):
    """An older version of the event could not be brought up to date."""


class UnknownEventTypeError(EventDecodeError):
    """An aggregate's stream holds an event type this code does not know.

    Reads of the log keep such events as :class:`~atoll.eventstore.UnknownEvent`; only
    rebuilding an aggregate, which cannot skip an event and stay correct, raises this.
    """


class AggregateNotFoundError(EventStoreError):
    """No events (and no snapshot) exist for the aggregate."""

    def __init__(self, aggregate: str, aggregate_id: str, stream_id: str) -> None:
        super().__init__(f"{aggregate} {aggregate_id!r} not found (stream {stream_id!r} is empty)")
        self.aggregate_id = aggregate_id
        self.stream_id = stream_id


class MissingApplierError(EventStoreError):
    """An aggregate recorded or loaded an event it declares no applier for."""


class CheckpointConflictError(EventStoreError):
    """Another runner moved the projection's checkpoint; this batch was rolled back."""

    def __init__(self, name: str, expected: int | None) -> None:
        super().__init__(
            f"projection {name!r}: checkpoint is no longer at {expected}; another runner "
            "advanced or reset it"
        )
        self.name = name
        self.expected = expected


class ProjectionFailedError(EventStoreError):
    """A projection handler raised; the projection stops at that event until fixed."""

    def __init__(
        self, name: str, stream_id: str, version: int, position: int, error: BaseException
    ) -> None:
        super().__init__(
            f"projection {name!r} failed on {stream_id!r} v{version} (position {position}): "
            f"{type(error).__name__}: {error}"
        )
        self.name = name
        self.stream_id = stream_id
        self.version = version
        self.position = position


class KeyStoreError(EventStoreError):
    """Personal data could not be encrypted or decrypted."""
