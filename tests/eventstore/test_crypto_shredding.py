"""Crypto-shredding: personal fields unreadable after forget(), the rest intact, audited."""

from __future__ import annotations

import os
import sqlite3
from typing import Annotated

import msgspec
import pytest
from domain import Customer, CustomerMoved, CustomerRegistered, Directory

from atoll.determinism import RandomSource
from atoll.eventstore import (
    CorruptEventError,
    EventCodec,
    EventLog,
    KeyStoreError,
    Personal,
    ProjectionRunner,
    Repository,
    SQLiteEventStore,
    SubjectKeys,
)
from atoll.messages import Event
from atoll.testing._eventstore_kit import settle

ANN_EMAIL, ANN_NAME, ANN_STREET = b"ann@example.com", b"Ann Lee", b"1 Canal Street"


async def populate(store, keys):
    codec = EventCodec(keys=keys)
    repo = Repository(Customer, store, codec=codec, random=RandomSource(1))
    for cid, email, name, street in [
        ("ann", ANN_EMAIL.decode(), ANN_NAME.decode(), ANN_STREET.decode()),
        ("bob", "bob@example.com", "Bob Ng", "2 Dock Road"),
    ]:
        customer = repo.create(cid)
        customer.register(email, name, "NL")
        customer.move(street, "BE")  # the second event: a snapshot (snapshot_every = 2)
        await repo.save(customer)
    return codec, repo


async def directory(store):
    async with store.read_session() as session:
        rows = await session.fetch_all(
            "SELECT customer_id, email, country FROM directory ORDER BY customer_id"
        )
    return [tuple(row) for row in rows]


async def test_forget_erases_personal_fields_in_events_snapshots_and_rebuilt_projections(
    any_store,
):
    keys = SubjectKeys(any_store)
    codec, repo = await populate(any_store, keys)
    await settle(any_store)
    runner = ProjectionRunner(Directory(), any_store, codec=codec)
    assert await runner.run_until_caught_up() == 4
    assert await directory(any_store) == [
        ("ann", "ann@example.com", "BE"),
        ("bob", "bob@example.com", "BE"),
    ]
    # At rest, personal data is ciphertext: in events and in snapshots.
    for raw in await any_store.read_all():
        for secret in (ANN_EMAIL, ANN_NAME, ANN_STREET, b"bob@example.com"):
            assert secret not in raw.data
    snapshot = await any_store.load_snapshot("customer-ann")
    assert snapshot is not None
    assert ANN_EMAIL not in snapshot.data
    assert ANN_STREET not in snapshot.data
    log = EventLog(any_store, codec)
    before = await log.read_stream("customer-ann")
    assert before[0].event.email == "ann@example.com"  # type: ignore[union-attr]

    erasure = await keys.forget("ann", reason="erasure request #12", requested_by="dpo")
    assert erasure.key_existed

    # Events: the personal fields read as erased; everything else is intact.
    after = await log.read_stream("customer-ann")
    assert after[0].event == CustomerRegistered(
        customer_id="ann", email="", name="", phone=None, country="NL"
    )
    assert after[0].erased == frozenset({"email", "name", "phone"})
    assert after[1].event == CustomerMoved(customer_id="ann", address="", country="BE")
    assert after[1].erased == frozenset({"address"})
    assert [r.event_id for r in after] == [r.event_id for r in before]
    bob = await log.read_stream("customer-bob")
    assert bob[0].event.email == "bob@example.com"  # type: ignore[union-attr]
    assert bob[0].erased == frozenset()

    # Snapshots: the aggregate loads, without its personal state.
    ann = await repo.load("ann")
    assert (ann.email, ann.address, ann.country, ann.moves, ann.version) == ("", "", "BE", 1, 1)
    assert (await repo.load("bob")).email == "bob@example.com"

    # Rebuilt projections: no personal data of ann comes back.
    assert await runner.rebuild() == 4
    assert await directory(any_store) == [("ann", "", "BE"), ("bob", "bob@example.com", "BE")]

    # The audit log records each erasure (a repeat finds no key).
    await keys.forget("ann", reason="repeat", requested_by="dpo")
    audit = await keys.erasures()
    assert [(e.subject, e.reason, e.requested_by, e.key_existed) for e in audit] == [
        ("ann", "erasure request #12", "dpo", True),
        ("ann", "repeat", "dpo", False),
    ]
    assert await keys.erasures("bob") == []

    # New data about the subject gets a new key; the old data stays erased.
    customer = repo.create("ann")
    customer.version = ann.version
    customer.move("3 New Road", "FR")
    await repo.save(customer)
    records = await log.read_stream("customer-ann")
    assert [r.erased for r in records] == [
        frozenset({"email", "name", "phone"}),
        frozenset({"address"}),
        frozenset(),
    ]
    assert records[2].event.address == "3 New Road"  # type: ignore[union-attr]


