"""The server's one store interface, and its embedded SQLite implementation.

Everything that must hold across requests lives here, never in process memory:
teams and their event sequences, devices, key material, seen nonces. A second
implementation (PostgreSQL) only has to provide the same methods.
"""

import abc
import hashlib
import os
import sqlite3
import threading
import time
from collections import namedtuple
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


# Each team's log is a hash chain, git style: the chain value after event `seq` is
# sha256(chain before it + its event_id). A device keeps the (seq, chain) of the
# last point of the log it saw; if the server's log at that seq is not the same
# chain (the database was put back to an older copy, or replaced) every request
# that carries the point is told so, and the device heals the server.
GENESIS = bytes(32)


def chain_next(prev, event_id):
    return hashlib.sha256(prev + event_id.encode()).digest()


Pushed = namedtuple("Pushed", "results head chain diverged")
Pushed.__doc__ = """What a push did: [(status, reason)] per row, the team's (head, chain)
after it, and why the device's known point is not on this log (None if it is;
then nothing was stored)."""
Page = namedtuple("Page", "rows next more chain diverged")
Page.__doc__ = """One pull page: rows [(seq, *EVENT_COLUMNS)], the next cursor and its
chain value, whether more follow, and the divergence reason (None if none)."""


def check_known(known, head, chain_at, after=0):
    """Why the device's known point (seq, chain) is not on this team's log of
    `head` events, or None if it is. chain_at(seq) reads the chain after seq. A
    pull cursor `after` past the head says the same, known point or not."""
    if after > head:
        return (f"the server's log holds {head} events, but this device has read up to"
                f" {after}: the server was restored from an older copy")
    if known is None:
        return None
    seq, chain = known
    if seq > head:
        return (f"the server's log holds {head} events, but this device saw {seq}:"
                " the server was restored from an older copy")
    if seq and chain_at(seq) != chain:
        return (f"event {seq} of the server's log is not the one this device saw:"
                " the server was restored from an older copy, or replaced")
    return None


def page_of(rows, limit, head, chain):
    """A pull Page from up to limit + 1 rows (SELECT_EVENTS, in seq order) read in
    the snapshot where the team's log had `head` events ending in `chain`: if more
    follow, the page ends at its last row, else at the head."""
    if len(rows) > limit:
        rows = rows[:limit]
        return Page([r[:-1] for r in rows], rows[-1][0], True, bytes(rows[-1][-1]), None)
    return Page([r[:-1] for r in rows], head, False, bytes(chain), None)


def plan_push(rows, existing, lamport):
    """The merge rule of a push, shared by every store: which rows are new,
    duplicates or refused. existing maps event_id -> stored row (EVENT_COLUMNS
    order). Returns ([(status, reason)], [new rows], team's new lamport)."""
    results, new = [], []
    for row in rows:
        old = existing.get(row[0])
        if old is None and row[4] > lamport + MAX_LAMPORT_JUMP:
            results.append(("rejected", "lamport_clock jumps more than 2^32 past the"
                                        " team's highest clock"))
        elif old is None:
            lamport = max(lamport, row[4])
            new.append(row)
            existing[row[0]] = row
            results.append(("accepted", None))
        elif tuple(old) == tuple(row):
            results.append(("duplicate", None))
        else:
            results.append(("rejected", "event_id already used by a different event"))
    return results, new, lamport


def number(new, head, chain):
    """Give new rows their dense sequence numbers and chain values, in order:
    [(seq, chain, row)], and the team's new (head, chain)."""
    out = []
    for row in new:
        head += 1
        chain = chain_next(chain, row[0])
        out.append((head, chain, row))
    return out, head, chain


