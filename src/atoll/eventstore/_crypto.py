"""Crypto-shredding: personal fields encrypted with one key per data subject.

Forgetting a subject deletes its key. Its personal fields then read as erased in every
event, snapshot and rebuilt projection, while the rest of each event stays readable,
and the erasure is recorded in an audit log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec

from atoll.eventstore._base import EventStore, Transaction
from atoll.eventstore._errors import KeyStoreError
from atoll.persistence import Session

_KEY_BYTES = 32
_NONCE_BYTES = 12


class _PersonalMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "Personal"


#: Marks a field as personal data: ``email: Annotated[str, Personal]``. The class names
#: the field that identifies the data subject with ``data_subject: ClassVar[str]``.
Personal: Final = _PersonalMarker()


class Erasure(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the erasure audit log."""

    subject: str
    erased_at: float
    reason: str
    requested_by: str
    key_existed: bool


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the eventsourcing extra is missing
        raise KeyStoreError(
            "personal data needs the `cryptography` package: install atoll[eventsourcing]"
        ) from exc
    return AESGCM(key)


def encrypt(key: bytes, plaintext: bytes, aad: bytes, entropy: Callable[[int], bytes]) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext+tag``; ``aad`` binds it to its place."""
    nonce = entropy(_NONCE_BYTES)
    ciphertext: bytes = _aesgcm(key).encrypt(nonce, plaintext, aad)
    return nonce + ciphertext


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The inverse of :func:`encrypt`; raises ``InvalidTag`` if tampered with or misplaced."""
    plaintext: bytes = _aesgcm(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    return plaintext


class SubjectKeys:
    """The data keys of data subjects, in the store's own database.

    A key is created the first time personal data of its subject is written, inside
    the writing transaction. :meth:`forget` overwrites and deletes it and records the
    erasure; from then on that subject's personal fields cannot be decrypted anywhere.

    With ``master_key`` (32 bytes, kept outside the database, e.g. in a secret store)
    the subject keys are themselves stored encrypted, so a copy of the database alone
    reveals no personal data.

    Keys and nonces come from ``entropy`` (``os.urandom``) on purpose, not from
    :class:`~atoll.determinism.RandomSource`: a seeded source would repeat nonces.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        master_key: bytes | None = None,
        entropy: Callable[[int], bytes] = os.urandom,  # determinism: allowed (crypto keys)
    ) -> None:
        if master_key is not None and len(master_key) != _KEY_BYTES:
            raise ValueError("master_key must be 32 bytes (AES-256)")
        self.store = store
        self._master = master_key
        self.entropy = entropy

    def __repr__(self) -> str:
        return f"SubjectKeys({self.store!r})"

    def _wrap(self, subject: str, key: bytes) -> bytes:
        if self._master is None:
            return key
        return encrypt(self._master, key, subject.encode(), self.entropy)

    def _unwrap(self, subject: str, stored: bytes) -> bytes:
        if self._master is None:
            return stored
        try:
            return decrypt(self._master, stored, subject.encode())
        except Exception as exc:
            raise KeyStoreError(
                f"the key of data subject {subject!r} cannot be unwrapped: wrong master key?"
            ) from exc

    async def key_for(self, subject: str, tx: Transaction) -> tuple[str, bytes]:
        """The subject's ``(key id, key)``, created in ``tx`` if it has none.

        The key id travels with each ciphertext: data sealed under a key that was
        forgotten stays erased even after the subject gets a new key.
        """
        t = self.store.table("subject_keys")
        stored = await tx.fetch_one(f"SELECT key_id, key FROM {t} WHERE subject = ?", subject)
        if stored is None:
            await tx.execute(
                f"INSERT INTO {t} (subject, key_id, key, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (subject) DO NOTHING",
                subject,
                self.entropy(8).hex(),
                self._wrap(subject, self.entropy(_KEY_BYTES)),
                self.store.clock.time(),
            )
            stored = await tx.fetch_one(f"SELECT key_id, key FROM {t} WHERE subject = ?", subject)
            assert stored is not None
        return stored[0], self._unwrap(subject, bytes(stored[1]))

    async def keys_for(
        self, subjects: Iterable[str], session: Session | Transaction | None = None
    ) -> dict[str, tuple[str, bytes]]:
        """``(key id, key)`` of those ``subjects`` that still have a key."""
        wanted = sorted(set(subjects))
        if not wanted:
            return {}
        t = self.store.table("subject_keys")
        found: dict[str, tuple[str, bytes]] = {}
        async with self.store._reading(session) as r:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = await r.fetch_all(
                    f"SELECT subject, key_id, key FROM {t} WHERE subject IN ({marks})", *chunk
                )
                found.update(
                    {row[0]: (row[1], self._unwrap(row[0], bytes(row[2]))) for row in rows}
                )
        return found

    async def forget(
        self,
        subject: str,
        *,
        reason: str,
        requested_by: str,
        tx: Transaction | None = None,
    ) -> Erasure:
        """Erase the subject's personal data everywhere by deleting its key; audit it.

        The key is overwritten before it is deleted, so that the database file keeps no
        copy in free space (backups and replicas keep theirs: see docs/eventstore.md).
        """
        t = self.store.table("subject_keys")
        now = self.store.clock.time()
        async with self.store._writing(tx) as w:
            stored = await w.fetch_value(f"SELECT key FROM {t} WHERE subject = ?", subject)
            if stored is not None:
                await w.execute(
                    f"UPDATE {t} SET key = ? WHERE subject = ?", bytes(len(stored)), subject
                )
                await w.execute(f"DELETE FROM {t} WHERE subject = ?", subject)
            await w.execute(
                f"INSERT INTO {self.store.table('erasures')}"
                " (subject, erased_at, reason, requested_by, key_existed) VALUES (?, ?, ?, ?, ?)",
                subject,
                now,
                reason,
                requested_by,
                stored is not None,
            )
        return Erasure(
            subject=subject,
            erased_at=now,
            reason=reason,
            requested_by=requested_by,
            key_existed=stored is not None,
        )

    async def erasures(self, subject: str | None = None) -> list[Erasure]:
        """The erasure audit log, oldest first (optionally for one subject)."""
        sql = (
            "SELECT subject, erased_at, reason, requested_by, key_existed"
            f" FROM {self.store.table('erasures')}"
        )
        params: list[Any] = []
        if subject is not None:
            sql += " WHERE subject = ?"
            params.append(subject)
        async with self.store.read_session() as r:
            rows = await r.fetch_all(sql + " ORDER BY erased_at", *params)
        return [
            Erasure(
                subject=row[0],
                erased_at=float(row[1]),
                reason=row[2],
                requested_by=row[3],
                key_existed=bool(row[4]),
            )
            for row in rows
        ]
