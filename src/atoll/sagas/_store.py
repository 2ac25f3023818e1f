"""Saga instances and their history in the orchestrating service's own database.

Two tables, in SQL that SQLite and PostgreSQL both accept. Each transition is one
``UPDATE`` of the instance row (guarded by its revision) and one ``INSERT`` into the
history, in the unit of work that handles the reply, deadline or operator action, with
the outbox records of the commands it sends: all of it commits, or none of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from atoll.persistence import Row, Session
from atoll.sagas._errors import SagaError
from atoll.sagas._state import HistoryEntry, SagaState, SagaSummary, StepChange, StepState

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS atoll_sagas (
        saga_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        data TEXT NOT NULL,
        steps TEXT NOT NULL,
        revision INTEGER NOT NULL,
        wake_at DOUBLE PRECISION,
        deadline_at DOUBLE PRECISION,
        correlation_id TEXT,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    (
        "CREATE INDEX IF NOT EXISTS atoll_sagas_wake ON atoll_sagas (wake_at)"
        " WHERE wake_at IS NOT NULL"
    ),
    "CREATE INDEX IF NOT EXISTS atoll_sagas_state ON atoll_sagas (state)",
    """CREATE TABLE IF NOT EXISTS atoll_saga_history (
        saga_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        event TEXT NOT NULL,
        state TEXT NOT NULL,
        changes TEXT NOT NULL,
        detail TEXT,
        PRIMARY KEY (saga_id, seq)
    )""",
]

_COLUMNS = (
    "saga_id, name, version, kind, state, data, steps, revision, wake_at, deadline_at,"
    " correlation_id, error, created_at, updated_at"
)
_steps_encoder = msgspec.json.Encoder()
_steps_decoder = msgspec.json.Decoder(list[StepState])
_changes_decoder = msgspec.json.Decoder(list[list[str]])
_detail_decoder = msgspec.json.Decoder(dict[str, Any])


_STATES = {state.value: state for state in SagaState}


class ConcurrentTransitionError(SagaError):
    """Another unit of work moved the instance first; the input is retried."""


@dataclass(slots=True)
class Instance:
    """A saga or process instance as loaded for one transition."""

    saga_id: str
    name: str
    version: int
    kind: str
    state: SagaState
    data: str
    steps: str
    revision: int
    wake_at: float | None
    deadline_at: float | None
    correlation_id: str | None
    error: str | None
    created_at: float
    updated_at: float
    #: The values of the optional columns as loaded, so an update writes only changes.
    loaded: tuple[Any, ...] = ()

    def changeable(self) -> tuple[Any, ...]:
        """The columns an update may leave alone when they did not change."""
        return (
            self.version,
            str(self.state),
            self.data,
            self.wake_at,
            self.deadline_at,
            self.error,
        )

    @classmethod
    def from_row(cls, row: Row | tuple[Any, ...]) -> Instance:
        """An instance from a row of ``SELECT {_COLUMNS}``."""
        instance = cls(
            row[0],
            row[1],
            int(row[2]),
            row[3],
            _STATES[row[4]],
            row[5],
            row[6],
            int(row[7]),
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13],
        )
        instance.loaded = instance.changeable()
        return instance

    def row(self) -> tuple[Any, ...]:
        """The instance as a row of ``SELECT {_COLUMNS}`` (for :meth:`from_row`)."""
        return (
            self.saga_id,
            self.name,
            self.version,
            self.kind,
            str(self.state),
            self.data,
            self.steps,
            self.revision,
            self.wake_at,
            self.deadline_at,
            self.correlation_id,
            self.error,
            self.created_at,
            self.updated_at,
        )

    def step_states(self) -> list[StepState]:
        """The decoded progress of each step."""
        return _steps_decoder.decode(self.steps)


def encode_steps(steps: Sequence[StepState]) -> str:
    """The stored form of the steps' progress."""
    return _steps_encoder.encode(steps).decode()


async def load(session: Session, saga_id: str, *, for_update: bool) -> Instance | None:
    """The instance, locked against concurrent transitions where the database needs it."""
    sql = f"SELECT {_COLUMNS} FROM atoll_sagas WHERE saga_id = ?"
    if for_update:
        sql += " FOR UPDATE"
    row = await session.fetch_one(sql, saga_id)
    return None if row is None else Instance.from_row(row)


async def exists(session: Session, saga_id: str) -> bool:
    """Whether an instance has this id."""
    return bool(await session.fetch_value("SELECT 1 FROM atoll_sagas WHERE saga_id = ?", saga_id))


async def insert(session: Session, inst: Instance) -> bool:
    """Create the instance row; ``False`` if the id is taken."""
    changed = await session.execute(
        f"INSERT INTO atoll_sagas ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (saga_id) DO NOTHING",
        inst.saga_id,
        inst.name,
        inst.version,
        inst.kind,
        inst.state.value,
        inst.data,
        inst.steps,
        inst.revision,
        inst.wake_at,
        inst.deadline_at,
        inst.correlation_id,
        inst.error,
        inst.created_at,
        inst.updated_at,
    )
    if changed != 1:
        return False
    inst.loaded = inst.changeable()
    return True


_OPTIONAL = ("version", "state", "data", "wake_at", "deadline_at", "error")
_BITS = tuple(1 << bit for bit in range(len(_OPTIONAL)))
_ALL = (1 << len(_OPTIONAL)) - 1
#: UPDATE statements by the set of optional columns they write.
_UPDATES: dict[int, str] = {}


