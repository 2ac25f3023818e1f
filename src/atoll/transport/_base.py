"""The transport seam: how committed messages travel between services."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import msgspec

from atoll._errors import AtollError


class TransportError(AtollError):
    """The transport failed; what was being done is in the message."""


class TransportUnavailableError(TransportError):
    """The transport cannot be reached now; the operation may succeed later."""


class OutgoingMessage(msgspec.Struct, frozen=True):
    """An encoded message ready to publish.

    ``topic`` is ``service.<name>`` for commands and replies to service ``<name>`` and
    ``event.<type>`` for events. ``message_id`` is the envelope's id.
    """

    topic: str
    message_id: str
    key: str | None
    body: bytes


class Delivery(msgspec.Struct, frozen=True):
    """One delivery of a message to one consumer group.

    ``attempt`` counts deliveries of this message to this group, starting at 1.
    ``token`` is transport-private and identifies this delivery when it is settled.
    """

    group: str
    topic: str
    message_id: str
    key: str | None
    body: bytes
    attempt: int
    token: object = None


class Ack(msgspec.Struct, frozen=True):
    """The message was handled (or was a duplicate): never deliver it to this group again."""


class Retry(msgspec.Struct, frozen=True):
    """Handling failed; deliver again after a backoff, or dead-letter when attempts run out.

    ``delay`` overrides the policy's backoff. ``count`` is ``False`` for a delivery that
    was put back without being tried (to keep a key's order behind a failed message):
    it then does not use up an attempt.
    """

    error: str
    delay: float | None = None
    count: bool = True


class DeadLetter(msgspec.Struct, frozen=True):
    """The message can never be handled (malformed, unknown type, invalid): park it now."""

    reason: str


Outcome = Ack | Retry | DeadLetter
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Outcome]]]


class RedeliveryPolicy(msgspec.Struct, frozen=True):
    """How a consumer group retries: backoff ``min(cap, base * factor**(n-1))``, full jitter.

    After ``max_attempts`` failed deliveries the message goes to dead letters with its
    last error and attempt count.
    """

    max_attempts: int = 5
    backoff_base: float = 0.1
    backoff_factor: float = 2.0
    backoff_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.backoff_factor < 1:
            raise ValueError("backoff_base and backoff_cap must be >= 0 and backoff_factor >= 1")

    def backoff(self, attempt: int, draw: float) -> float:
        """The delay before the next delivery after failed ``attempt``, given ``draw`` in [0, 1)."""
        ceiling = min(self.backoff_cap, self.backoff_base * self.backoff_factor ** (attempt - 1))
        return ceiling * draw


class DeadLetterRecord(msgspec.Struct, frozen=True):
    """A parked message: what it was, where it was going, and why it stopped."""

    id: str
    group: str
    topic: str
    message_id: str
    key: str | None
    body: bytes
    reason: str
    attempts: int
    dead_at: float


class Consumer(Protocol):
    """A running subscription."""

    async def stop(self) -> None:
        """Stop fetching; wait for the batch being handled to be settled, then return."""
        ...

    def abandon(self) -> None:
        """Stop at once without settling, as a crash would (for crash tests).

        What it held must be delivered again: at once or when its lease or ack wait ends.
        """
        ...


class DeadLetterStore(abc.ABC):
    """Where messages go that could not be handled.

    Contract: a record must stay until it is replayed or purged; :meth:`replay` must
    deliver the message again to the same group (with its attempts reset) and remove the
    record in one step, so a crash never loses or duplicates it.
    """

    @abc.abstractmethod
    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        """Dead letters, oldest first, optionally for one group."""

    @abc.abstractmethod
    async def get(self, record_id: str) -> DeadLetterRecord | None:
        """One dead letter by id."""

    @abc.abstractmethod
    async def replay(self, record_id: str) -> bool:
        """Deliver the message again to its group; ``False`` if there is no such record."""

    @abc.abstractmethod
    async def purge(self, record_id: str) -> bool:
        """Delete a dead letter for good; ``False`` if there is no such record."""


class Transport(abc.ABC):
    """Moves encoded messages from outboxes to consumer groups.

    Contract (``atoll.testing.TransportConformance`` checks every point):

    * :meth:`publish` must not return until every message is durably accepted: after it
      returns, a crash of the caller must not lose them. It may be called again with
      messages it already accepted (after a relay crash); it may suppress such duplicates
      by ``message_id``, and consumers must tolerate them either way (the inbox does).
    * A message published to a topic must reach every consumer group subscribed to that
      topic (fan-out), and exactly one consumer of each group at a time (competing
      consumers).
    * Messages with the same key must reach each group in the order they were published,
      and a later one must not be handed out while an earlier one is in flight or waiting
      for redelivery. Messages without a key are unordered. A batch may hold several
      messages of one key, in order; a handler that fails one must return
      ``Retry(count=False)`` for the later ones of that key in the batch.
    * A delivery is settled by the outcome its handler returns: :class:`Ack` removes it,
      :class:`Retry` delivers it again after the policy's backoff (or parks it in dead
      letters once ``max_attempts`` is reached), :class:`DeadLetter` parks it at once. A
      delivery whose consumer dies before settling must be delivered again.
    * Subscriptions are durable: messages published while a group's consumers are down
      must wait for them, once the group has been declared (:meth:`declare`) or has
      subscribed. A message on a service's command topic (``service.<name>``, see
      :func:`command_topic`) must wait for group ``<name>`` even if that group was never
      declared: a command is never dropped for want of a consumer.
    """

    #: ``True`` if several processes can share it (the crash tests need that).
    shared_between_processes: bool = True
    #: The ``messaging.system`` of spans over this transport: the broker's name in
    #: OpenTelemetry's semantic conventions, ``atoll`` for atoll's own transports.
    messaging_system: str = "atoll"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and declare what the transport needs. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every consumer (letting in-flight batches settle), then disconnect."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Durably accept ``messages``, in order."""

    @abc.abstractmethod
    async def declare(self, group: str, topics: Sequence[str]) -> None:
        """Make ``group``'s subscription to ``topics`` durable without consuming. Idempotent.

        Messages published to these topics afterwards wait for the group. ``atoll up``
        declares every service's subscriptions before it starts any service.
        """

    @abc.abstractmethod
    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> Consumer:
        """Start consuming ``topics`` as a member of ``group``.

        ``handler`` receives batches of at most ``max_batch`` deliveries and must return
        one outcome per delivery, in the same order. If it raises, every delivery of the
        batch is retried.
        """

    @property
    @abc.abstractmethod
    def dead_letters(self) -> DeadLetterStore:
        """The dead-letter store of this transport."""


def command_topic(service: str) -> str:
    """The topic that carries commands and replies to ``service``."""
    return f"service.{service}"


def command_group(topic: str) -> str | None:
    """The group a command topic belongs to (``service.X`` -> ``X``), else ``None``."""
    return topic[8:] if topic.startswith("service.") else None


def event_topic(message_type: str) -> str:
    """The topic that carries events of ``message_type``."""
    return f"event.{message_type}"
