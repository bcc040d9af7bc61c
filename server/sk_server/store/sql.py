"""The one SQL implementation of the store, over a dialect (sqlite.py,
postgresql.py) that says how each thing is said on its database.

SQL here is written with ? placeholders; a dialect translates. Every write is
one transaction; a push takes its team's row first (`dialect.for_update`), so
each team's sequence is dense and in commit order, and a pull reads from one
consistent snapshot.
"""

from sk import crypto

from .base import (GENESIS, KeyRecord, Page, Pushed, Store, StoreError, check_known,
                   follow, node_taken, now_ms, number, page_of, plan_push, secret_check,
                   token_refusal, unwrap, usable_key, utc_now)
from .schema import DEVICE_COLUMNS, EVENT_COLUMNS, STORED_COLUMNS, statements

SELECT_EVENTS = "SELECT seq, " + ", ".join(EVENT_COLUMNS) + ", chain FROM events"
SELECT_KEY = ("SELECT k.key_id, k.device, d.team, k.master, k.retired, k.retired_why, d.revoked"
              " FROM keys k JOIN devices d ON d.name = k.device WHERE k.key_id = ?")
TOKEN_GRACE_MS = 3600_000          # used tokens are kept an hour past their expiry
AUTH_FAILURES_KEPT_MS = 600_000    # failure counts older than this are deleted
PRUNE_EVERY_MS = 60_000


