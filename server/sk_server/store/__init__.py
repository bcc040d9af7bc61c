"""The server's store: one interface (base.Store), one SQL implementation
(sql.SQLStore) and a dialect per database (sqlite.py, postgresql.py).

    open_store("server.db")                   # SQLite, the embedded default
    open_store("postgresql://sk@db/sk")       # several servers on one database

A third backend is a new dialect: how to connect, begin, lock a team's row,
insert many rows, and notify other processes.
"""

import os

from .base import (GENESIS, Batch, KeyRecord, Page, Pushed, Store, StoreError,
                   StoreUnavailable, chain_next, redact)
from .schema import EVENT_COLUMNS, SCHEMA_VERSION, STORED_COLUMNS
from .sql import SQLStore

__all__ = ["GENESIS", "Batch", "EVENT_COLUMNS", "KeyRecord", "Page", "Pushed", "SCHEMA_VERSION",
           "STORED_COLUMNS", "SQLStore", "Store", "StoreError", "StoreUnavailable",
           "chain_next", "open_store", "redact", "sqlite_store", "postgres_store", "is_url"]


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
    if not create and not os.path.exists(path):
        raise StoreError(f"no server database at '{path}' (check --db or SK_SERVER_DB)")
    return sqlite_store(path)
