"""Choosing a database backend by URL."""

from __future__ import annotations

import importlib
from pathlib import Path
from urllib.parse import urlsplit

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option
from atoll.determinism import Clock
from atoll.persistence._base import Database
from atoll.persistence._sqlite import SQLiteDatabase, Synchronous


def sqlite_path(url: str, base_dir: Path) -> Path:
    """The file of ``sqlite:///relative`` (under ``base_dir``) or ``sqlite:////absolute``."""
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if not rest.startswith("/") or rest == "/":
        raise URLError(f"{url}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db")
    rest = rest[1:]
    path = Path(rest)
    return path if path.is_absolute() else base_dir / path


def _synchronous(value: str) -> Synchronous:
    upper = value.upper()
    if upper not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(value)
    return upper  # type: ignore[return-value]


def database_from_url(
    url: str, *, base_dir: Path, clock: Clock | None = None, synchronous: str = "FULL"
) -> Database:
    """A :class:`Database` for ``url``.

    ``sqlite:///orders.db?synchronous=NORMAL`` is the embedded default;
    ``postgresql://user@host/db`` needs the ``atoll[postgres]`` extra.
    """
    scheme = urlsplit(url).scheme
    options = query_options(url)
    if scheme == "sqlite":
        sync = take_option(options, "synchronous", _synchronous, _synchronous(synchronous), url)
        lock_timeout = take_option(options, "lock_timeout", float, 10.0, url)
        reject_unknown(options, url)
        return SQLiteDatabase(
            sqlite_path(url, base_dir), synchronous=sync, lock_timeout=lock_timeout, clock=clock
        )
    if scheme in ("postgresql", "postgres"):
        try:
            module = importlib.import_module("atoll.persistence.postgres")
        except ImportError as exc:
            raise URLError(
                f"{redact(url)}: PostgreSQL support is not available ({exc});"
                " install atoll[postgres]"
            ) from None
        database: Database = module.PostgresDatabase.from_url(url, clock=clock)
        return database
    raise URLError(f"{redact(url)}: no database backend for scheme {scheme!r}")
