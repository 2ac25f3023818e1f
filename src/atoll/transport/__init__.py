"""Transports: the seam between outboxes and consumers, and the embedded backends."""

from atoll.transport._base import (
    Ack,
    BatchHandler,
    Consumer,
    DeadLetter,
    DeadLetterRecord,
    DeadLetterStore,
    Delivery,
    Outcome,
    OutgoingMessage,
    RedeliveryPolicy,
    Retry,
    Transport,
    TransportError,
    TransportUnavailableError,
    command_group,
    command_topic,
    event_topic,
)
from atoll.transport._url import transport_from_url

__all__ = [
    "Ack",
    "BatchHandler",
    "Consumer",
    "DeadLetter",
    "DeadLetterRecord",
    "DeadLetterStore",
    "Delivery",
    "Outcome",
    "OutgoingMessage",
    "RedeliveryPolicy",
    "Retry",
    "Transport",
    "TransportError",
    "TransportUnavailableError",
    "command_group",
    "command_topic",
    "event_topic",
    "transport_from_url",
]
