"""The in-memory transport: one process, no persistence. For tests and single-process runs."""

from atoll.transport.memory._transport import InMemoryTransport

__all__ = ["InMemoryTransport"]
