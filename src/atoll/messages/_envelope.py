"""The envelope: everything a message carries besides its payload."""

from __future__ import annotations

from datetime import datetime

import msgspec

from atoll.messages._model import MessageKind


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A self-describing message on the wire.

    ``id`` is set once by the producer when the message is written to its outbox and
    never changes: every redelivery and every republish carries the same id, which is
    what inboxes deduplicate on. ``destination`` is a service name for commands and
    replies and the event type for events. ``key`` orders messages: two messages with
    the same key reach each consumer group in the order they were committed.
    """

    id: str
    type: str
    version: int
    kind: MessageKind
    source: str
    destination: str
    correlation_id: str
    created_at: datetime
    payload: msgspec.Raw
    causation_id: str | None = None
    key: str | None = None
    reply_to: str | None = None
    deadline: datetime | None = None
    trace: dict[str, str] = msgspec.field(default_factory=dict)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