async def update(session: Session, inst: Instance, expected_revision: int) -> None:
    """Write the instance back if nobody else moved it since it was loaded.

    Only columns that changed are set: an indexed column in the SET list costs an index
    update even when its value stays the same, and most transitions change only the
    steps (and the next deadline).
    """
    params: list[Any] = [inst.steps, inst.revision, inst.updated_at]
    now = inst.changeable()
    loaded = inst.loaded
    if loaded:
        mask = 0
        for bit, old, new in zip(_BITS, loaded, now):  # noqa: B905 - both are changeable()
            if old != new:
                mask |= bit
                params.append(new)
    else:
        mask = _ALL
        params.extend(now)
    sql = _UPDATES.get(mask)
    if sql is None:
        names = [name for bit, name in enumerate(_OPTIONAL) if mask & (1 << bit)]
        sets = ", ".join(
            ["steps = ?", "revision = ?", "updated_at = ?"] + [f"{n} = ?" for n in names]
        )
        sql = _UPDATES[mask] = f"UPDATE atoll_sagas SET {sets} WHERE saga_id = ? AND revision = ?"
    changed = await session.execute(sql, *params, inst.saga_id, expected_revision)
    if changed != 1:
        raise ConcurrentTransitionError(
            f"saga {inst.saga_id!r} was changed by another unit of work (revision"
            f" {expected_revision} is gone); the input will be handled again"
        )
    inst.loaded = now  # what the row holds now, for the next transition from this object


_INSERT_HISTORY = (
    "INSERT INTO atoll_saga_history (saga_id, seq, at, event, state, changes, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def add_history(
    session: Session,
    *,
    saga_id: str,
    seq: int,
    at: float,
    event: str,
    state: str,
    changes: Sequence[StepChange],
    detail: dict[str, Any] | None,
) -> Awaitable[None]:
    """Record one transition (the row may wait for the unit of work's commit).

    Returns the session's awaitable, to be awaited by the caller (no coroutine of its own
    in between: this runs at every transition).
    """
    encode = _steps_encoder.encode
    return session.insert_at_commit(
        _INSERT_HISTORY,
        saga_id,
        seq,
        at,
        event,
        str(state),
        encode(changes).decode(),
        encode(detail).decode() if detail else None,
    )


async def history(session: Session, saga_id: str) -> list[HistoryEntry]:
    """Every recorded transition of an instance, oldest first."""
    rows = await session.fetch_all(
        "SELECT seq, at, event, state, changes, detail FROM atoll_saga_history"
        " WHERE saga_id = ? ORDER BY seq",
        saga_id,
    )
    return [
        HistoryEntry(
            seq=int(r[0]),
            at=float(r[1]),
            event=r[2],
            state=r[3],
            changes=_changes_decoder.decode(r[4]),
            detail=_detail_decoder.decode(r[5]) if r[5] else {},
        )
        for r in rows
    ]


async def list_instances(
    session: Session,
    *,
    state: str | None = None,
    name: str | None = None,
    limit: int = 100,
    before: float | None = None,
) -> list[SagaSummary]:
    """Instances, most recently changed first."""
    where: list[str] = []
    params: list[object] = []
    if state is not None:
        where.append("state = ?")
        params.append(state)
    if name is not None:
        where.append("name = ?")
        params.append(name)
    if before is not None:
        where.append("updated_at < ?")
        params.append(before)
    sql = (
        "SELECT saga_id, name, version, kind, state, error, wake_at, created_at, updated_at"
        " FROM atoll_sagas"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated_at DESC, saga_id LIMIT ?"
    rows = await session.fetch_all(sql, *params, limit)
    return [
        SagaSummary(
            saga_id=r[0],
            name=r[1],
            version=int(r[2]),
            kind=r[3],
            state=r[4],
            error=r[5],
            wake_at=r[6],
            created_at=float(r[7]),
            updated_at=float(r[8]),
        )
        for r in rows
    ]


async def due(session: Session, now: float, limit: int) -> list[str]:
    """Ids of instances with a deadline or retry due, earliest first."""
    rows = await session.fetch_all(
        "SELECT saga_id FROM atoll_sagas WHERE wake_at IS NOT NULL AND wake_at <= ?"
        " ORDER BY wake_at LIMIT ?",
        now,
        limit,
    )
    return [r[0] for r in rows]


async def next_wake(session: Session) -> float | None:
    """When the next deadline or retry of any instance is due."""
    value = await session.fetch_value(
        "SELECT min(wake_at) FROM atoll_sagas WHERE wake_at IS NOT NULL"
    )
    return None if value is None else float(value)


async def counts(session: Session) -> dict[tuple[str, str], int]:
    """How many instances each ``(name, state)`` has."""
    rows = await session.fetch_all(
        "SELECT name, state, count(*) FROM atoll_sagas GROUP BY name, state"
    )
    return {(r[0], r[1]): int(r[2]) for r in rows}


async def prune(session: Session, before: float, states: Sequence[str]) -> int:
    """Delete instances in ``states`` last changed before ``before``, with their history."""
    marks = ", ".join("?" for _ in states)
    await session.execute(
        "DELETE FROM atoll_saga_history WHERE saga_id IN (SELECT saga_id FROM atoll_sagas"
        f" WHERE state IN ({marks}) AND updated_at < ?)",
        *states,
        before,
    )
    return await session.execute(
        f"DELETE FROM atoll_sagas WHERE state IN ({marks}) AND updated_at < ?", *states, before
    )
