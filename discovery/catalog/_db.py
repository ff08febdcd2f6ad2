"""SQLite underneath the catalog: one generic table of rows, written in WAL mode.

Every piece of state is a row ``(tbl, k, doc, blob)``: the table's name, the row's key
(text), a JSON document and an optional binary payload (KV values, so they are not
base64-inflated). The global index lives in row ``('meta', 'index')``.

Ownership: a :class:`Database` belongs to one thread (the store's writer thread); every
method is blocking and must be called from that thread. ``write`` is atomic and durable
when it returns (``synchronous=FULL``: the WAL is fsynced at every commit).

Errors: ``sqlite3.Error`` escapes from every method; ``write`` rolls back before raising.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable, Iterator

__all__ = ["Database", "Row"]

Row = tuple[str, str, str, "bytes | None"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    tbl  TEXT NOT NULL,
    k    TEXT NOT NULL,
    doc  TEXT NOT NULL,
    blob BLOB,
    PRIMARY KEY (tbl, k)
) WITHOUT ROWID;
"""


class Database:
    """A catalog's SQLite file under ``data_dir`` (``catalog.db``)."""

    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "catalog.db")
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit returns only once the WAL is on disk, so an acknowledged write
        # survives a crash or power loss (NORMAL would only survive a process crash).
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(_SCHEMA)
        # Named indexes were stored up to 2026-12; they are memory-only now (see _store).
        self.conn.execute("DELETE FROM rows WHERE tbl = 'indexes'")

    def load(self) -> Iterator[Row]:
        """Every row, in key order per table."""
        yield from self.conn.execute("SELECT tbl, k, doc, blob FROM rows ORDER BY tbl, k")

    def write(self, upserts: Iterable[Row], deletes: Iterable[tuple[str, str]], index: int) -> None:
        """Apply one batch in one transaction and make it durable."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO rows (tbl, k, doc, blob) VALUES (?, ?, ?, ?)", upserts)
            conn.executemany("DELETE FROM rows WHERE tbl = ? AND k = ?", deletes)
            conn.execute(
                "INSERT OR REPLACE INTO rows (tbl, k, doc, blob) VALUES ('meta', 'index', ?, NULL)", (str(index),)
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()
