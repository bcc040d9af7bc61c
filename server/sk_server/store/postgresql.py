"""The PostgreSQL dialect, for a team that runs several `sk server` processes (on
one or more hosts) on one database.

Nothing lives in process memory but the connection pool. Each team's sequence is
dense and in commit order: a push locks the team's row (SELECT ... FOR UPDATE)
before it numbers its events and keeps the lock until it commits, so a pull that
has read event n has seen every event before n; a pull reads from one
REPEATABLE READ snapshot. A push ends with NOTIFY sk_events, so every server
wakes its WebSocket sessions at once (listen()).

The pool and the listening thread are made lazily in each process, so a store
built before gunicorn forks its workers shares no connection with them.
"""

import contextlib
import functools
import os
import threading
import time

from .base import StoreError, StoreUnavailable, redact
from .schema import EVENT_COLUMNS, SCHEMA_VERSION

CHANNEL = "sk_events"
SCHEMA_LOCK = 0x736b   # advisory lock: servers starting at once create the schema once
POOL_SIZE = int(os.environ.get("SK_PG_POOL", "16"))


def _psycopg():
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as e:
        raise StoreError(f"PostgreSQL needs psycopg 3 and psycopg_pool: {e}") from None
    return psycopg


@functools.lru_cache(maxsize=256)
def _sql(text):
    return text.replace("?", "%s")


class _Conn:
    """A psycopg connection that takes the store's ? placeholders."""

    __slots__ = ("c",)

    def __init__(self, conn):
        self.c = conn

    def execute(self, sql, args=()):
        return self.c.execute(_sql(sql), args)