class SQLStore(Store):
    def __init__(self, dialect, secret=None):
        self.d = dialect
        self._pruned = 0
        with self.d.write(schema=True) as db:
            self.d.create_schema(db, statements(self.d.words))
            has_keys = db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None
        if secret is None:
            from ..secret import SecretError, load_secret
            try:  # a new secret only for a database without key material
                secret = load_secret(self.d.location, create=not has_keys)
            except SecretError as e:
                raise StoreError(str(e)) from None
        self._secret = secret
        with self.d.write(schema=True) as db:
            self._check_secret(db)

    def _check_secret(self, db):
        """Refuse a server secret that is not the one this database's key material
        is wrapped with (several servers must share one); remember its fingerprint
        the first time."""
        mine = secret_check(self._secret)
        recorded = db.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        if recorded is None:
            sample = db.execute("SELECT key_id, master FROM keys ORDER BY key_id LIMIT 1").fetchone()
            if sample:
                unwrap(self._secret, sample[0], sample[1])   # a wrong secret is refused here
            db.execute("INSERT INTO meta VALUES ('secret_check', ?) ON CONFLICT DO NOTHING", (mine,))
            recorded = db.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        if not crypto.same(recorded[0].encode(), mine.encode()):
            raise StoreError("the server secret is not the one this database's key material is"
                             " wrapped with: every server on a database needs the same"
                             " SK_SERVER_SECRET or SK_SERVER_SECRET_FILE")

    def _wrap(self, key_id, master):
        return crypto.wrap_key(self._secret, key_id, master)

    # -- devices ---------------------------------------------------------------
    def create_device(self, name, team, key_id, master):
        now = utc_now()
        with self.d.write() as db:
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"device '{name}' already exists (use --rotate for a new key)")
            db.execute("INSERT INTO teams(team, head, chain, created) VALUES (?, 0, ?, ?)"
                       " ON CONFLICT DO NOTHING", (team, GENESIS, now))
            db.execute("INSERT INTO devices(name, team, created) VALUES (?, ?, ?)",
                       (name, team, now))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, self._wrap(key_id, master), now))

    def _revoked(self, db, name):
        row = db.execute("SELECT revoked FROM devices WHERE name = ?" + self.d.for_update,
                         (name,)).fetchone()
        if row is None:
            raise StoreError(f"no device named '{name}'")
        return row[0]

    def rotate_key(self, name, key_id, master):
        now = utc_now()
        with self.d.write() as db:
            if self._revoked(db, name):
                raise StoreError(f"device '{name}' is revoked; register a new device instead")
            db.execute("UPDATE keys SET retired = ?, retired_why = 'rotated' WHERE device = ?"
                       " AND retired IS NULL", (now, name))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, self._wrap(key_id, master), now))

    def revoke_device(self, name):
        now = utc_now()
        with self.d.write() as db:
            if self._revoked(db, name):
                raise StoreError(f"device '{name}' is already revoked")
            db.execute("UPDATE devices SET revoked = ? WHERE name = ?", (now, name))
            db.execute("UPDATE keys SET retired = ?, retired_why = 'revoked' WHERE device = ?"
                       " AND retired IS NULL", (now, name))

    def list_devices(self):
        with self.d.read() as db:
            rows = db.execute("SELECT " + ", ".join(DEVICE_COLUMNS) + " FROM devices"
                              " ORDER BY team, name").fetchall()
        return [dict(zip(DEVICE_COLUMNS, r)) for r in rows]

    # -- requests --------------------------------------------------------------
    def get_key(self, key_id):
        with self.d.read() as db:
            row = db.execute(SELECT_KEY, (key_id,)).fetchone()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], unwrap(self._secret, row[0], row[3]), *row[4:])

    def key_valid(self, key_id):
        with self.d.read() as db:
            row = db.execute("SELECT k.retired, d.revoked FROM keys k JOIN devices d"
                             " ON d.name = k.device WHERE k.key_id = ?", (key_id,)).fetchone()
        return row is not None and row[0] is None and row[1] is None

    def admit(self, key_id, device, nonce, expires_ms):
        with self.d.write() as db:
            return self._admit(db, key_id, device, nonce, expires_ms)

    def _admit(self, db, key_id, device, nonce, expires_ms):
        cur = db.execute("INSERT INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)"
                         " ON CONFLICT DO NOTHING", (key_id, nonce, expires_ms))
        if cur.rowcount != 1:
            return False
        now = utc_now()
        db.execute("UPDATE devices SET last_seen = ? WHERE name = ?"
                   " AND (last_seen IS NULL OR last_seen <> ?)", (now, device, now))
        return True

    @staticmethod
    def _chain_at(db, team):
        return lambda seq: bytes((db.execute("SELECT chain FROM events WHERE team = ? AND seq = ?",
                                             (team, seq)).fetchone() or (b"",))[0])

    def push(self, team, device, rows, ticket=None, known=None, relay=()):
        self._maybe_prune()
        now = utc_now()
        with self.d.write() as db:
            if ticket is not None and not self._admit(db, *ticket):
                return None
            # the team's row, held to the commit, orders this team's commits
            head, lamport, chain = db.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = ?" + self.d.for_update,
                (team,)).fetchone()
            chain = bytes(chain)
            diverged = check_known(known, head, self._chain_at(db, team))
            if diverged:
                return Pushed([], head, chain, diverged)
            existing = {r[0]: r for r in self.d.events_by_id(db, team, [r[0] for r in rows])}
            results, new, lamport = plan_push(rows, existing, lamport)
            own = [r for r in new if r.event_id not in relay]
            taken = self._node_taken(db, team, device, own)
            if taken:
                return Pushed([], head, chain, None, taken)
            if new:
                numbered, head, chain = number(new, head, chain)
                self.d.insert_many(db, "events", ("team", "seq", *EVENT_COLUMNS, "chain",
                                                  "device", "received"),
                                   [(team, seq, *row, c, device, now) for seq, c, row in numbered])
                db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                           (head, lamport, chain, team))
                self.d.notify(db, team)
        return Pushed(results, head, chain, None)

    def _node_taken(self, db, team, device, rows):
        """Why the node ids of new events of `device` (not relayed) are not its
        own, or None: a node id bound to another device, or a (node, Lamport clock)
        stamp already given to another event (a copied home). Unbound node ids are
        bound to `device` here."""
        nodes = sorted({r.node_id for r in rows})
        if not nodes:
            return None
        bound = dict(db.execute("SELECT node_id, device FROM nodes WHERE team = ? AND node_id IN ("
                                + ",".join("?" * len(nodes)) + ")", (team, *nodes)).fetchall())
        stamps = {}
        for r in rows:
            stamps.setdefault(r.node_id, {})[r.lamport_clock] = r.event_id
        for node in nodes:
            owner = bound.get(node)
            if owner is not None and owner != device:
                return node_taken(node, owner, device)
            mine = stamps[node]
            for clock, eid in db.execute(
                    "SELECT lamport_clock, event_id FROM events WHERE team = ? AND node_id = ?"
                    " AND lamport_clock BETWEEN ? AND ?",
                    (team, node, min(mine), max(mine))).fetchall():
                if clock in mine and mine[clock] != eid:
                    return node_taken(node, owner or device, device, clock)
        self.d.many(db, "INSERT INTO nodes(team, node_id, device) VALUES (?, ?, ?)"
                        " ON CONFLICT DO NOTHING", [(team, n, device) for n in nodes if n not in bound])
        return None

    def pull(self, team, after, limit, skip=None, known=None):
        with self.d.read(snapshot=True) as db:
            row = db.execute("SELECT head, chain FROM teams WHERE team = ?", (team,)).fetchone()
            head, chain = row if row else (0, GENESIS)
            diverged = check_known(known, head, self._chain_at(db, team), after)
            if diverged:
                return Page([], after, False, None, diverged)
            sql, args = SELECT_EVENTS + " WHERE team = ? AND seq > ?", [team, after]
            if skip is not None:   # (device, node, upto): what the puller pushed itself
                sql += " AND NOT (device = ? AND node_id = ? AND lamport_clock <= ?)"
                args += skip
            rows = self.d.iter_rows(db, sql + " ORDER BY seq LIMIT ?", (*args, limit + 1))
            return page_of(rows, limit, head, chain)

    def seen(self, key_id, nonce):
        with self.d.read() as db:
            return db.execute("SELECT 1 FROM nonces WHERE key_id = ? AND nonce = ?",
                              (key_id, nonce)).fetchone() is not None

    def ping(self):
        with self.d.read() as db:
            db.execute("SELECT 1 FROM meta LIMIT 1").fetchone()

    def head(self, team):
        with self.d.read() as db:
            row = db.execute("SELECT head FROM teams WHERE team = ?", (team,)).fetchone()
        return row[0] if row else 0

    def auth_failures(self, addr, window_ms):
        with self.d.read() as db:
            row = db.execute("SELECT window_start, count FROM auth_failures WHERE addr = ?",
                             (addr,)).fetchone()
        return row[1] if row and row[0] > now_ms() - window_ms else 0

    def note_auth_failure(self, addr, window_ms):
        now = now_ms()
        start = now - window_ms
        with self.d.write() as db:
            db.execute("INSERT INTO auth_failures AS a (addr, window_start, count) VALUES (?, ?, 1)"
                       " ON CONFLICT (addr) DO UPDATE SET"
                       " count = CASE WHEN a.window_start > ? THEN a.count + 1 ELSE 1 END,"
                       " window_start = CASE WHEN a.window_start > ? THEN a.window_start"
                       " ELSE ? END", (addr, now, start, start, now))
            return db.execute("SELECT count FROM auth_failures WHERE addr = ?",
                              (addr,)).fetchone()[0]

    def add_ws_token(self, token_hash, key_id, expires_ms):
        self._maybe_prune()
        with self.d.write() as db:
            db.execute("INSERT INTO ws_tokens(token_hash, key_id, expires) VALUES (?, ?, ?)",
                       (token_hash, key_id, expires_ms))

    def consume_ws_token(self, token_hash):
        now = now_ms()
        with self.d.write() as db:
            row = db.execute("SELECT key_id, expires, used FROM ws_tokens WHERE token_hash = ?"
                             + self.d.for_update, (token_hash,)).fetchone()
            why = token_refusal(row, now)
            if why:
                return why
            db.execute("UPDATE ws_tokens SET used = ? WHERE token_hash = ?", (now, token_hash))
        return usable_key(self.get_key(row[0]))

    def prune(self):
        now = now_ms()
        with self.d.write() as db:
            db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            db.execute("DELETE FROM ws_tokens WHERE expires < ?", (now - TOKEN_GRACE_MS,))
            db.execute("DELETE FROM auth_failures WHERE window_start < ?",
                       (now - AUTH_FAILURES_KEPT_MS,))

    def _maybe_prune(self):
        """Prune at most once a minute per process, on the way into a write."""
        now = now_ms()
        if now - self._pruned >= PRUNE_EVERY_MS:
            self._pruned = now
            self.prune()

    def listen(self, callback):
        return self.d.listen(callback)

    # -- upkeep ----------------------------------------------------------------
    def stats(self):
        with self.d.read(snapshot=True) as db:
            return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("teams", "devices", "events")}

    def backup(self, path):
        self.d.backup(path)

    def export_meta(self):
        with self.d.read(snapshot=True) as db:
            keys = [(k[0], k[1], unwrap(self._secret, k[0], k[2]), *k[3:]) for k in db.execute(
                "SELECT key_id, device, master, created, retired, retired_why FROM keys")]
            return {
                "teams": [(t, h, la, bytes(c), cr) for t, h, la, c, cr in db.execute(
                    "SELECT team, head, lamport, chain, created FROM teams ORDER BY team")],
                "devices": db.execute("SELECT " + ", ".join(DEVICE_COLUMNS) + " FROM devices"
                                      " ORDER BY name").fetchall(),
                "keys": keys,
                "nonces": db.execute("SELECT key_id, nonce, expires FROM nonces"
                                     " WHERE expires >= ?", (now_ms(),)).fetchall(),
            }

    def import_meta(self, meta):
        with self.d.write() as db:
            many = self.d.many
            many(db, "INSERT INTO teams(team, head, lamport, chain, created) VALUES (?, 0, 0, ?, ?)"
                     " ON CONFLICT DO NOTHING", [(t[0], GENESIS, t[4]) for t in meta["teams"]])
            many(db, "INSERT INTO devices(" + ", ".join(DEVICE_COLUMNS) + ") VALUES"
                     " (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", meta["devices"])
            many(db, "UPDATE devices SET revoked = ? WHERE name = ? AND revoked IS NULL",
                 [(d[4], d[0]) for d in meta["devices"] if d[4]])
            many(db, "INSERT INTO keys(key_id, device, master, created, retired, retired_why)"
                     " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [(k[0], k[1], self._wrap(k[0], k[2]), *k[3:]) for k in meta["keys"]])
            many(db, "UPDATE keys SET retired = ?, retired_why = ? WHERE key_id = ?"
                     " AND retired IS NULL", [(k[4], k[5], k[0]) for k in meta["keys"] if k[4]])
            many(db, "INSERT INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)"
                     " ON CONFLICT DO NOTHING", meta["nonces"])

    def export_events(self, team, after, limit):
        with self.d.read() as db:
            return db.execute("SELECT " + ", ".join(STORED_COLUMNS) + " FROM events"
                              " WHERE team = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (team, after, limit)).fetchall()

    def import_events(self, team, rows):
        try:
            self._import_events(team, rows)
        except self.d.data_error as e:
            raise StoreError(f"team '{team}': events {rows[0][0]}-{rows[-1][0]} hold text"
                             f" this database cannot store: {str(e).strip().splitlines()[0]}"
                             " (a NUL character, which sk 0.2.0 let through)") from None

    def _import_events(self, team, rows):
        with self.d.write() as db:
            head, lamport, chain = db.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = ?" + self.d.for_update,
                (team,)).fetchone()
            head, lamport, chain, rows = follow(team, head, lamport, bytes(chain), rows)
            self.d.insert_many(db, "events", ("team", *STORED_COLUMNS), [(team, *r) for r in rows])
            db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                       (head, lamport, chain, team))
            self.d.notify(db, team)

    def same_database(self, other):
        return isinstance(other, SQLStore) and self.d.same(other.d)

    def reset(self):
        self.d.reset()

    def close(self):
        self.d.close()
