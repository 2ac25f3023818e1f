"""Names of streams, subjects and consumers, and how keys map to partitions."""

from __future__ import annotations

import hashlib
import re
import string
import zlib
from urllib.parse import quote, unquote

_TOKEN_SAFE = re.compile(r"[A-Za-z0-9_-]")
_MAX_TOKEN = 48

# Header values: printable ASCII stays readable (``nats`` CLI users see it), anything
# else, ``%`` itself and edge spaces (nats-py strips them) is percent-encoded.
_HEADER_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")


def token(name: str) -> str:
    """``name`` as one subject token, consumer-name part and key: reversible, no dots.

    Characters outside ``[A-Za-z0-9_-]`` become ``=XX`` (UTF-8, hex); very long names
    are shortened with a hash so that consumer names stay short.
    """
    escaped = "".join(
        c if _TOKEN_SAFE.match(c) else "".join(f"={b:02X}" for b in c.encode()) for c in name
    )
    if not escaped:
        return "=00"
    if len(escaped) > _MAX_TOKEN:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        escaped = f"{escaped[: _MAX_TOKEN - 17]}~{digest}"
    return escaped


def header_value(value: str) -> str:
    """``value`` encoded for a NATS header (no line breaks, edge spaces kept)."""
    encoded = quote(value, safe=_HEADER_SAFE)
    if encoded[:1] == " ":
        encoded = "%20" + encoded[1:]
    if encoded[-1:] == " ":
        encoded = encoded[:-1] + "%20"
    return encoded


def from_header(value: str) -> str:
    """The inverse of :func:`header_value` (tolerant of values other systems wrote)."""
    return unquote(value) if "%" in value else value


def partition_of(key: str | None, message_id: str, partitions: int) -> int:
    """The partition of a message: by key (so a key's messages stay in order), else by id."""
    return zlib.crc32((message_id if key is None else key).encode()) % partitions


class Names:
    """Every stream, subject and consumer name of one namespace.

    * ``ATOLL_<ns>`` (work queue) holds messages on ``atoll.<ns>.g.<group>.<partition>``;
      each group has one durable pull consumer per partition, ``<group>_<partition>``.
    * ``ATOLL_<ns>_DLQ`` holds dead letters on ``atoll.<ns>.dlq.<group>``.
    * ``ATOLL_<ns>_META`` holds subscriptions (``atoll.<ns>.meta.sub.<topic>``, the
      groups of a topic), the namespace's settings (``atoll.<ns>.meta.config``) and
      handoff notes (``atoll.<ns>.meta.h.<group>.<partition>``).
    * ``ATOLL_<ns>_COORD`` holds members and partition leases,
      ``atoll.<ns>.c.<group>.m.<member>`` and ``atoll.<ns>.c.<group>.l.<partition>``;
      its ``max_age`` is the lease time, so a lease nobody renews disappears.
    * ``atoll.<ns>.hint.<group>`` (no stream) wakes a group's members to rebalance.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"atoll.{namespace}"
        self.stream = f"ATOLL_{namespace}"
        self.dlq_stream = f"ATOLL_{namespace}_DLQ"
        self.meta_stream = f"ATOLL_{namespace}_META"
        self.coord_stream = f"ATOLL_{namespace}_COORD"
        self.messages_filter = f"{self.prefix}.g.*.*"
        self.dlq_filter = f"{self.prefix}.dlq.*"
        self.config_subject = f"{self.prefix}.meta.config"

    def streams(self) -> list[str]:
        """Every stream of the namespace."""
        return [self.stream, self.dlq_stream, self.meta_stream, self.coord_stream]

    def subject(self, group_token: str, partition: int) -> str:
        """Where messages for a group's partition are published."""
        return f"{self.prefix}.g.{group_token}.{partition}"

    @staticmethod
    def consumer(group_token: str, partition: int) -> str:
        """The durable consumer of a group's partition."""
        return f"{group_token}_{partition}"

    def dlq_subject(self, group_token: str) -> str:
        """Where a group's dead letters go."""
        return f"{self.prefix}.dlq.{group_token}"

    def subscription_subject(self, topic: str) -> str:
        """Where the groups subscribed to ``topic`` are recorded."""
        return f"{self.prefix}.meta.sub.{token(topic)}"

    def handoff_subject(self, group_token: str, partition: int) -> str:
        """What the last owner of a partition left for the next: attempts not to count."""
        return f"{self.prefix}.meta.h.{group_token}.{partition}"

    def coord_filter(self, group_token: str) -> str:
        """Every member and lease of a group."""
        return f"{self.prefix}.c.{group_token}.>"

    def member_subject(self, group_token: str, member: str) -> str:
        """A member's heartbeat."""
        return f"{self.prefix}.c.{group_token}.m.{member}"

    def lease_subject(self, group_token: str, partition: int) -> str:
        """A partition's lease."""
        return f"{self.prefix}.c.{group_token}.l.{partition}"

    def hint_subject(self, group_token: str) -> str:
        """Wakes a group's members to look at memberships and leases again."""
        return f"{self.prefix}.hint.{group_token}"
