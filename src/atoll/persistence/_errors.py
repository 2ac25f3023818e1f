"""Errors from a service's database, the same for every backend."""

from __future__ import annotations

from atoll._errors import AtollError


class DatabaseError(AtollError):
    """A database operation failed."""


class TransientDatabaseError(DatabaseError):
    """The operation may succeed if tried again: locked, busy, full, or disconnected.

    The effect was rolled back completely; the caller must retry the whole unit of work.
    """


class DatabaseLockedError(TransientDatabaseError):
    """Another writer held the database for longer than the lock timeout."""


class DatabaseFullError(TransientDatabaseError):
    """The disk or the database reached its size limit."""


class DatabaseUnavailableError(TransientDatabaseError):
    """The database server cannot be reached."""


class IntegrityError(DatabaseError):
    """A constraint was violated (unique key, foreign key, check)."""


class CommitFailedError(TransientDatabaseError):
    """The transaction that held this unit of work failed to commit; nothing was kept."""
