"""The server's store: one interface (base.Store), one SQL implementation
(sql.SQLStore) and a dialect per database (sqlite.py, postgresql.py).

    open_store("server.db")                   # SQLite, the embedded default
    open_store("postgresql://sk@db/sk")       # several servers on one database

A third backend is a new dialect: how to connect, begin, lock a team's row,
insert many rows, and notify other processes.
"""

import os

from .base import (GENESIS, UNREADABLE, Batch, Damaged, KeyRecord, Page, Pushed, Store, StoreError,
                   StoreUnavailable, chain_next, redact)
from .schema import EVENT_COLUMNS, SCHEMA_VERSION, STORED_COLUMNS
from .sql import SQLStore

__all__ = ["GENESIS", "UNREADABLE", "Batch", "Damaged", "EVENT_COLUMNS", "KeyRecord", "Page", "Pushed", "SCHEMA_VERSION",
           "STORED_COLUMNS", "SQLStore", "Store", "StoreError", "StoreUnavailable",
           "chain_next", "check_path", "open_store", "redact", "sqlite_store", "postgres_store",
           "is_url"]


def is_url(db):
    return os.fspath(db).startswith(("postgresql://", "postgres://"))


def sqlite_store(path, secret=None):
    from .sqlite import SQLiteDialect
    return SQLStore(SQLiteDialect(path), secret)


def postgres_store(url, secret=None):
    from .postgresql import PostgresDialect
    return SQLStore(PostgresDialect(url), secret)


def open_store(url, create=True):
    """The store for a database URL or path: PostgreSQL for postgresql://, else a
    SQLite file. With create=False a SQLite database that does not exist yet is an
    error, not a new empty one."""
    url = os.fspath(url)
    if is_url(url):
        return postgres_store(url)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1:]
    path = os.path.expanduser(url)
    check_path(path, create)
    return sqlite_store(path)


def check_path(path, create=True):
    """Say what is wrong with a SQLite server database path, before anything is
    made: a directory, a file that is not SQLite, or (create=False) nothing there."""
    if os.path.isdir(path):
        raise StoreError(f"'{path}' is a directory, not a server database file"
                         f" (e.g. '{os.path.join(path, 'server.db')}')")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise StoreError(f"cannot read server database '{path}': {e.strerror or e}") from None
        if head != b"SQLite format 3\x00":
            raise StoreError(f"'{path}' is not a server database (not a SQLite file)")
    elif not create:
        raise StoreError(f"no server database at '{path}' (check --db or SK_SERVER_DB);"
                         f" `sk server --db {path}` or `sk-admin init --db {path}` creates one")
