"""The PostgreSQL store: the same interface as SQLiteStore, for a team that runs
several `sk server` processes (on one or more hosts) on one database.

Nothing here lives in process memory but the connection pool: nonces, WebSocket
tokens, revocations and failed-authentication counts are rows, so any server
refuses a replay, a used token or a revoked key the moment another one has
seen it.

Each team's sequence is dense and in commit order: a push locks the team's row
(SELECT ... FOR UPDATE) before it numbers its events and keeps the lock until it
commits, so a pull that has read event n has seen every event before n; a pull
reads from one REPEATABLE READ snapshot. A push ends with NOTIFY sk_events, so
every server wakes its WebSocket sessions at once (listen()).

The pool and the listening thread are made lazily in each process, so a store
built before gunicorn forks its workers shares no connection with them.
"""

import os
import threading
import time

from sk import crypto

from .store import SCHEMA as SQLITE_SCHEMA
from .store import (EVENT_COLUMNS, GENESIS, SCHEMA_VERSION, SELECT_EVENTS, STORED_COLUMNS,
                    Page, Pushed, Store, StoreError, check_known, check_secret, follow,
                    key_record, now_ms, number, page_of, plan_push, redact, token_refusal,
                    unwrap, usable_key, utc_now)

# the SQLite schema in PostgreSQL's words: one schema, two dialects
SCHEMA = (SQLITE_SCHEMA.replace("BLOB", "BYTEA").replace("INTEGER", "BIGINT")
          .replace(") WITHOUT ROWID", ")"))
CHANNEL = "sk_events"
SCHEMA_LOCK = 0x736b   # advisory lock: servers starting at once create the schema once
PRUNE_EVERY = 60.0     # seconds between deletions of expired nonces and tokens
POOL_SIZE = int(os.environ.get("SK_PG_POOL", "16"))
_COLS = ", ".join(EVENT_COLUMNS)


def _psycopg():
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as e:
        raise StoreError(f"PostgreSQL needs psycopg 3 and psycopg_pool: {e}") from None
    return psycopg


