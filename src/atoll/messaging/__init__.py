"""Messaging plumbing between the unit of work and the transport."""

from atoll.messaging._relay import OutboxRelay

__all__ = ["OutboxRelay"]
