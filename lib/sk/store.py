"""The device's local SQLite file: the event log, the unstamped table, the Lamport
clock, the pull cursor and sync bookkeeping, all in one file so that each change
to them is one transaction. (The resolved state lives in the same file, in tables
that resolve.py owns.)

The ``unstamped`` table is a documented interface (see sk-stamp(1)): any program
may INSERT rows into it and run ``sk-stamp``.
"""

import contextlib
import os
import sqlite3
import uuid
from datetime import datetime, timezone

from .errors import ConfigError, IntegrityError
from .event import FIELDS, Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unstamped (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT,
    event_type     TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    payload        TEXT NOT NULL DEFAULT '{}',
    timestamp      TEXT,
    checked        INTEGER NOT NULL DEFAULT 0,  -- 1: sk-append validated it (leave it out)
    actor          TEXT                          -- who made it (optional)
);
CREATE TABLE IF NOT EXISTS events (
    seq            INTEGER PRIMARY KEY,
{envelope},
    status         TEXT NOT NULL,   -- queued | sent | local_only | remote
    applied        INTEGER NOT NULL DEFAULT 0,
    stamped_at     TEXT,            -- local time it was stamped (queue age)
    extra          TEXT,            -- JSON: what else its sealed content says (actor, ...)
    UNIQUE (event_id)
);
-- events the server refused for good, set aside out of the log with the reason
CREATE TABLE IF NOT EXISTS rejected (
    seq            INTEGER PRIMARY KEY,
{envelope},
    reason         TEXT NOT NULL,
    rejected_at    TEXT NOT NULL,
    extra          TEXT
);
CREATE INDEX IF NOT EXISTS events_queued ON events(seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS events_unapplied ON events(seq) WHERE applied = 0;
CREATE INDEX IF NOT EXISTS events_local ON events(seq) WHERE status = 'local_only';
CREATE INDEX IF NOT EXISTS events_aggregate ON events(aggregate_type, aggregate_id);
-- the event behind a (node, clock) stamp: blame, snapshots
CREATE INDEX IF NOT EXISTS events_stamp ON events(node_id, lamport_clock);
-- a server's "duplicate" is a claim that the team's log holds the event already: the
-- device takes it as sent, and keeps the claim until a pull shows the event on the log
-- (sk.sync.confirm_claims): a server that says so of an event it does not hold
-- cannot drop it unnoticed
CREATE TABLE IF NOT EXISTS claims (event_id TEXT PRIMARY KEY);
-- this device's queued events a pull showed on the log (pushed before, their answer
-- lost): the "duplicate" they are answered next holds already
CREATE TABLE IF NOT EXISTS seen_queued (event_id TEXT PRIMARY KEY);
-- the team keys this device holds (sk.keyring): whoever reads this file reads the log
-- anyway, so they are kept as the log is, in a file of mode 600
CREATE TABLE IF NOT EXISTS team_keys (
    team       TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    key        BLOB NOT NULL,
    granted_by TEXT NOT NULL,
    received   TEXT NOT NULL,
    PRIMARY KEY (team, epoch)
);
"""
# the event's fields, as both tables that hold events declare them
SCHEMA = SCHEMA.replace("{envelope}", ",\n".join(
    f"    {f:<14} {'INTEGER' if f == 'lamport_clock' else 'TEXT'} NOT NULL" for f in FIELDS))
SCHEMA_VERSION = "3"
CHUNK = 5000
COLUMNS = ", ".join(FIELDS)


def _in(db, sql, ids, *args):
    """Run `sql`, whose "{ids}" stands for a list of placeholders, for `ids`, 500 a
    statement, `args` bound before them; returns the rows it read."""
    ids, out = list(ids), []
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        out += db.execute(sql.format(ids=",".join("?" * len(part))), [*args, *part]).fetchall()
    return out


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def by_pairs(db, sql, pairs, chunk=400):
    """The rows of `sql` for the (a, b) `pairs`, `chunk` pairs a query: sql reads
    FROM {pairs} AS k JOIN t ON t.a = k.column1 AND t.b = k.column2, and {pairs}
    becomes their VALUES list. A join, by the table's index: "(a, b) IN (VALUES ...)"
    is a scan of the whole table in SQLite."""
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        yield from db.execute(sql.format(pairs="(VALUES " + ",".join(["(?, ?)"] * len(part)) + ")"),
                              [x for p in part for x in p])


class LocalStore:
    """One device's SQLite file. Writers take BEGIN IMMEDIATE; readers never block."""

    def __init__(self, path, create=True):
        """Open the device's file; create=False (read-only commands) creates nothing:
        no home, no file, no node id."""
        path = os.fspath(path)
        home = os.path.dirname(os.path.abspath(path))
        if os.path.exists(home) and not os.path.isdir(home):
            raise ConfigError(f"SK_HOME '{home}' is not a directory")
        if not create and not os.path.exists(path):
            raise ConfigError(f"no local log at '{path}' yet: run 'sk-append' or 'sk sync' first")
        if create:
            from .config import make_home
            make_home(home)
        try:
            if not os.path.exists(path):  # private from the start: it may hold secrets
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, timeout=60, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=60000")
            if self.meta("schema") != SCHEMA_VERSION:
                with self.write():
                    self._create(self.meta("schema"))
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"cannot open local log '{path}': {e}") from None
        self.path = path

    def _create(self, version):
        """The schema, or schema 1 (sk 0.3.0) brought to 3: events keep the extra of
        their sealed content (actor, ...), the team keys get their table, and a log
        that synced before end-to-end encryption may read its team's events that
        the server still holds in plaintext, until a member seals them; schema 2
        gets the tables of the server's "duplicate" claims."""
        if version == "1":
            for table in ("events", "rejected"):
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN extra TEXT")
            self.db.execute("ALTER TABLE unstamped ADD COLUMN actor TEXT")
            if int(self.meta("cursor", "0")) > 0:
                self.put("legacy_trust", 1)
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                self.db.execute(stmt)
        self.put("schema", SCHEMA_VERSION)

    # -- transactions and meta -------------------------------------------------
    @contextlib.contextmanager
    def write(self):
        """A write transaction (BEGIN IMMEDIATE); commits on success."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def read(self):
        """A consistent snapshot for several reads."""
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
            self.db.execute("COMMIT")

    def meta(self, key, default=None):
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return default
        return row[0] if row else default

    def put(self, key, value):
        """Set a meta value inside a write()."""
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def set_meta(self, **values):
        with self.write():
            for k, v in values.items():
                self.put(k, v)

    def node_id(self):
        """This device's stable node id, created once."""
        node = self.meta("node_id")
        if node is None:
            with self.write():
                node = self.meta("node_id")
                if node is None:
                    node = str(uuid.uuid4())
                    self.put("node_id", node)
        return node

    def clock(self):
        return int(self.meta("clock", "0"))

    def cursor(self):
        return int(self.meta("cursor", "0"))

    def known(self):
        """The last point of the server's log this device saw: (seq, chain hex), or
        None. Every push and pull shows it to the server, which says when its log
        is no longer the one the device saw (restored from an older copy)."""
        value = self.meta("known", "")
        if not value:
            return None
        seq, _, chain = value.partition(":")
        return int(seq), chain

    def _see(self, seq, chain):
        """Keep (seq, chain) as the known point if it is not behind the one kept."""
        if chain and (self.known() or (0,))[0] <= seq:
            self.put("known", f"{int(seq)}:{chain}")

    key_id = None   # the key this device talks with (sk.keyring sets it): its team's

    def switch_team(self, team, moved=False):
        """Note the team the server says this device's key belongs to. If it is
        another team than before, this device reads that team's log from its start,
        and the events it holds from the old team stay out of any healing. True if
        the team changed. A registered key never changes team, so only a new key
        moves a device (`sk sync setup`: moved); a server that says the key it knows
        moved is refused (IntegrityError), or it could drop the events it accepted
        meanwhile by moving the device out of its team and back."""
        if self.meta("team") == team:   # every answer says so: no write lock for that
            return False
        with self.write() as db:
            before = self.meta("team")
            if before == team:
                return False
            if (before is not None and not moved and self.key_id is not None
                    and self.meta("team_key") == self.key_id):
                raise IntegrityError(
                    f"the server says this device's key belongs to team '{team}' now, but it"
                    f" was given in team '{before}', and a key never changes team: refused;"
                    " to move this device, run 'sk sync setup' with a key of the other team")
            if self.key_id is not None:
                self.put("team_key", self.key_id)
            self.put("team", team)
            if before is None:
                return False
            self._from_start()
            self.put("team_from", db.execute("SELECT coalesce(max(seq), 0) FROM events")
                      .fetchone()[0])
            db.execute("DELETE FROM claims")        # what the old team's server claimed
            db.execute("DELETE FROM seen_queued")
            return True

    def heal(self):
        """The server's log is not the one this device saw: queue every event this
        device holds of its team to push again (the server drops those it has), and
        pull from the start. Returns how many were queued again."""
        with self.write() as db:
            n = db.execute("UPDATE events SET status = 'queued' WHERE status IN"
                           " ('sent', 'remote') AND seq > ?",
                           (int(self.meta("team_from", "0")),)).rowcount
            self._from_start()
            return n

    def _from_start(self):
        """Read the team's log again from its start, knowing no point of it."""
        self.put("cursor", 0)
        self.put("cursor_chain", "")
        self.put("known", "")

    def cursor_chain(self):
        """The chain value of the team's log at the cursor (bytes; the genesis at 0),
        or None if it is not known (a log from before protocol 2): a pull checks
        that what it reads continues it."""
        value = self.meta("cursor_chain")
        if value:
            return bytes.fromhex(value)
        return bytes(32) if self.cursor() == 0 else None

    def team_keys(self, team):
        return [(e, bytes(k)) for e, k in self.db.execute(
            "SELECT epoch, key FROM team_keys WHERE team = ?", (team,))]

    def add_team_key(self, team, epoch, key, granted_by):
        with self.write() as db:
            db.execute("INSERT OR IGNORE INTO team_keys(team, epoch, key, granted_by, received)"
                       " VALUES (?, ?, ?, ?, ?)", (team, epoch, key, granted_by, utc_now()))

    def own_events(self):
        """(node_id, highest Lamport clock this log has stamped): a pull may leave
        out this node's events up to there, which are in the log already. A log put
        back from an older copy has a lower mark, so what it lost comes back."""
        return self.node_id(), int(self.meta("stamped_max", "0"))

    # -- append and stamp ------------------------------------------------------
    def append(self, events, actor=None, known=None):
        """Insert validated (see event.check_new) events into `unstamped` in one
        transaction: if the iterable raises, nothing is appended. `actor`: who made
        them (a person, or an agent and its model), sealed with them. Returns how
        many were appended.

        With a list `known`, an event whose event_id the log holds already is not
        appended: with the same content it is a duplicate, else it is set aside
        (the `rejected` table) with the reason; `known` gets (event_id,
        "duplicate" | "rejected", reason) for each."""
        import itertools
        events = iter(events)
        count = 0
        with self.write() as db:
            while True:
                chunk = list(itertools.islice(events, CHUNK))
                if not chunk:
                    break
                if known is not None:
                    chunk = self._drop_known(chunk, actor, known)
                db.executemany(
                    "INSERT INTO unstamped(event_id, event_type, aggregate_type, aggregate_id,"
                    " payload, timestamp, checked, actor) VALUES (:event_id, :event_type,"
                    " :aggregate_type, :aggregate_id, :payload, :timestamp, 1, :actor)",
                    [{**ev, "actor": actor} for ev in chunk])
                count += len(chunk)
        return count

    def _drop_known(self, chunk, actor, known):
        """The events of `chunk` whose id the log (or this append) does not hold yet;
        the others are said in `known`, and set aside when their content differs."""
        held = self._known_content([ev["event_id"] for ev in chunk if ev.get("event_id")])
        keep = []
        for ev in chunk:
            eid = ev.get("event_id")
            if not eid or eid not in held:
                if eid:
                    held[eid] = _content(ev["event_type"], ev["aggregate_type"],
                                         ev["aggregate_id"], ev["payload"])
                keep.append(ev)
                continue
            mine = _content(ev["event_type"], ev["aggregate_type"], ev["aggregate_id"],
                            ev["payload"])
            if mine == held[eid]:
                known.append((eid, "duplicate", None))
                continue
            reason = reused_id_reason(eid)
            self._set_aside_new(ev, reason)
            known.append((eid, "rejected", reason))
        return keep

    def _known_content(self, ids):
        """{event_id: content} of those of `ids` the log holds (see _content)."""
        out = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for eid, *fields in self.db.execute(
                    "SELECT event_id, event_type, aggregate_type, aggregate_id, payload"
                    " FROM events WHERE event_id IN (" + ",".join("?" * len(chunk)) + ")",
                    chunk):
                out[eid] = _content(*fields)
        return out

    def _set_aside_new(self, ev, reason):
        """Keep an event that never entered the log in `rejected`, with the reason
        (inside a write())."""
        seq = self.db.execute("SELECT max(s) FROM (SELECT max(seq) s FROM events UNION ALL"
                              " SELECT max(seq) FROM rejected UNION ALL SELECT 0)").fetchone()[0]
        self.db.execute(
            "INSERT INTO rejected(seq, " + COLUMNS + ", reason, rejected_at) VALUES"
            " (?,?,?,?,?,?,?,?,?,?,?)",
            (seq + 1, ev["event_id"], ev["event_type"], ev["aggregate_type"],
             ev["aggregate_id"], 0, self.node_id(), ev["payload"],
             ev.get("timestamp") or utc_now(), reason, utc_now()))

    def stamp(self, never_sync, on_event=None, dry_run=False):
        """Stamp every valid unstamped row in one transaction.

        Returns (stamped, local_only, duplicates, problems): duplicates are rows whose
        event_id is already in the log with the same content (the same event;
        dropped), problems a list of (unstamped seq, reason) for rows left in place
        because they break a rule, and for rows whose event_id the log holds with
        other content (set aside in `rejected`, with the reason). on_event("stamped",
        Event, status) for each event stamped. dry_run: count and tell, change
        nothing (the ids to be made are shown as "(new id)").
        """
        from .history import WriterView
        node = (self.meta("node_id") or "(new node)") if dry_run else self.node_id()
        stamped = local_only = duplicates = 0
        problems = []
        with (self.read() if dry_run else self.write()) as db:
            if db.execute("SELECT 1 FROM unstamped LIMIT 1").fetchone() is None:
                return 0, 0, 0, []   # (a no-op stamp touches nothing)
            clock = self.clock()
            last = 0
            view = WriterView(self)
            seen = {} if dry_run else None
            while True:
                rows = db.execute(
                    "SELECT seq, event_id, event_type, aggregate_type, aggregate_id, payload,"
                    " timestamp, checked, actor FROM unstamped WHERE seq > ? ORDER BY seq"
                    " LIMIT ?", (last, CHUNK)).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                out, done, dups, clock = self._stamp_chunk(rows, node, clock, never_sync,
                                                           problems, view, seen)
                if on_event:
                    for r in out:
                        on_event("stamped", Event(*r[:8]), r[8])
                if not dry_run:
                    db.executemany(
                        "INSERT INTO events(" + COLUMNS + ", status, stamped_at, extra)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?)", out)
                    if len(done) == len(rows):
                        db.execute("DELETE FROM unstamped WHERE seq <= ?", (last,))
                    else:
                        db.executemany("DELETE FROM unstamped WHERE seq = ?", done)
                stamped += len(out)
                duplicates += dups
                local_only += sum(1 for r in out if r[8] == "local_only")
            if not dry_run:
                self.put("clock", clock)
                if stamped:
                    self.put("stamped_max", clock)
        return stamped, local_only, duplicates, problems

    def _stamp_chunk(self, rows, node, clock, never_sync, problems, view, seen=None):
        """Stamp one chunk of unstamped rows: (rows to insert, [(unstamped seq,)]
        done, duplicates, clock). A row that breaks a rule goes to `problems`, and
        so does one whose event_id the log holds with other content (set aside).
        Each event records what its writer had seen (history.WriterView). seen:
        {event_id: content} of a dry run's earlier chunks (nothing is inserted)."""
        from .event import MAX_LAMPORT, EventError, is_deletion, loads, new_event_id
        now = utc_now()
        out, done, dups = [], [], 0
        # ids stamped in earlier chunks are in `events` already (same transaction)
        known = self._known_content([r[1] for r in rows if isinstance(r[1], str)])
        if seen is not None:
            known.update(seen)
        for seq, eid, etype, atype, aid, payload, ts, checked, actor in rows:
            if checked != 1:  # written by another program: every rule applies
                try:
                    eid, payload, ts = _check_unstamped(eid, etype, atype, aid, payload, ts)
                except EventError as e:
                    problems.append((seq, str(e)))
                    continue
            if eid is not None:
                content = _content(etype, atype, aid, payload)
                if eid in known:
                    done.append((seq,))
                    if known[eid] == content:
                        dups += 1
                        continue
                    reason = reused_id_reason(eid)
                    problems.append((seq, reason + "; set aside (sk-log --rejected)"))
                    if seen is None:
                        self._set_aside_new({"event_id": eid, "event_type": etype,
                                             "aggregate_type": atype, "aggregate_id": aid,
                                             "payload": payload, "timestamp": ts}, reason)
                    continue
                known[eid] = content
            clock += 1
            if clock > MAX_LAMPORT:
                raise ConfigError("the Lamport clock reached 2^63-1 (a peer sent an"
                                  " event stamped at the limit); nothing was stamped")
            status = "local_only" if never_sync.matches(atype, aid, etype) else "queued"
            keys = () if is_deletion(etype) else loads(payload).keys()
            out.append((eid or (new_event_id() if seen is None else "(new id)"), etype, atype,
                        aid, clock, node, payload, ts or now, status, now,
                        view.extra(atype, aid, keys, (clock, node), actor)))
            done.append((seq,))
        if seen is not None:
            seen.update(known)
        return out, done, dups, clock

    def new_node(self):
        """Give this home a node id of its own (a copied or restored home shares
        its node id with another): every unsent event it stamped is stamped again
        under the new id, with a new event id and the next clock values, and the
        state is rebuilt. Returns (old node id, new node id, events stamped again)."""
        from .event import new_event_id
        with self.write() as db:
            old = self.node_id()
            new = str(uuid.uuid4())
            clock = self.clock()
            rows = db.execute("SELECT seq FROM events WHERE stamped_at IS NOT NULL AND status"
                              " IN ('queued', 'local_only') ORDER BY seq").fetchall()
            for (seq,) in rows:
                clock += 1
                db.execute("UPDATE events SET event_id = ?, node_id = ?, lamport_clock = ?"
                           " WHERE seq = ?", (new_event_id(), new, clock, seq))
            self.put("node_id", new)
            self.put("clock", clock)
            self.put("stamped_max", clock)
            self.put("needs_rebuild", 1)
        return old, new, len(rows)

    # -- push side -------------------------------------------------------------
    def queued(self, limit, after=0):
        """Up to `limit` queued events after local seq `after`: [(seq, Event, relay,
        extra)], relay True for an event pulled from another device (queued again to
        give it back to a restored server), extra what its sealed content says beside
        the envelope (history: its JSON text, sealed as it is) or None."""
        rows = self.db.execute(
            "SELECT seq, " + COLUMNS + ", stamped_at IS NULL, extra FROM events"
            " WHERE status = 'queued' AND seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [(r[0], Event(*r[1:9]), bool(r[9]), r[10]) for r in rows]

    def mark_pushed(self, results, point=None, seqs=None):
        """Apply the server's per-event results atomically.

        `results` is [(event_id, status, reason)] with status accepted|duplicate|rejected;
        `point` the (head, chain) of the server's log after the push; `seqs`, when
        given, the local seq of each (as queued() gave them: found by rowid, not by
        the id's index). Events pulled from others and pushed again (heal) go back
        to 'remote'.
        """
        done = ("accepted", "duplicate")
        if seqs is not None:
            where = "seq = ? AND event_id = ?"
            sent = [(seq, eid) for seq, (eid, st, _) in zip(seqs, results) if st in done]
        else:
            where = "event_id = ?"
            sent = sorted((eid,) for eid, st, _ in results if st in done)  # the index in order
        with self.write() as db:
            # a "duplicate" claims the log holds the event: kept for those this answer
            # takes out of the queue (another push of it may have been answered already)
            claimed = [r[0] for r in _in(
                db, "SELECT event_id FROM events WHERE status = 'queued' AND event_id IN ({ids})",
                (eid for eid, st, _ in results if st == "duplicate"))]
            if not self._mark_run(db, sent if seqs is not None and len(sent) == len(results)
                                  else None):
                db.executemany("UPDATE events SET status = CASE WHEN stamped_at IS NULL"
                               " THEN 'remote' ELSE 'sent' END WHERE " + where +
                               " AND status = 'queued'", sent)
            accepted = [eid for eid, st, _ in results if st == "accepted"]
            self._claim(db, claimed, accepted)
            if point:
                self._see(*point)
                self._follow_own(point, accepted)
            for eid, st, reason in results:
                if st == "rejected":
                    self._set_aside(db, eid, reason or "rejected by server")

    @staticmethod
    def _claim(db, duplicates, accepted):
        """Keep the server's "duplicate" for each of `duplicates` as a claim, but for
        those a pull has shown on the log already (seen_queued)."""
        if not duplicates and not accepted:
            return
        seen = set()
        if db.execute("SELECT 1 FROM seen_queued LIMIT 1").fetchone():
            ids = duplicates + accepted
            seen.update(r[0] for r in _in(
                db, "SELECT event_id FROM seen_queued WHERE event_id IN ({ids})", ids))
            _in(db, "DELETE FROM seen_queued WHERE event_id IN ({ids})", ids)
        db.executemany("INSERT OR IGNORE INTO claims(event_id) VALUES (?)",
                       [(eid,) for eid in duplicates if eid not in seen])

    def claims(self):
        """The event ids a server answered "duplicate" for that no pull has shown on
        the team's log yet."""
        return [r[0] for r in self.db.execute("SELECT event_id FROM claims ORDER BY event_id")]

    def count_queued(self, upto):
        """How many events are queued up to local seq `upto` (the queue's index)."""
        return self.db.execute("SELECT count(*) FROM events WHERE status = 'queued' AND"
                               " seq <= ?", (int(upto),)).fetchone()[0]

    def count_claims(self):
        """How many claims() there are (0 in a file from before them)."""
        try:
            return self.db.execute("SELECT count(*) FROM claims").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def settle_claims(self, ids, missing):
        """A read of the whole log settled the claims about `ids`: drop them, and
        queue again those of `missing` (not on the log) this device still holds of
        its team as sent. Returns how many were queued again."""
        with self.write() as db:
            _in(db, "DELETE FROM claims WHERE event_id IN ({ids})", sorted(ids))
            before = db.total_changes
            _in(db, "UPDATE events SET status = 'queued' WHERE status IN ('sent', 'remote')"
                    " AND seq > ? AND event_id IN ({ids})", sorted(missing),
                int(self.meta("team_from", "0")))
            return db.total_changes - before

    @staticmethod
    def _on_log(db, ids):
        """A pull showed `ids` on the team's log: the claims about them hold, and
        those of this device's events still queued (a first push whose answer was
        lost, a relay) will be answered "duplicate" rightly."""
        if db.execute("SELECT 1 FROM claims LIMIT 1").fetchone():
            _in(db, "DELETE FROM claims WHERE event_id IN ({ids})", ids)
        if db.execute("SELECT 1 FROM events WHERE status = 'queued' LIMIT 1").fetchone():
            _in(db, "INSERT OR IGNORE INTO seen_queued(event_id) SELECT event_id FROM events"
                    " WHERE status = 'queued' AND event_id IN ({ids})", ids)

    @staticmethod
    def _mark_run(db, sent):
        """Mark sent [(seq, event_id)], in seq order, in one statement when they are
        exactly the queued events from the first seq to the last (as queued() read
        them, and nothing changed since): True if it did. One statement over a run
        of the log instead of a statement an event."""
        if not sent:
            return False
        lo, hi = sent[0][0], sent[-1][0]
        have = db.execute("SELECT count(*), group_concat(event_id, ',') FROM (SELECT event_id"
                          " FROM events WHERE status = 'queued' AND seq BETWEEN ? AND ?"
                          " ORDER BY seq)", (lo, hi)).fetchone()
        if have[0] != len(sent) or have[1] != ",".join(eid for _, eid in sent):
            return False
        db.execute("UPDATE events SET status = CASE WHEN stamped_at IS NULL THEN 'remote'"
                   " ELSE 'sent' END WHERE status = 'queued' AND seq BETWEEN ? AND ?", (lo, hi))
        return True

    def _follow_own(self, point, accepted):
        """Move the cursor over this push's own events when the server's log after it
        is the cursor's plus exactly them, in order: the hash chain they make from the
        cursor's must be the one the server answered. A pull would read back only
        their ids, to check that same chain."""
        cursor, chain = self.cursor(), self.cursor_chain()
        if not accepted or chain is None or point[0] != cursor + len(accepted):
            return
        from .sealed import chain_next
        for eid in accepted:
            chain = chain_next(chain, eid)
        if chain.hex() == point[1]:
            self.put("cursor", point[0])
            self.put("cursor_chain", point[1])

    def set_aside(self, event_id, reason):
        with self.write() as db:
            self._set_aside(db, event_id, reason)

    def _set_aside(self, db, event_id, reason):
        """Move a queued event out of the log into `rejected`: it is not part of the
        team's log, so it must not shape the state, nor block the event the server
        holds under the same id."""
        row = db.execute("SELECT applied FROM events WHERE event_id = ? AND status = 'queued'",
                         (event_id,)).fetchone()
        if row is None:
            return
        # its seq, unless an event that never entered the log has it there already
        # (sk-append of a reused id, _set_aside_new): then the next free one
        db.execute("INSERT INTO rejected(seq, " + COLUMNS + ", reason, rejected_at)"
                   " SELECT CASE WHEN seq IN (SELECT seq FROM rejected) THEN (SELECT max(s) + 1"
                   " FROM (SELECT max(seq) s FROM events UNION ALL SELECT max(seq) FROM"
                   " rejected)) ELSE seq END, " + COLUMNS + ", ?, ? FROM events"
                   " WHERE event_id = ?", (reason, utc_now(), event_id))
        db.execute("DELETE FROM events WHERE event_id = ?", (event_id,))
        if row[0]:
            self.put("needs_rebuild", 1)  # it was folded into the state already

    def requeue_rejected(self):
        """Queue set-aside events again (those whose id the log has not taken since)."""
        with self.write() as db:
            before = db.total_changes
            db.execute("INSERT OR IGNORE INTO events(seq, " + COLUMNS +
                       ", status, stamped_at) SELECT seq, " + COLUMNS +
                       ", 'queued', rejected_at FROM rejected"
                       " WHERE event_id NOT IN (SELECT event_id FROM events)")
            moved = db.total_changes - before
            db.execute("DELETE FROM rejected WHERE event_id IN (SELECT event_id FROM events"
                       " WHERE status = 'queued')")
            return moved

    # -- pull side -------------------------------------------------------------
    def receive(self, rows, cursor, point=None, extras=None, chain=None, applied=False,
                fold=None, own=None):
        """Store pulled events (Events, validated; extras: their JSON extra text or
        None), advance the Lamport clock past them and move the cursor forward to
        `cursor` with its `chain` (never back, so a watcher and a sync on one device
        can't undo each other), and keep `point` (seq, chain) of the server's log,
        in one transaction. Returns how many were new. applied: the state holds
        them already (the history before a shallow device's snapshot). fold: a
        callable fold(db) that folds them into the state in this transaction
        (sk.resolve.Folder), called when every one of them is new here and no
        event held here waits to be folded (this device's own come first, in the
        order it wrote them); otherwise they are left for sk-resolve, as without it.
        own: the ids of this device's events the page showed without their bodies
        (they are in the log here), when the page is chained from the cursor's known
        chain: with the rows', what the pull saw on the log (None: not so chained)."""
        insert = ("INSERT OR IGNORE INTO events(event_id, event_type, aggregate_type, aggregate_id,"
                  " lamport_clock, node_id, payload, timestamp, status, extra, applied)"
                  " VALUES (?,?,?,?,?,?,?,?,'remote',?,{})")
        values = [(*r, x) for r, x in zip(rows, extras or [None] * len(rows))]
        folded = False
        with self.write() as db:
            before, new = db.total_changes, 0
            if (fold is not None and rows and not applied and not db.execute(
                    "SELECT 1 FROM events WHERE applied = 0 LIMIT 1").fetchone()):
                db.execute("SAVEPOINT fold")
                db.executemany(insert.format(1), values)
                new = db.total_changes - before
                if new == len(rows):
                    fold(db)
                    folded = True
                else:   # some are held here already: all of them left for sk-resolve
                    db.execute("ROLLBACK TO fold")
                db.execute("RELEASE fold")
            if not folded:
                before = db.total_changes
                db.executemany(insert.format(int(bool(applied))), values)
                new = db.total_changes - before
            if own is not None and (rows or own):
                self._on_log(db, [r.event_id for r in rows] + list(own))
            if rows:
                top = max(r.lamport_clock for r in rows)
                self.put("clock", max(self.clock(), top) + 1)
            if int(cursor) > self.cursor():
                self.put("cursor", int(cursor))
                self.put("cursor_chain", chain.hex() if chain else "")
            if point:
                self._see(*point)
        return new

    # -- reading ---------------------------------------------------------------
    def counts(self, totals=True):
        """How many events are in each state. totals=False leaves out the counts
        of sent and remote events, which take a scan of the whole log: what is
        left is read from small partial indexes, however long the log."""
        with self.read() as db:
            one = lambda sql: (db.execute(sql).fetchone() or (None,))[0]  # noqa: E731
            out = {
                "queued": one("SELECT count(*) FROM events WHERE status = 'queued'"),
                "rejected": one("SELECT count(*) FROM rejected"),
                "local_only": one("SELECT count(*) FROM events WHERE status = 'local_only'"),
                "unstamped": one("SELECT count(*) FROM unstamped"),
                "unapplied": one("SELECT count(*) FROM events WHERE applied = 0"),
                "oldest_queued": one("SELECT stamped_at FROM events WHERE status = 'queued'"
                                     " ORDER BY seq LIMIT 1"),
            }
            if totals:
                by_status = dict(db.execute(
                    "SELECT status, count(*) FROM events GROUP BY status").fetchall())
                out["sent"] = by_status.get("sent", 0)
                out["remote"] = by_status.get("remote", 0)
        return out

    def log(self, aggregate_type=None, aggregate_id=None, event_type=None, status=None,
            after=0, limit=None):
        """Yield log entries (dicts with every envelope field, plus status/reason/seq)."""
        where, args = ["seq > ?"], [after]
        aside = status == "rejected"
        for col, val in (("aggregate_type", aggregate_type), ("aggregate_id", aggregate_id),
                         ("event_type", event_type), ("status", None if aside else status)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = ("SELECT seq, " + COLUMNS
               + (", 'rejected', reason FROM rejected WHERE " if aside
                  else ", status, NULL FROM events WHERE ")
               + " AND ".join(where) + " ORDER BY seq")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.db.execute(sql, args):
            ev = Event(*row[1:9]).to_dict()
            ev["status"] = row[9]
            if row[10] is not None:
                ev["reason"] = row[10]
            ev["seq"] = row[0]
            yield ev

    # -- sync bookkeeping ------------------------------------------------------
    def record_outcome(self, ok, error=None):
        """Remember a network run: success resets the failure count."""
        now = utc_now()
        with self.write():
            if ok:
                self.put("last_success", now)
                self.put("failures_since", 0)
            else:
                self.put("failures_since", int(self.meta("failures_since", "0")) + 1)
                self.put("last_failure", now)
                self.put("last_error", error or "unknown error")

    def close(self):
        self.db.close()


def open_store(config, create=True):
    return LocalStore(config.db_path, create=create)


def _content(etype, atype, aid, payload):
    """What makes two events with one event_id the same event: type, aggregate and
    payload (as JSON values: spacing and key order do not count)."""
    from .event import loads
    try:
        body = loads(payload) if isinstance(payload, (str, bytes)) else payload
    except (ValueError, RecursionError):
        body = payload
    import json
    try:
        body = json.dumps(body, sort_keys=True)
    except (TypeError, ValueError):
        body = repr(body)
    return etype, atype, aid, body


def reused_id_reason(eid):
    return f"event id {eid} is in the log already with other content"


def _check_unstamped(eid, etype, atype, aid, payload, ts):
    """A row another program wrote into `unstamped`: every rule applies. Returns
    (event_id, payload text, timestamp) normalised, or raises EventError."""
    from .event import EventError, check_new, loads
    try:
        payload_obj = loads(payload)
    except (TypeError, ValueError, RecursionError):
        raise EventError("payload is not JSON") from None
    ev = check_new({"event_id": eid, "event_type": etype, "aggregate_type": atype,
                    "aggregate_id": aid, "payload": payload_obj, "timestamp": ts})
    return ev["event_id"], ev["payload"], ev["timestamp"]

