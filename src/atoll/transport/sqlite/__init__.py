"""The embedded durable transport: a SQLite log that processes on one machine share."""

from atoll.transport.sqlite._transport import SQLiteTransport

__all__ = ["SQLiteTransport"]
