"""Event sourcing: an event store whose global log no reader can skip, aggregates,
projections, snapshots, upcasting and crypto-shredding of personal data.

Start with :class:`SQLiteEventStore` (tables in a service's own database) or
:class:`PostgresEventStore`; then :class:`Repository` for aggregates,
:class:`ProjectionRunner` for read models and :class:`EventLog` for typed reads.
``docs/eventstore.md`` has the tour, the watermark design and its proof.
"""

from atoll.eventstore._aggregate import Aggregate, applies
from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._codec import EventCodec, EventRecord, UnknownEvent
from atoll.eventstore._crypto import Erasure, Personal, SubjectKeys
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
from atoll.eventstore._projection import (
    Projection,
    ProjectionMetrics,
    ProjectionRunner,
    ProjectionStatus,
    on,
    projections_readiness,
)
from atoll.eventstore._repository import Repository
from atoll.eventstore._sqlite import SQLiteEventStore
from atoll.eventstore._subscription import EventLog, Subscription, TypedSubscription
from atoll.eventstore._wake import Waiter

__all__ = [
    "ANY",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "Aggregate",
    "AggregateNotFoundError",
    "AppendResult",
    "Backlog",
    "CheckpointConflictError",
    "ConcurrencyError",
    "CorruptEventError",
    "DuplicateEventError",
    "Erasure",
    "EventCodec",
    "EventData",
    "EventDecodeError",
    "EventLog",
    "EventRecord",
    "EventStore",
    "EventStoreError",
    "ExpectedVersion",
    "KeyStoreError",
    "MissingApplierError",
    "Personal",
    "PostgresEventStore",
    "PostgresTransaction",
    "Projection",
    "ProjectionFailedError",
    "ProjectionMetrics",
    "ProjectionRunner",
    "ProjectionStatus",
    "RawEvent",
    "Repository",
    "SQLiteEventStore",
    "Snapshot",
    "StreamDeletedError",
    "StreamInfo",
    "StreamState",
    "SubjectKeys",
    "Subscription",
    "Transaction",
    "TypedSubscription",
    "UnknownEvent",
    "UnknownEventTypeError",
    "UpcastFailedError",
    "Waiter",
    "applies",
    "format_position",
    "on",
    "projections_readiness",
]