async def test_the_deleted_key_leaves_no_copy_in_the_database_file(tmp_path):
    path = tmp_path / "crm.db"
    async with SQLiteEventStore.from_path(path) as store:
        keys = SubjectKeys(store)
        await populate(store, keys)
        _, key = (await keys.keys_for({"ann"}))["ann"]

        def file_bytes() -> bytes:
            conn = sqlite3.connect(path)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            return path.read_bytes() + (tmp_path / "crm.db-wal").read_bytes()

        assert key in file_bytes()  # the check below can fail
        await keys.forget("ann", reason="test", requested_by="test")
        assert key not in file_bytes()


async def test_a_master_key_wraps_the_subject_keys(any_store):
    master = os.urandom(32)
    keys = SubjectKeys(any_store, master_key=master)
    await populate(any_store, keys)
    _, key = (await keys.keys_for({"ann"}))["ann"]
    async with any_store.read_session() as session:
        stored = await session.fetch_value(
            f"SELECT key FROM {any_store.table('subject_keys')} WHERE subject = ?", "ann"
        )
    assert bytes(stored) != key
    assert key not in bytes(stored)
    wrong = EventLog(any_store, EventCodec(keys=SubjectKeys(any_store, master_key=os.urandom(32))))
    wrong.register(CustomerRegistered, CustomerMoved)
    with pytest.raises(KeyStoreError, match="wrong master key"):
        await wrong.read_stream("customer-ann")
    with pytest.raises(KeyStoreError, match="no SubjectKeys"):
        await EventLog(any_store, EventCodec()).read_stream("customer-ann")


async def test_tampered_or_moved_ciphertext_is_refused(any_store):
    keys = SubjectKeys(any_store)
    codec, _ = await populate(any_store, keys)
    ann, bob = (
        await any_store.read_stream("customer-ann"),
        await any_store.read_stream("customer-bob"),
    )
    ann_data = msgspec.json.decode(ann[0].data)
    bob_data = msgspec.json.decode(bob[0].data)
    # Ann's sealed fields pasted into Bob's event, claiming Bob's key: refused.
    bob_data["_personal"] = {**ann_data["_personal"], "s": "bob", "k": bob_data["_personal"]["k"]}
    async with any_store.transaction() as tx:
        await tx.execute(
            f"UPDATE {any_store.table('events')} SET data = ? WHERE stream_id = ? AND version = 0",
            msgspec.json.encode(bob_data),
            "customer-bob",
        )
    with pytest.raises(CorruptEventError, match=r"'customer-bob' v0.*failed authentication"):
        await EventLog(any_store, codec).read_stream("customer-bob")


def test_personal_fields_need_a_data_subject():
    class Leaky(Event):
        email: Annotated[str, Personal]

    with pytest.raises(TypeError, match="no data_subject"):
        EventCodec().register(Leaky)

    class Unerasable(Event):
        data_subject = "who"
        who: str
        blob: Annotated[tuple[int, int], Personal]

    with pytest.raises(TypeError, match="must have a default, allow None"):
        EventCodec().register(Unerasable)
