"""atoll's identity adapters for bytes and None: faster binds, the same values stored."""

from __future__ import annotations

import sqlite3

from atoll.persistence._sqlite import register_identity_adapters


def test_bytes_and_none_are_stored_as_blob_and_null():
    assert sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)] is bytes
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a, b, c, d)")
    rows = [(b"\x00\xff", None, b"", "text"), (bytes(16), None, None, 1)]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
    assert conn.execute("SELECT * FROM t").fetchall() == rows
    types = conn.execute("SELECT typeof(a), typeof(b), typeof(c) FROM t").fetchall()
    assert types == [("blob", "null", "blob"), ("blob", "null", "null")]


def test_an_adapter_registered_before_is_kept():
    key = (bytes, sqlite3.PrepareProtocol)
    ours = sqlite3.adapters[key]
    try:
        sqlite3.register_adapter(bytes, bytes.hex)
        register_identity_adapters()
        assert sqlite3.adapters[key] is bytes.hex
        conn = sqlite3.connect(":memory:")
        assert conn.execute("SELECT ?", (b"\x01",)).fetchone() == ("01",)
    finally:
        sqlite3.adapters[key] = ours
