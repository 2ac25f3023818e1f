"""Event sourcing: an event store with a global log no reader can skip, aggregates,
projections, snapshots, upcasting and crypto-shredding of personal data.

Start with :class:`SQLiteEventStore` (in a service's own database) or
:class:`PostgresEventStore`, then :class:`Repository` for aggregates and
:class:`ProjectionRunner` for read models. ``docs/eventstore.md`` has the tour.
"""

from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._errors import (
    AggregateNotFoundError,
    CheckpointConflictError,
    ConcurrencyError,
    CorruptEventError,
    DuplicateEventError,
    EventDecodeError,
    EventStoreError,
    KeyStoreError,
    MissingApplierError,
    ProjectionFailedError,
    StreamDeletedError,
    UnknownEventTypeError,
    UpcastFailedError,
)
from atoll.eventstore._model import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendResult,
    Backlog,
    EventData,
    ExpectedVersion,
    RawEvent,
    Snapshot,
    StreamInfo,
    StreamState,
)
from atoll.eventstore._postgres import PostgresEventStore, PostgresTransaction, format_position
from atoll.eventstore._sqlite import SQLiteEventStore
from atoll.eventstore._wake import Waiter

__all__ = [
    "ANY",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "AggregateNotFoundError",
    "AppendResult",
    "Backlog",
    "CheckpointConflictError",
    "ConcurrencyError",
    "CorruptEventError",
    "DuplicateEventError",
    "EventData",
    "EventDecodeError",
    "EventStore",
    "EventStoreError",
    "ExpectedVersion",
    "KeyStoreError",
    "MissingApplierError",
    "PostgresEventStore",
    "PostgresTransaction",
    "ProjectionFailedError",
    "RawEvent",
    "SQLiteEventStore",
    "Snapshot",
    "StreamDeletedError",
    "StreamInfo",
    "StreamState",
    "Transaction",
    "UnknownEventTypeError",
    "UpcastFailedError",
    "Waiter",
    "format_position",
]