class Store(abc.ABC):
    """The interface every server store implements (SQLiteStore here, PostgresStore
    in pgstore.py). The server's tests run against both."""

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
    def push(self, team, device, rows, ticket=None, known=None):
        """Store rows (EVENT_COLUMNS order) as one transaction, durable before it
        returns: a Pushed. ticket=(key_id, device, nonce, expires_ms) admits the
        request in the same transaction; None (and nothing stored) if that nonce
        was seen before. known=(seq, chain): the device's last point of the log;
        if it is not on this log nothing is stored and Pushed.diverged says why."""
    @abc.abstractmethod
    def pull(self, team, after, limit, skip=None, known=None):
        """A Page after cursor `after`, from one consistent snapshot. skip=(node_id,
        upto) leaves out that node's events stamped at or below upto (the cursor
        still moves past them); known as for push."""
    @abc.abstractmethod
    def head(self, team):
        """The number of events in the team's log."""
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

    def listen(self, callback):
        """Call callback(team) in a thread of this process whenever any process
        stores events of that team (callback(None): anything may have changed).
        False if the store cannot tell: then only the process that stored them
        wakes its sessions at once. (Sessions also look every second regardless.)"""
        return False

    # upkeep and moving (sk-admin)
    @abc.abstractmethod
    def stats(self): ...
    @abc.abstractmethod
    def backup(self, path): ...
    @abc.abstractmethod
    def export_meta(self):
        """{"teams": [(team, head, lamport, chain, created)], "devices": [(name, team,
        created, last_seen, revoked)], "keys": [(key_id, device, master (plain),
        created, retired, retired_why)], "nonces": [(key_id, nonce, expires)]}."""
    @abc.abstractmethod
    def import_meta(self, meta):
        """Add what export_meta gave (teams with an empty log; devices, keys and
        unexpired nonces), keeping what is already here."""
    @abc.abstractmethod
    def export_events(self, team, after, limit):
        """Up to limit stored rows after seq `after`: (seq, *EVENT_COLUMNS, chain,
        device, received)."""
    @abc.abstractmethod
    def import_events(self, team, rows):
        """Append exported rows as they are (same seq and chain); they must follow
        the team's head, and the chain must check out."""

    def reset(self):
        """Forget connections after the database went away (a no-op for SQLite)."""

    def close(self):
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams (
    team    TEXT PRIMARY KEY,
    head    INTEGER NOT NULL DEFAULT 0,   -- last seq: dense, in commit order
    lamport INTEGER NOT NULL DEFAULT 0,   -- highest Lamport clock stored
    chain   BLOB NOT NULL,                -- hash chain value after event `head`
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
    chain          BLOB NOT NULL,
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
SCHEMA_VERSION = 2
# One device must not be able to push the team's Lamport clock to its end (2^63)
# and so stop everybody from stamping: a jump this far ahead is refused.
MAX_LAMPORT_JUMP = 2 ** 32
EVENT_COLUMNS = ("event_id", "event_type", "aggregate_type", "aggregate_id",
                 "lamport_clock", "node_id", "payload", "timestamp")
STORED_COLUMNS = ("seq", *EVENT_COLUMNS, "chain", "device", "received")
SELECT_EVENTS = "SELECT seq, " + ", ".join(EVENT_COLUMNS) + ", chain FROM events"


def dedup_sql(n):
    """The stored events among n event ids of a team. INDEXED BY: left to itself
    the planner walks the whole team by primary key, and every push gets slower
    as the log grows (quadratic in all)."""
    return ("SELECT " + ", ".join(EVENT_COLUMNS) + " FROM events INDEXED BY events_id"
            " WHERE team = ? AND event_id IN (" + ",".join("?" * n) + ")")


def now_ms():
    return int(time.time() * 1000)


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
            version = None
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version and int(version[0]) > SCHEMA_VERSION:
                raise StoreError(f"server database '{self.path}' has schema {version[0]}, newer"
                                 f" than this sk server ({SCHEMA_VERSION}): upgrade sk")
            if version and int(version[0]) == 1:
                db.execute("ALTER TABLE teams ADD COLUMN chain BLOB NOT NULL DEFAULT x''")
                db.execute("ALTER TABLE events ADD COLUMN chain BLOB NOT NULL DEFAULT x''")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            _mend_chains(db)
            check_secret(secret, lambda sql, *a: db.execute(sql.replace("%s", "?"), a).fetchone(),
                         "INSERT OR IGNORE INTO meta VALUES ('secret_check', %s)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

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

    class _read(_write):
        def __enter__(self):
            self.db.execute("BEGIN")
            return self.db

    # -- devices ---------------------------------------------------------------
    def create_device(self, name, team, key_id, master):
        db = self._db()
        now = utc_now()
        with self._write(db):
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"device '{name}' already exists (use --rotate for a new key)")
            db.execute("INSERT OR IGNORE INTO teams(team, head, chain, created) VALUES (?, 0, ?, ?)",
                       (team, GENESIS, now))
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
        return None if row is None else key_record(self._secret, row)

    def admit(self, key_id, device, nonce, expires_ms):
        """Record a request's nonce; False if it was seen before (a replay)."""
        db = self._db()
        with self._write(db):
            return self._admit(db, key_id, device, nonce, expires_ms)

    def _admit(self, db, key_id, device, nonce, expires_ms):
        db.execute("DELETE FROM nonces WHERE expires < ?", (now_ms(),))
        cur = db.execute("INSERT OR IGNORE INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)",
                         (key_id, nonce, expires_ms))
        if cur.rowcount != 1:
            return False
        now = utc_now()
        db.execute("UPDATE devices SET last_seen = ? WHERE name = ? AND last_seen IS NOT ?",
                   (now, device, now))
        return True

    def _chain_at(self, db, team):
        return lambda seq: (db.execute("SELECT chain FROM events WHERE team = ? AND seq = ?",
                                       (team, seq)).fetchone() or (None,))[0]

    def push(self, team, device, rows, ticket=None, known=None):
        db = self._db()
        now = utc_now()
        with self._write(db):
            if ticket is not None and not self._admit(db, *ticket):
                return None
            head, lamport, chain = db.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = ?", (team,)).fetchone()
            diverged = check_known(known, head, self._chain_at(db, team))
            if diverged:
                return Pushed([], head, chain, diverged)
            existing = {}
            ids = [r[0] for r in rows]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for r in db.execute(dedup_sql(len(chunk)), [team, *chunk]):
                    existing[r[0]] = r
            results, new, lamport = plan_push(rows, existing, lamport)
            if new:
                numbered, head, chain = number(new, head, chain)
                db.executemany(
                    "INSERT INTO events(team, seq, " + ", ".join(EVENT_COLUMNS) +
                    ", chain, device, received) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(team, seq, *row, c, device, now) for seq, c, row in numbered])
                # last statement of the transaction: the team row orders commits
                db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                           (head, lamport, chain, team))
        return Pushed(results, head, chain, None)

    def pull(self, team, after, limit, skip=None, known=None):
        db = self._db()
        with self._read(db):
            row = db.execute("SELECT head, chain FROM teams WHERE team = ?", (team,)).fetchone()
            head, chain = row if row else (0, GENESIS)
            diverged = check_known(known, head, self._chain_at(db, team), after)
            if diverged:
                return Page([], after, False, None, diverged)
            if skip is None:
                rows = db.execute(SELECT_EVENTS + " WHERE team = ? AND seq > ? ORDER BY seq LIMIT ?",
                                  (team, after, limit + 1)).fetchall()
            else:
                rows = db.execute(SELECT_EVENTS + " WHERE team = ? AND seq > ? AND NOT"
                                  " (node_id = ? AND lamport_clock <= ?) ORDER BY seq LIMIT ?",
                                  (team, after, skip[0], skip[1], limit + 1)).fetchall()
        return page_of(rows, limit, head, chain)

    def auth_failures(self, addr, window_ms):
        row = self._db().execute("SELECT window_start, count FROM auth_failures WHERE addr = ?",
                                 (addr,)).fetchone()
        return row[1] if row and row[0] > now_ms() - window_ms else 0

    def note_auth_failure(self, addr, window_ms):
        db = self._db()
        now = now_ms()
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
            db.execute("DELETE FROM ws_tokens WHERE expires < ?", (now_ms() - 3600_000,))
            db.execute("INSERT INTO ws_tokens(token_hash, key_id, expires) VALUES (?, ?, ?)",
                       (token_hash, key_id, expires_ms))

    def consume_ws_token(self, token_hash):
        db = self._db()
        now = now_ms()
        with self._write(db):
            row = db.execute("SELECT key_id, expires, used FROM ws_tokens WHERE token_hash = ?",
                             (token_hash,)).fetchone()
            why = token_refusal(row, now)
            if why:
                return why
            db.execute("UPDATE ws_tokens SET used = ? WHERE token_hash = ?", (now, token_hash))
        return usable_key(self.get_key(row[0]))

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

    def export_meta(self):
        db = self._db()
        with self._read(db):
            keys = []
            for key_id, device, master, created, retired, why in db.execute(
                    "SELECT key_id, device, master, created, retired, retired_why FROM keys"):
                keys.append((key_id, device, unwrap(self._secret, key_id, master),
                             created, retired, why))
            return {
                "teams": db.execute("SELECT team, head, lamport, chain, created FROM teams"
                                    " ORDER BY team").fetchall(),
                "devices": db.execute("SELECT name, team, created, last_seen, revoked"
                                      " FROM devices ORDER BY name").fetchall(),
                "keys": keys,
                "nonces": db.execute("SELECT key_id, nonce, expires FROM nonces"
                                     " WHERE expires >= ?", (now_ms(),)).fetchall(),
            }

    def import_meta(self, meta):
        db = self._db()
        with self._write(db):
            db.executemany("INSERT OR IGNORE INTO teams(team, head, lamport, chain, created)"
                           " VALUES (?, 0, 0, ?, ?)",
                           [(t[0], GENESIS, t[4]) for t in meta["teams"]])
            db.executemany("INSERT OR IGNORE INTO devices(name, team, created, last_seen, revoked)"
                           " VALUES (?, ?, ?, ?, ?)", meta["devices"])
            db.executemany("UPDATE devices SET revoked = ? WHERE name = ? AND revoked IS NULL",
                           [(d[4], d[0]) for d in meta["devices"] if d[4]])
            db.executemany("INSERT OR IGNORE INTO keys(key_id, device, master, created, retired,"
                           " retired_why) VALUES (?, ?, ?, ?, ?, ?)",
                           [(k[0], k[1], crypto.wrap_key(self._secret, k[0], k[2]), *k[3:])
                            for k in meta["keys"]])
            db.executemany("UPDATE keys SET retired = ?, retired_why = ? WHERE key_id = ?"
                           " AND retired IS NULL", [(k[4], k[5], k[0]) for k in meta["keys"] if k[4]])
            db.executemany("INSERT OR IGNORE INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)",
                           meta["nonces"])

    def export_events(self, team, after, limit):
        return self._db().execute(
            "SELECT " + ", ".join(STORED_COLUMNS) + " FROM events WHERE team = ? AND seq > ?"
            " ORDER BY seq LIMIT ?", (team, after, limit)).fetchall()

    def import_events(self, team, rows):
        db = self._db()
        with self._write(db):
            head, lamport, chain = db.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = ?", (team,)).fetchone()
            head, lamport, chain, rows = follow(team, head, lamport, chain, rows)
            db.executemany("INSERT INTO events(team, " + ", ".join(STORED_COLUMNS) + ") VALUES"
                           " (?,?,?,?,?,?,?,?,?,?,?,?,?)", [(team, *r) for r in rows])
            db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                       (head, lamport, chain, team))

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def check_secret(secret, one, insert):
    """Refuse a server secret that is not the one this database's key material is
    wrapped with (several servers must share one); remember its fingerprint the
    first time. one(sql, *args) returns a row; insert records the fingerprint."""
    import hmac
    mine = hmac.new(secret, b"sk server secret check", "sha256").hexdigest()[:32]
    recorded = one("SELECT value FROM meta WHERE key = 'secret_check'")
    if recorded is None:
        sample = one("SELECT key_id, master FROM keys ORDER BY key_id LIMIT 1")
        if sample:
            unwrap(secret, sample[0], sample[1])   # a wrong secret is refused here
        one(insert + " RETURNING value", mine)
        recorded = one("SELECT value FROM meta WHERE key = 'secret_check'")
    if recorded[0] != mine:
        raise StoreError("the server secret is not the one this database's key material is"
                         " wrapped with: every server on a database needs the same"
                         " SK_SERVER_SECRET or SK_SERVER_SECRET_FILE")


