"""Persistence: a service's own database with its outbox and inbox (the unit-of-work seam)."""

from atoll.persistence._base import Database, OutboxRecord, Row, Session, UnitOfWork
from atoll.persistence._errors import (
    CommitFailedError,
    DatabaseError,
    DatabaseFullError,
    DatabaseLockedError,
    DatabaseUnavailableError,
    IntegrityError,
    TransientDatabaseError,
)
from atoll.persistence._sqlite import SQLiteDatabase
from atoll.persistence._url import database_from_url

__all__ = [
    "CommitFailedError",
    "Database",
    "DatabaseError",
    "DatabaseFullError",
    "DatabaseLockedError",
    "DatabaseUnavailableError",
    "IntegrityError",
    "OutboxRecord",
    "Row",
    "SQLiteDatabase",
    "Session",
    "TransientDatabaseError",
    "UnitOfWork",
    "database_from_url",
]