class PostgresStore(Store):
    def __init__(self, url, secret=None):
        psycopg = _psycopg()
        self.url = url
        self._lock = threading.Lock()
        self._pid = self._pool = None
        self._listeners = []
        self._pruned = 0.0
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                has_keys = self._create_schema(conn)
        except psycopg.Error as e:
            raise StoreError(f"cannot open PostgreSQL database '{redact(url)}':"
                             f" {str(e).strip().splitlines()[0]}") from None
        if secret is None:
            from .secret import SecretError, load_secret
            try:
                secret = load_secret(url, create=not has_keys)
            except SecretError as e:
                raise StoreError(str(e)) from None
        self._secret = secret
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                check_secret(secret, lambda sql, *a: conn.execute(sql, a).fetchone(),
                             "INSERT INTO meta VALUES ('secret_check', %s) ON CONFLICT DO NOTHING")

    def _create_schema(self, conn):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version and int(version[0]) > SCHEMA_VERSION:
                raise StoreError(f"PostgreSQL database has schema {version[0]}, newer than this"
                                 f" sk server ({SCHEMA_VERSION}): upgrade sk")
            conn.execute("INSERT INTO meta VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE"
                         " SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))
            return conn.execute("SELECT EXISTS (SELECT 1 FROM keys)").fetchone()[0]

    # -- connections -----------------------------------------------------------
    def _conn(self):
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
        self._prune(pool)
        return pool.connection()

    def reset(self):
        """The database went away: drop the pool (its connections are dead, and it
        backs off before reconnecting), so the next request connects afresh."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            threading.Thread(target=pool.close, kwargs={"timeout": 1}, daemon=True).start()

    def _prune(self, pool):
        now = time.monotonic()
        if now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        with pool.connection() as conn:
            conn.execute("DELETE FROM nonces WHERE expires < %s", (now_ms(),))
            conn.execute("DELETE FROM ws_tokens WHERE expires < %s", (now_ms() - 3600_000,))
            conn.execute("DELETE FROM auth_failures WHERE window_start < %s",
                         (now_ms() - 600_000,))

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
        psycopg = _psycopg()
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

    # -- devices ---------------------------------------------------------------
    def create_device(self, name, team, key_id, master):
        now = utc_now()
        with self._conn() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM devices WHERE name = %s", (name,)).fetchone():
                raise StoreError(f"device '{name}' already exists (use --rotate for a new key)")
            conn.execute("INSERT INTO teams(team, head, chain, created) VALUES (%s, 0, %s, %s)"
                         " ON CONFLICT (team) DO NOTHING", (team, GENESIS, now))
            conn.execute("INSERT INTO devices(name, team, created) VALUES (%s, %s, %s)",
                         (name, team, now))
            conn.execute("INSERT INTO keys(key_id, device, master, created) VALUES (%s, %s, %s, %s)",
                         (key_id, name, crypto.wrap_key(self._secret, key_id, master), now))

    def _device(self, conn, name):
        row = conn.execute("SELECT revoked FROM devices WHERE name = %s FOR UPDATE",
                           (name,)).fetchone()
        if row is None:
            raise StoreError(f"no device named '{name}'")
        return row

    def rotate_key(self, name, key_id, master):
        now = utc_now()
        with self._conn() as conn, conn.transaction():
            if self._device(conn, name)[0]:
                raise StoreError(f"device '{name}' is revoked; register a new device instead")
            conn.execute("UPDATE keys SET retired = %s, retired_why = 'rotated' WHERE device = %s"
                         " AND retired IS NULL", (now, name))
            conn.execute("INSERT INTO keys(key_id, device, master, created) VALUES (%s, %s, %s, %s)",
                         (key_id, name, crypto.wrap_key(self._secret, key_id, master), now))

    def revoke_device(self, name):
        now = utc_now()
        with self._conn() as conn, conn.transaction():
            if self._device(conn, name)[0]:
                raise StoreError(f"device '{name}' is already revoked")
            conn.execute("UPDATE devices SET revoked = %s WHERE name = %s", (now, name))
            conn.execute("UPDATE keys SET retired = %s, retired_why = 'revoked' WHERE device = %s"
                         " AND retired IS NULL", (now, name))

    def list_devices(self):
        with self._conn() as conn:
            rows = conn.execute("SELECT name, team, created, last_seen, revoked FROM devices"
                                " ORDER BY team, name").fetchall()
        return [dict(zip(("name", "team", "created", "last_seen", "revoked"), r)) for r in rows]

    # -- requests --------------------------------------------------------------
    def get_key(self, key_id):
        with self._conn() as conn:
            row = conn.execute(
                "SELECT k.key_id, k.device, d.team, k.master, k.retired, k.retired_why, d.revoked"
                " FROM keys k JOIN devices d ON d.name = k.device WHERE k.key_id = %s",
                (key_id,)).fetchone()
        return None if row is None else key_record(self._secret, row)

    def admit(self, key_id, device, nonce, expires_ms):
        with self._conn() as conn, conn.transaction():
            return self._admit(conn, key_id, device, nonce, expires_ms)

    def _admit(self, conn, key_id, device, nonce, expires_ms):
        cur = conn.execute("INSERT INTO nonces(key_id, nonce, expires) VALUES (%s, %s, %s)"
                           " ON CONFLICT DO NOTHING", (key_id, nonce, expires_ms))
        if cur.rowcount != 1:
            return False
        now = utc_now()
        conn.execute("UPDATE devices SET last_seen = %s WHERE name = %s"
                     " AND last_seen IS DISTINCT FROM %s", (now, device, now))
        return True

    @staticmethod
    def _chain_at(conn, team):
        return lambda seq: (conn.execute("SELECT chain FROM events WHERE team = %s AND seq = %s",
                                         (team, seq)).fetchone() or (None,))[0]

    def push(self, team, device, rows, ticket=None, known=None):
        now = utc_now()
        with self._conn() as conn, conn.transaction():
            if ticket is not None and not self._admit(conn, *ticket):
                return None
            # the team's row lock, held to the commit, orders this team's commits
            head, lamport, chain = conn.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = %s FOR UPDATE",
                (team,)).fetchone()
            diverged = check_known(known, head, self._chain_at(conn, team))
            if diverged:
                return Pushed([], head, chain, diverged)
            existing = {}
            if rows:
                for r in conn.execute("SELECT " + _COLS + " FROM events WHERE team = %s"
                                      " AND event_id = ANY(%s)", (team, [r[0] for r in rows])):
                    existing[r[0]] = r
            results, new, lamport = plan_push(rows, existing, lamport)
            if new:
                numbered, head, chain = number(new, head, chain)
                with conn.cursor().copy("COPY events (team, seq, " + _COLS +
                                        ", chain, device, received) FROM STDIN") as copy:
                    for seq, c, row in numbered:
                        copy.write_row((team, seq, *row, c, device, now))
                conn.execute("UPDATE teams SET head = %s, lamport = %s, chain = %s WHERE team = %s",
                             (head, lamport, chain, team))
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, team))
        return Pushed(results, head, bytes(chain), None)

    def pull(self, team, after, limit, skip=None, known=None):
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute("SELECT head, chain FROM teams WHERE team = %s", (team,)).fetchone()
            head, chain = row if row else (0, GENESIS)
            diverged = check_known(known, head, self._chain_at(conn, team), after)
            if diverged:
                return Page([], after, False, None, diverged)
            sql = SELECT_EVENTS + " WHERE team = %s AND seq > %s"
            args = [team, after]
            if skip is not None:
                sql += " AND NOT (node_id = %s AND lamport_clock <= %s)"
                args += skip
            rows = conn.execute(sql + " ORDER BY seq LIMIT %s", (*args, limit + 1)).fetchall()
        return page_of(rows, limit, head, chain)

    def head(self, team):
        with self._conn() as conn:
            row = conn.execute("SELECT head FROM teams WHERE team = %s", (team,)).fetchone()
        return row[0] if row else 0

    def auth_failures(self, addr, window_ms):
        with self._conn() as conn:
            row = conn.execute("SELECT window_start, count FROM auth_failures WHERE addr = %s",
                               (addr,)).fetchone()
        return row[1] if row and row[0] > now_ms() - window_ms else 0

    def note_auth_failure(self, addr, window_ms):
        now = now_ms()
        with self._conn() as conn:
            return conn.execute(
                "INSERT INTO auth_failures AS a (addr, window_start, count) VALUES (%s, %s, 1)"
                " ON CONFLICT (addr) DO UPDATE SET"
                " count = CASE WHEN a.window_start > %s THEN a.count + 1 ELSE 1 END,"
                " window_start = CASE WHEN a.window_start > %s THEN a.window_start ELSE %s END"
                " RETURNING count", (addr, now, now - window_ms, now - window_ms, now)).fetchone()[0]

    def add_ws_token(self, token_hash, key_id, expires_ms):
        with self._conn() as conn:
            conn.execute("INSERT INTO ws_tokens(token_hash, key_id, expires) VALUES (%s, %s, %s)",
                         (token_hash, key_id, expires_ms))

    def consume_ws_token(self, token_hash):
        now = now_ms()
        with self._conn() as conn, conn.transaction():
            row = conn.execute("SELECT key_id, expires, used FROM ws_tokens WHERE token_hash = %s"
                               " FOR UPDATE", (token_hash,)).fetchone()
            why = token_refusal(row, now)
            if why:
                return why
            conn.execute("UPDATE ws_tokens SET used = %s WHERE token_hash = %s", (now, token_hash))
        return usable_key(self.get_key(row[0]))

    # -- upkeep ----------------------------------------------------------------
    def stats(self):
        with self._conn() as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("teams", "devices", "events")}

    def backup(self, path):
        raise StoreError("sk-admin backup copies a SQLite server; for PostgreSQL use pg_dump"
                         " (see the README, 'Scaling out')")

    def export_meta(self):
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            keys = [(k[0], k[1], unwrap(self._secret, k[0], k[2]), *k[3:]) for k in conn.execute(
                "SELECT key_id, device, master, created, retired, retired_why FROM keys")]
            return {
                "teams": conn.execute("SELECT team, head, lamport, chain, created FROM teams"
                                      " ORDER BY team").fetchall(),
                "devices": conn.execute("SELECT name, team, created, last_seen, revoked"
                                        " FROM devices ORDER BY name").fetchall(),
                "keys": keys,
                "nonces": conn.execute("SELECT key_id, nonce, expires FROM nonces"
                                       " WHERE expires >= %s", (now_ms(),)).fetchall(),
            }

    def import_meta(self, meta):
        with self._conn() as conn, conn.transaction():
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO teams(team, head, lamport, chain, created)"
                                " VALUES (%s, 0, 0, %s, %s) ON CONFLICT DO NOTHING",
                                [(t[0], GENESIS, t[4]) for t in meta["teams"]])
                cur.executemany("INSERT INTO devices(name, team, created, last_seen, revoked)"
                                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                meta["devices"])
                cur.executemany("UPDATE devices SET revoked = %s WHERE name = %s"
                                " AND revoked IS NULL",
                                [(d[4], d[0]) for d in meta["devices"] if d[4]])
                cur.executemany("INSERT INTO keys(key_id, device, master, created, retired,"
                                " retired_why) VALUES (%s, %s, %s, %s, %s, %s)"
                                " ON CONFLICT DO NOTHING",
                                [(k[0], k[1], crypto.wrap_key(self._secret, k[0], k[2]), *k[3:])
                                 for k in meta["keys"]])
                cur.executemany("UPDATE keys SET retired = %s, retired_why = %s WHERE key_id = %s"
                                " AND retired IS NULL",
                                [(k[4], k[5], k[0]) for k in meta["keys"] if k[4]])
                cur.executemany("INSERT INTO nonces(key_id, nonce, expires) VALUES (%s, %s, %s)"
                                " ON CONFLICT DO NOTHING", meta["nonces"])

    def export_events(self, team, after, limit):
        with self._conn() as conn:
            return conn.execute("SELECT " + ", ".join(STORED_COLUMNS) + " FROM events"
                                " WHERE team = %s AND seq > %s ORDER BY seq LIMIT %s",
                                (team, after, limit)).fetchall()

    def import_events(self, team, rows):
        try:
            self._import_events(team, rows)
        except _psycopg().DataError as e:
            raise StoreError(f"team '{team}': events {rows[0][0]}-{rows[-1][0]} hold text"
                             f" PostgreSQL cannot store: {str(e).strip().splitlines()[0]}"
                             " (a NUL character, which sk 0.2.0 let through)") from None

    def _import_events(self, team, rows):
        with self._conn() as conn, conn.transaction():
            head, lamport, chain = conn.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = %s FOR UPDATE",
                (team,)).fetchone()
            head, lamport, chain, rows = follow(team, head, lamport, bytes(chain), rows)
            with conn.cursor().copy("COPY events (team, " + ", ".join(STORED_COLUMNS) +
                                    ") FROM STDIN") as copy:
                for r in rows:
                    copy.write_row((team, *r))
            conn.execute("UPDATE teams SET head = %s, lamport = %s, chain = %s WHERE team = %s",
                         (head, lamport, chain, team))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, team))

    def close(self):
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None