class PostgresDialect:
    words = {"blob": "BYTEA", "bigint": "BIGINT", "without_rowid": ""}
    for_update = " FOR UPDATE"

    def __init__(self, url):
        self.psycopg = _psycopg()
        from psycopg_pool import PoolTimeout
        self.pool_timeout = PoolTimeout
        self.data_error = self.psycopg.DataError
        self.integrity_error = (self.psycopg.IntegrityError,)
        self.url = self.location = url
        self._lock = threading.Lock()
        self._pid = self._pool = None
        self._listeners = []

    # -- connections and transactions --------------------------------------------
    def _connection(self):
        """A pooled connection (autocommit; transactions are explicit)."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    from psycopg_pool import ConnectionPool
                    new = ConnectionPool(
                        self.url, min_size=1, max_size=POOL_SIZE, open=False, timeout=10,
                        kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                        name="sk")
                    try:   # a database that is down fails this request soon (503)
                        new.open(wait=True, timeout=5)
                    except Exception:
                        new.close(timeout=0)
                        raise
                    self._pool = new
                    if self._pid != os.getpid():   # a new process: listen in it too
                        for callback in self._listeners:
                            self._start_listener(callback)
                    self._pid = os.getpid()
                pool = self._pool
        return pool.connection()

    @contextlib.contextmanager
    def _tx(self, isolation=None, schema=False, quick=False):
        try:
            if schema:   # before the pool: one connection of its own, the schema lock
                cm = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            elif quick:
                cm = self._quick()
            else:
                cm = self._connection()
            with cm as conn, conn.transaction():
                if isolation:
                    conn.execute(isolation)
                if schema:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                yield _Conn(conn)
        except self.psycopg.OperationalError as e:
            what = "cannot open" if schema else "unavailable:"
            raise StoreUnavailable(f"{what} PostgreSQL database '{redact(self.url)}':"
                                   f" {str(e).strip().splitlines()[0]}") from None
        except self.pool_timeout:
            raise StoreUnavailable(f"unavailable: PostgreSQL database '{redact(self.url)}': no"
                                   " connection free in time") from None

    def _quick(self):
        """A connection within 2 s: the pool's, when this process has one (a database
        at its connection limit still serves it), else one of its own (libpq's
        shortest connect timeout; a refused connection fails at once)."""
        if self._pool is not None and self._pid == os.getpid():
            return self._pool.connection(timeout=2)
        return self.psycopg.connect(self.url, autocommit=True, connect_timeout=2)

    def probe(self):
        """A transaction within 2 s or StoreUnavailable, not after the pool's 10 s wait."""
        return self._tx(quick=True)

    def write(self, schema=False):
        return self._tx(schema=schema)

    def read(self, snapshot=False):
        return self._tx("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                        if snapshot else None)

    @staticmethod
    def unreadable(e):
        return False   # a PostgreSQL column keeps its type (what else fails: base.UNREADABLE)

    @staticmethod
    def iter_rows(db, sql, args):
        """The rows of a query, fetched a hundred at a time (a server-side cursor),
        so a page of large events reads only what it sends."""
        cur = db.c.cursor(name="sk_page")
        cur.itersize = 100
        cur.execute(_sql(sql), args)
        return cur

    @staticmethod
    def octets(column):
        """SQL for the bytes (not characters) of a text column."""
        return f"octet_length({column})"

    @staticmethod
    def many(db, sql, rows):
        with db.c.cursor() as cur:
            cur.executemany(_sql(sql), rows)

    @staticmethod
    def insert_many(db, table, cols, rows):
        with db.c.cursor().copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    @staticmethod
    def events_by_id(db, team, ids):
        if not ids:
            return []
        return db.execute("SELECT " + ", ".join(EVENT_COLUMNS) + " FROM events WHERE team = ?"
                          " AND event_id = ANY(?)", (team, ids)).fetchall()

    def notify(self, db, team):
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, team))

    def listen(self, callback):
        with self._lock:
            self._listeners.append(callback)
            if self._pid == os.getpid():
                self._start_listener(callback)
        return True

    def _start_listener(self, callback):
        threading.Thread(target=self._listen, args=(callback,), name="sk-listen",
                         daemon=True).start()

    def _listen(self, callback):
        """LISTEN on a connection of its own; reconnect after a failure."""
        psycopg = self.psycopg
        while True:
            try:
                # keepalives: a connection that died half-open is noticed and remade
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10, keepalives=1,
                                     keepalives_idle=30, keepalives_interval=10,
                                     keepalives_count=3) as conn:
                    conn.execute("LISTEN " + CHANNEL)
                    callback(None)   # anything missed while not listening: look now
                    for note in conn.notifies():
                        callback(note.payload)
            except psycopg.Error:
                time.sleep(1)

    # -- schema and upkeep -------------------------------------------------------
    def create_schema(self, db, statements, upgrade):
        if self.columns(db, "events"):
            upgrade()
        for stmt in statements:
            db.execute(stmt)
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if version and int(version[0]) > SCHEMA_VERSION:
            raise StoreError(f"PostgreSQL database has schema {version[0]}, newer than this"
                             f" sk server ({SCHEMA_VERSION}): upgrade sk")
        db.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT (key) DO UPDATE"
                   " SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))

    @staticmethod
    def columns(db, table):
        return {r[0] for r in db.execute("SELECT column_name FROM information_schema.columns"
                                         " WHERE table_name = ? AND table_schema = current_schema()",
                                         (table,))}

    def scrub(self):
        """PostgreSQL keeps deleted rows until VACUUM: run `VACUUM FULL legacy, events`
        once a team's legacy events are sealed (sk-admin status shows how many are left)."""

    def backup(self, path):
        raise StoreError("sk-admin backup copies a SQLite server; for PostgreSQL use pg_dump"
                         " (see the README, 'Scaling out')")

    def same(self, other):
        return isinstance(other, PostgresDialect) and other.url == self.url

    def reset(self):
        """The database went away: drop the pool (its connections are dead, and it
        backs off before reconnecting), so the next request connects afresh."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            threading.Thread(target=pool.close, kwargs={"timeout": 1}, daemon=True).start()

    def close(self):
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None