def _mend_chains(db):
    """Give every team's log its hash chain where it has none or a stale one: a
    schema 1 database (sk 0.2.0) just upgraded, or events an sk 0.2.0 server went
    on writing after a newer tool upgraded its file. One lookup a team when all
    is well."""
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


def follow(team, head, lamport, chain, rows):
    """Check that exported rows continue a team's log at (head, chain): dense seq
    and the chain recomputed (a row an sk 0.2.0 server wrote has none yet: it is
    given its own). Returns the new (head, lamport, chain) and the rows to store."""
    out = []
    for r in rows:
        seq, eid, row_chain = r[0], r[1], bytes(r[9])
        chain = chain_next(chain, eid)
        if seq != head + 1 or row_chain not in (chain, b""):
            raise StoreError(f"team '{team}': event {seq} of the source does not follow event"
                             f" {head} of the target's log, which is not the start of the"
                             " source's")
        head, lamport = seq, max(lamport, r[5])
        out.append((*r[:9], chain, *r[10:]))
    return head, lamport, chain, out


def unwrap(secret, key_id, blob):
    try:
        return crypto.unwrap_key(secret, key_id, bytes(blob))
    except crypto.CryptoError as e:
        raise StoreError(f"key '{key_id}': {e} (wrong secret file for this database?)") from None


def key_record(secret, row):
    """A KeyRecord from (key_id, device, team, wrapped master, retired, why, revoked)."""
    return KeyRecord(row[0], row[1], row[2], unwrap(secret, row[0], row[3]), *row[4:])


def token_refusal(row, now):
    """Why a WebSocket token row (key_id, expires, used) can't open a session."""
    if row is None:
        return "unknown token"
    if row[2] is not None:
        return "token already used"
    if row[1] < now:
        return "token expired"
    return None


def usable_key(key):
    return key if key is not None and not key.revoked and not key.retired else \
        "key revoked or rotated"


def redact(url):
    """A database URL without its password, for messages."""
    import re
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", os.fspath(url))


def open_store(url, create=True):
    """The store for a database URL or path: PostgreSQL for postgresql://, else a
    SQLite file. With create=False a SQLite database that does not exist yet is an
    error, not a new empty one."""
    url = os.fspath(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .pgstore import PostgresStore
        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1:]
    path = os.path.expanduser(url)
    if not create and not os.path.exists(path):
        raise StoreError(f"no server database at '{path}' (check --db or SK_SERVER_DB)")
    try:
        return SQLiteStore(path)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open server database '{url}': {e}") from None
