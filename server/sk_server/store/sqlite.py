"""The embedded dialect: one SQLite file in WAL mode, one connection per thread.
Writers take BEGIN IMMEDIATE, so SQLite serialises them, which makes each team's
sequence order its commit order."""

import contextlib
import os
import sqlite3
import threading
import urllib.parse

from .base import GENESIS, StoreError, chain_next
from .schema import EVENT_COLUMNS
from .schema import SCHEMA_VERSION


class SQLiteDialect:
    words = {"blob": "BLOB", "bigint": "INTEGER", "without_rowid": " WITHOUT ROWID"}
    for_update = ""          # BEGIN IMMEDIATE holds the database's write lock already
    data_error = ()          # SQLite stores any text
    integrity_error = (sqlite3.IntegrityError,)

    def __init__(self, path):
        self.path = self.location = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise StoreError(f"directory '{parent}' for the server database does not exist")
        if not os.path.exists(self.path):  # key material lives here: private from the start
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._local = threading.local()

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                # mode=rw: a file moved or deleted under a running server is an error,
                # not a new empty database (the file is made once, private, above)
                db = sqlite3.connect(f"file://{urllib.parse.quote(self.path)}?mode=rw",
                                     uri=True, timeout=60, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA busy_timeout=60000")
                db.execute("PRAGMA secure_delete=ON")   # what is deleted is overwritten
            except sqlite3.Error as e:
                raise StoreError(f"cannot open server database '{self.path}': {e}") from None
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _tx(self, begin):
        db = self._db()
        try:
            db.execute(begin)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"'{self.path}' is not an sk server database: {e}") from None
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def write(self, schema=False):
        return self._tx("BEGIN IMMEDIATE")

    def read(self, snapshot=False):
        return self._tx("BEGIN")

    def probe(self):
        return self.read()   # a file: it answers at once or not at all

    @staticmethod
    def unreadable(e):
        """Whether `e` is SQLite failing to read a cell as its column's type (text
        that is not UTF-8 where bytes were kept: altered at rest)."""
        return isinstance(e, sqlite3.OperationalError) and str(e).startswith("Could not decode")

    @staticmethod
    def iter_rows(db, sql, args):
        """The rows of a query, read one at a time as they are taken."""
        return db.execute(sql, args)

    @staticmethod
    def octets(column):
        """SQL for the bytes (not characters) of a text column."""
        return f"length(CAST({column} AS BLOB))"

    @staticmethod
    def many(db, sql, rows):
        db.executemany(sql, rows)

    @staticmethod
    def insert_many(db, table, cols, rows):
        db.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES"
                       f" ({','.join('?' * len(cols))})", rows)

    @staticmethod
    def events_by_id(db, team, ids):
        """The stored events (EVENT_COLUMNS) among `ids` of a team. INDEXED BY: left
        to itself the planner walks the whole team by primary key, and every push
        gets slower as the log grows (quadratic in all)."""
        out = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out += db.execute("SELECT " + ", ".join(EVENT_COLUMNS) + " FROM events INDEXED BY"
                              " events_id WHERE team = ? AND event_id IN ("
                              + ",".join("?" * len(chunk)) + ")", [team, *chunk]).fetchall()
        return out

    def notify(self, db, team):
        pass   # one process's sessions are woken by the Hub; others look every second

    def listen(self, callback):
        return False

    def create_schema(self, db, statements, upgrade):
        version = None
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        elif db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone():
            raise StoreError(f"'{self.path}' is a SQLite database, but not an sk server's")
        if version and int(version[0]) > SCHEMA_VERSION:
            raise StoreError(f"server database '{self.path}' has schema {version[0]}, newer"
                             f" than this sk server ({SCHEMA_VERSION}): upgrade sk")
        if version and int(version[0]) == 1:   # sk 0.2.0: no hash chain yet
            db.execute("ALTER TABLE teams ADD COLUMN chain BLOB NOT NULL DEFAULT x''")
            db.execute("ALTER TABLE events ADD COLUMN chain BLOB NOT NULL DEFAULT x''")
        if version:
            upgrade()
        for stmt in statements:
            db.execute(stmt)
        if version and int(version[0]) < SCHEMA_VERSION:   # only on the way up: a chain
            _mend_chains(db)            # altered since is for sk-admin verify to name
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    @staticmethod
    def columns(db, table):
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}

    def scrub(self):
        """After plaintext was deleted (secure_delete overwrote it in the pages):
        leave none of it in the write-ahead log either."""
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def backup(self, path):
        """A consistent copy of the live database (SQLite online backup API)."""
        path = os.fspath(path)
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise StoreError(f"directory of '{path}' does not exist")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise StoreError(f"'{path}' exists; refusing to overwrite it") from None
        target = sqlite3.connect(path)
        try:
            self._db().backup(target)
        finally:
            target.close()

    def same(self, other):
        return isinstance(other, SQLiteDialect) and os.path.samefile(self.path, other.path)

    def reset(self):
        pass

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _mend_chains(db):
    """Give every team's log its hash chain where it has none or a stale one, on an
    upgrade: a schema 1 database (sk 0.2.0), or events an sk 0.2.0 server went on
    writing after a newer tool had upgraded its file to schema 2 or 3. One lookup a
    team when all is well."""
    for team, head, chain in db.execute("SELECT team, head, chain FROM teams").fetchall():
        last = db.execute("SELECT chain FROM events WHERE team = ? AND seq = ?",
                          (team, head)).fetchone()
        if (last[0] if last else GENESIS) == chain and len(chain) == 32:
            continue
        chain, updates = GENESIS, []
        for seq, eid in db.execute("SELECT seq, event_id FROM events WHERE team = ?"
                                   " ORDER BY seq", (team,)):
            chain = chain_next(chain, eid)
            updates.append((chain, team, seq))
        db.executemany("UPDATE events SET chain = ? WHERE team = ? AND seq = ?", updates)
        db.execute("UPDATE teams SET chain = ? WHERE team = ?", (chain, team))
