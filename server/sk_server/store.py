"""The server's one store interface, and its embedded SQLite implementation.

Everything that must hold across requests lives here, never in process memory:
teams and their event sequences, devices, key material, seen nonces. A second
implementation (PostgreSQL) only has to provide the same methods.
"""

import abc
import os
import sqlite3
import threading
import time
from datetime import datetime, timezone

from sk import crypto


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class KeyRecord:
    __slots__ = ("key_id", "device", "team", "master", "retired", "retired_why", "revoked")

    def __init__(self, key_id, device, team, master, retired, retired_why, revoked):
        self.key_id, self.device, self.team, self.master = key_id, device, team, bytes(master)
        self.retired, self.retired_why, self.revoked = retired, retired_why, revoked


class StoreError(Exception):
    """A store operation refused: unknown device, name taken, ..."""


class Store(abc.ABC):
    """The interface every server store implements."""

    # devices and keys (sk-register)
    @abc.abstractmethod
    def create_device(self, name, team, key_id, master): ...
    @abc.abstractmethod
    def rotate_key(self, name, key_id, master): ...
    @abc.abstractmethod
    def revoke_device(self, name): ...
    @abc.abstractmethod
    def list_devices(self): ...

    # requests
    @abc.abstractmethod
    def get_key(self, key_id):
        """KeyRecord for key_id, or None."""
    @abc.abstractmethod
    def admit(self, key_id, device, nonce, expires_ms):
        """Record a request nonce; False if already seen (a replay)."""
    @abc.abstractmethod
    def push(self, team, device, rows, ticket=None):
        """Store rows; [(status, reason)] per row; durable before it returns.
        ticket=(key_id, device, nonce, expires_ms) admits the request in the same
        transaction; None (and nothing stored) if that nonce was seen before."""
    @abc.abstractmethod
    def pull(self, team, after, limit, skip=None):
        """(rows, next cursor, more) from one consistent snapshot; skip=(node_id,
        upto) leaves out that node's events stamped at or below upto."""
    @abc.abstractmethod
    def head(self, team): ...
    @abc.abstractmethod
    def auth_failures(self, addr, window_ms):
        """How many failed authentications came from addr in the current window."""
    @abc.abstractmethod
    def note_auth_failure(self, addr, window_ms):
        """Count one failed authentication from addr; return the window's count."""
    @abc.abstractmethod
    def add_ws_token(self, token_hash, key_id, expires_ms):
        """Remember a WebSocket token (by hash) for key_id until expires_ms."""
    @abc.abstractmethod
    def consume_ws_token(self, token_hash):
        """Use a token once: its KeyRecord, or a reason string why it is refused."""

    # upkeep
    @abc.abstractmethod
    def stats(self): ...
    @abc.abstractmethod
    def backup(self, path): ...

    def close(self):
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams (
    team    TEXT PRIMARY KEY,
    head    INTEGER NOT NULL DEFAULT 0,   -- last seq: dense, in commit order
    lamport INTEGER NOT NULL DEFAULT 0,   -- highest Lamport clock stored
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    name      TEXT PRIMARY KEY,
    team      TEXT NOT NULL REFERENCES teams(team),
    created   TEXT NOT NULL,
    last_seen TEXT,
    revoked   TEXT
);
CREATE TABLE IF NOT EXISTS keys (
    key_id      TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices(name),
    master      BLOB NOT NULL,       -- HKDF output wrapped by the server secret
    created     TEXT NOT NULL,
    retired     TEXT,
    retired_why TEXT
);
CREATE TABLE IF NOT EXISTS events (
    team           TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    event_id       TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    lamport_clock  INTEGER NOT NULL,
    node_id        TEXT NOT NULL,
    payload        TEXT NOT NULL,
    timestamp      TEXT NOT NULL,
    device         TEXT NOT NULL,
    received       TEXT NOT NULL,
    PRIMARY KEY (team, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events(team, event_id);
CREATE TABLE IF NOT EXISTS nonces (
    key_id  TEXT NOT NULL,
    nonce   BLOB NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (key_id, nonce)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires);
CREATE TABLE IF NOT EXISTS auth_failures (
    addr         TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    count        INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ws_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    expires    INTEGER NOT NULL,
    used       INTEGER
) WITHOUT ROWID;
"""
# One device must not be able to push the team's Lamport clock to its end (2^63)
# and so stop everybody from stamping: a jump this far ahead is refused.
MAX_LAMPORT_JUMP = 2 ** 32
EVENT_COLUMNS = ("event_id", "event_type", "aggregate_type", "aggregate_id",
                 "lamport_clock", "node_id", "payload", "timestamp")
_SELECT_EVENTS = "SELECT seq, " + ", ".join(EVENT_COLUMNS) + " FROM events"


def dedup_sql(n):
    """The stored events among n event ids of a team. INDEXED BY: left to itself
    the planner walks the whole team by primary key, and every push gets slower
    as the log grows (quadratic in all)."""
    return ("SELECT " + ", ".join(EVENT_COLUMNS) + " FROM events INDEXED BY events_id"
            " WHERE team = ? AND event_id IN (" + ",".join("?" * n) + ")")


class SQLiteStore(Store):
    """Embedded store: one SQLite file in WAL mode; one connection per thread;
    writers take BEGIN IMMEDIATE so SQLite serialises them, which makes each
    team's sequence order its commit order."""

    def __init__(self, path, secret=None):
        self.path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise StoreError(f"directory '{parent}' for the server database does not exist")
        if secret is None:
            from .secret import SecretError, load_secret
            try:  # a new secret only with a new database: old key material needs the old one
                secret = load_secret(self.path, create=not os.path.exists(self.path))
            except SecretError as e:
                raise StoreError(str(e)) from None
        self._secret = secret
        self._local = threading.local()
        if not os.path.exists(self.path):  # key material lives here: private from the start
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = self._db()
        with self._write(db):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', '1')")

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=60000")
            self._local.db = db
        return db

    class _write:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    # -- devices ---------------------------------------------------------------
    def create_device(self, name, team, key_id, master):
        db = self._db()
        now = utc_now()
        with self._write(db):
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"device '{name}' already exists (use --rotate for a new key)")
            db.execute("INSERT OR IGNORE INTO teams(team, head, created) VALUES (?, 0, ?)",
                       (team, now))
            db.execute("INSERT INTO devices(name, team, created) VALUES (?, ?, ?)",
                       (name, team, now))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, crypto.wrap_key(self._secret, key_id, master), now))

    def _device(self, db, name):
        row = db.execute("SELECT revoked FROM devices WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"no device named '{name}'")
        return row

    def rotate_key(self, name, key_id, master):
        db = self._db()
        now = utc_now()
        with self._write(db):
            if self._device(db, name)[0]:
                raise StoreError(f"device '{name}' is revoked; register a new device instead")
            db.execute("UPDATE keys SET retired = ?, retired_why = 'rotated' WHERE device = ?"
                       " AND retired IS NULL", (now, name))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, crypto.wrap_key(self._secret, key_id, master), now))

    def revoke_device(self, name):
        db = self._db()
        now = utc_now()
        with self._write(db):
            if self._device(db, name)[0]:
                raise StoreError(f"device '{name}' is already revoked")
            db.execute("UPDATE devices SET revoked = ? WHERE name = ?", (now, name))
            db.execute("UPDATE keys SET retired = ?, retired_why = 'revoked' WHERE device = ?"
                       " AND retired IS NULL", (now, name))

    def list_devices(self):
        rows = self._db().execute(
            "SELECT name, team, created, last_seen, revoked FROM devices ORDER BY team, name")
        return [dict(zip(("name", "team", "created", "last_seen", "revoked"), r)) for r in rows]

    # -- requests --------------------------------------------------------------
    def get_key(self, key_id):
        row = self._db().execute(
            "SELECT k.key_id, k.device, d.team, k.master, k.retired, k.retired_why, d.revoked"
            " FROM keys k JOIN devices d ON d.name = k.device WHERE k.key_id = ?",
            (key_id,)).fetchone()
        if row is None:
            return None
        try:
            master = crypto.unwrap_key(self._secret, key_id, row[3])
        except crypto.CryptoError as e:
            raise StoreError(f"key '{key_id}': {e} (wrong secret file for this database?)") from None
        return KeyRecord(row[0], row[1], row[2], master, *row[4:])

    def admit(self, key_id, device, nonce, expires_ms):
        """Record a request's nonce; False if it was seen before (a replay)."""
        db = self._db()
        with self._write(db):
            return self._admit(db, key_id, device, nonce, expires_ms)

    def _admit(self, db, key_id, device, nonce, expires_ms):
        db.execute("DELETE FROM nonces WHERE expires < ?", (int(time.time() * 1000),))
        cur = db.execute("INSERT OR IGNORE INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)",
                         (key_id, nonce, expires_ms))
        if cur.rowcount != 1:
            return False
        db.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (utc_now(), device))
        return True

    def push(self, team, device, rows, ticket=None):
        """Store validated rows (tuples in EVENT_COLUMNS order). Returns a list of
        (status, reason) in the same order; commits before returning. With a
        ticket the request's nonce is admitted in the same transaction (one
        commit, one fsync); None if it is a replay."""
        db = self._db()
        now = utc_now()
        results = [None] * len(rows)
        with self._write(db):
            if ticket is not None and not self._admit(db, *ticket):
                return None
            head, lamport = db.execute("SELECT head, lamport FROM teams WHERE team = ?",
                                       (team,)).fetchone()
            existing = {}
            ids = [r[0] for r in rows]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for r in db.execute(dedup_sql(len(chunk)), [team, *chunk]):
                    existing[r[0]] = r
            new = []
            for i, row in enumerate(rows):
                old = existing.get(row[0])
                if old is None and row[4] > lamport + MAX_LAMPORT_JUMP:
                    results[i] = ("rejected", "lamport_clock jumps more than 2^32 past the"
                                              " team's highest clock")
                elif old is None:
                    lamport = max(lamport, row[4])
                    head += 1
                    new.append((team, head, *row, device, now))
                    existing[row[0]] = row
                    results[i] = ("accepted", None)
                elif tuple(old) == tuple(row):
                    results[i] = ("duplicate", None)
                else:
                    results[i] = ("rejected", "event_id already used by a different event")
            if new:
                db.executemany("INSERT INTO events(team, seq, " + ", ".join(EVENT_COLUMNS) +
                               ", device, received) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", new)
                # last statement of the transaction: the team row orders commits
                db.execute("UPDATE teams SET head = ?, lamport = ? WHERE team = ?",
                           (head, lamport, team))
        return results

    def pull(self, team, after, limit, skip=None):
        """Return (rows [(seq, *EVENT_COLUMNS)], next cursor, more) from one snapshot.
        skip=(node_id, upto): leave out the events of node_id with lamport_clock <=
        upto (the puller stamped them and holds them); the cursor still moves past."""
        db = self._db()
        db.execute("BEGIN")
        try:
            head = db.execute("SELECT head FROM teams WHERE team = ?", (team,)).fetchone()
            head = head[0] if head else 0
            if skip is None:
                rows = db.execute(_SELECT_EVENTS + " WHERE team = ? AND seq > ? ORDER BY seq"
                                  " LIMIT ?", (team, after, limit + 1)).fetchall()
            else:
                rows = db.execute(_SELECT_EVENTS + " WHERE team = ? AND seq > ? AND NOT"
                                  " (node_id = ? AND lamport_clock <= ?) ORDER BY seq LIMIT ?",
                                  (team, after, skip[0], skip[1], limit + 1)).fetchall()
        finally:
            db.execute("COMMIT")
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, rows[-1][0], True
        return rows, max(head, after), False

    def auth_failures(self, addr, window_ms):
        row = self._db().execute("SELECT window_start, count FROM auth_failures WHERE addr = ?",
                                 (addr,)).fetchone()
        now = int(time.time() * 1000)
        return row[1] if row and row[0] > now - window_ms else 0

    def note_auth_failure(self, addr, window_ms):
        db = self._db()
        now = int(time.time() * 1000)
        with self._write(db):
            db.execute("DELETE FROM auth_failures WHERE window_start < ?", (now - 10 * window_ms,))
            db.execute("INSERT INTO auth_failures(addr, window_start, count) VALUES (?, ?, 1)"
                       " ON CONFLICT(addr) DO UPDATE SET"
                       " count = CASE WHEN window_start > ? THEN count + 1 ELSE 1 END,"
                       " window_start = CASE WHEN window_start > ? THEN window_start ELSE ? END",
                       (addr, now, now - window_ms, now - window_ms, now))
            return db.execute("SELECT count FROM auth_failures WHERE addr = ?", (addr,)).fetchone()[0]

    def add_ws_token(self, token_hash, key_id, expires_ms):
        db = self._db()
        with self._write(db):
            db.execute("DELETE FROM ws_tokens WHERE expires < ?", (int(time.time() * 1000) - 3600_000,))
            db.execute("INSERT INTO ws_tokens(token_hash, key_id, expires) VALUES (?, ?, ?)",
                       (token_hash, key_id, expires_ms))

    def consume_ws_token(self, token_hash):
        db = self._db()
        now = int(time.time() * 1000)
        with self._write(db):
            row = db.execute("SELECT key_id, expires, used FROM ws_tokens WHERE token_hash = ?",
                             (token_hash,)).fetchone()
            if row is None:
                return "unknown token"
            if row[2] is not None:
                return "token already used"
            if row[1] < now:
                return "token expired"
            db.execute("UPDATE ws_tokens SET used = ? WHERE token_hash = ?", (now, token_hash))
        key = self.get_key(row[0])
        if key is None or key.revoked or key.retired:
            return "key revoked or rotated"
        return key

    def head(self, team):
        row = self._db().execute("SELECT head FROM teams WHERE team = ?", (team,)).fetchone()
        return row[0] if row else 0

    # -- upkeep ----------------------------------------------------------------
    def stats(self):
        db = self._db()
        return {
            "teams": db.execute("SELECT count(*) FROM teams").fetchone()[0],
            "devices": db.execute("SELECT count(*) FROM devices").fetchone()[0],
            "events": db.execute("SELECT count(*) FROM events").fetchone()[0],
        }

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

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def open_store(url, create=True):
    """The store for a database URL or path (SQLite for a path). With create=False
    a database that does not exist yet is an error, not a new empty one."""
    url = os.fspath(url)
    if url.startswith(("postgresql://", "postgres://")):
        raise StoreError("PostgreSQL is not supported by this version of sk yet")
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1:]
    path = os.path.expanduser(url)
    if not create and not os.path.exists(path):
        raise StoreError(f"no server database at '{path}' (check --db or SK_SERVER_DB)")
    try:
        return SQLiteStore(path)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open server database '{url}': {e}") from None
