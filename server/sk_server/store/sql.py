"""The one SQL implementation of the store, over a dialect (sqlite.py,
postgresql.py) that says how each thing is said on its database.

SQL here is written with ? placeholders; a dialect translates. Every write is
one transaction; a push takes its team's row first (`dialect.for_update`), so
each team's sequence is dense and in commit order, and a pull reads from one
consistent snapshot.
"""

import contextlib

from sk import crypto

from sk import sealed

from .base import (GENESIS, UNREADABLE, Damaged, KeyRecord, Page, Pushed, Store, StoreError, chain_next, check_known,
                   cut_page, follow, node_taken, now_ms, number, plan_push, rekey_needed,
                   secret_check, token_refusal, unwrap, usable_key, utc_now)
from .schema import (BATCH_COLUMNS, DEVICE_COLUMNS, LEGACY_COLUMNS, STORED_COLUMNS, statements,
                     upgrade)

# a page's rows: the event, its batch and what it costs there, or its legacy payload's
# a batch's size is looked up once a batch, not joined to each of its rows: in SQLite
# the size column sits after the sealed blob, so each joined row walked its overflow pages
SELECT_PAGE = ("SELECT e.seq, e.event_id, e.batch, e.idx, e.chain, {octets},"
               " e.device, e.node_id, e.lamport_clock FROM events e"
               " LEFT JOIN legacy l ON l.team = e.team AND l.seq = e.seq"
               " WHERE e.team = ? AND e.seq > ? ORDER BY e.seq LIMIT ?")


class _Refused(Exception):
    """Raised inside a transaction to roll all of it back, and say why."""
LEGACY_COST = 300                  # a legacy event's envelope, beside its payload
SELECT_KEY = ("SELECT k.key_id, k.device, d.team, k.master, k.retired, k.retired_why, d.revoked"
              " FROM keys k JOIN devices d ON d.name = k.device WHERE k.key_id = ?")
TOKEN_GRACE_MS = 3600_000          # used tokens are kept an hour past their expiry
AUTH_FAILURES_KEPT_MS = 600_000    # failure counts older than this are deleted
PRUNE_EVERY_MS = 60_000


class SQLStore(Store):
    def __init__(self, dialect, secret=None):
        self.d = dialect
        self._pruned = 0
        self._select_page = SELECT_PAGE.format(octets=dialect.octets("l.payload"))
        with self.d.write(schema=True) as db:
            self.d.create_schema(db, statements(self.d.words),
                                 lambda: upgrade(db, self.d.words, lambda t: self.d.columns(db, t)))
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
    def create_device(self, name, team, key_id, master, identity=None):
        now = utc_now()
        with self.d.write() as db:
            if db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"device '{name}' already exists (use --rotate for a new key)")
            db.execute("INSERT INTO teams(team, head, chain, created) VALUES (?, 0, ?, ?)"
                       " ON CONFLICT DO NOTHING", (team, GENESIS, now))
            db.execute("INSERT INTO devices(name, team, created, identity) VALUES (?, ?, ?, ?)",
                       (name, team, now, identity))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, self._wrap(key_id, master), now))

    def _revoked(self, db, name):
        row = db.execute("SELECT revoked FROM devices WHERE name = ?" + self.d.for_update,
                         (name,)).fetchone()
        if row is None:
            raise StoreError(f"no device named '{name}'")
        return row[0]

    def rotate_key(self, name, key_id, master, identity=None):
        """A new key (and identity) for a device; the old ones may have leaked, so the
        team writes nothing more until a member starts a new key epoch."""
        now = utc_now()
        with self.d.write() as db:
            if self._revoked(db, name):
                raise StoreError(f"device '{name}' is revoked; register a new device instead")
            db.execute("UPDATE keys SET retired = ?, retired_why = 'rotated' WHERE device = ?"
                       " AND retired IS NULL", (now, name))
            db.execute("INSERT INTO keys(key_id, device, master, created) VALUES (?, ?, ?, ?)",
                       (key_id, name, self._wrap(key_id, master), now))
            db.execute("UPDATE devices SET identity = ?, approval = NULL WHERE name = ?",
                       (identity, name))
            self._rekey(db, name)

    def revoke_device(self, name):
        """Refuse the device's key at once; the team writes nothing more until a
        member starts a new key epoch, which the revoked device never gets."""
        now = utc_now()
        with self.d.write() as db:
            if self._revoked(db, name):
                raise StoreError(f"device '{name}' is already revoked")
            db.execute("UPDATE devices SET revoked = ? WHERE name = ?", (now, name))
            db.execute("UPDATE keys SET retired = ?, retired_why = 'revoked' WHERE device = ?"
                       " AND retired IS NULL", (now, name))
            self._rekey(db, name)

    @staticmethod
    def _rekey(db, name):
        db.execute("UPDATE teams SET rekey = 1 WHERE epoch > 0 AND team = (SELECT team FROM"
                   " devices WHERE name = ?)", (name,))

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
    def _held(db, team, device):
        """The epochs whose team key a member sealed to this device (to any of its
        identities: a rotated key's device still holds what it held). Only under those
        may it write, share them, begin the next or approve: a registered device that
        was never given the key cannot store a batch no member can open, which would
        stop every member's pull at it."""
        return {r[0] for r in db.execute("SELECT DISTINCT epoch FROM grants WHERE team = ?"
                                         " AND device = ?", (team, device))}

    @staticmethod
    def _chain_at(db, team):
        return lambda seq: bytes((db.execute("SELECT chain FROM events WHERE team = ? AND seq = ?",
                                             (team, seq)).fetchone() or (b"",))[0])

    def push(self, team, device, batch, ticket=None, known=None, relay=(), queued=None):
        """Store a sealed batch of `device` (Pushed), in one transaction with its
        request's admission (ticket) and what the device says it has queued
        (`queued`, less what this push settled; sk-admin status, the metrics).
        Damaged if what the push must read (the team's head) cannot be read."""
        self._maybe_prune()
        # (a push's rows clashing with stored ones: a head or seq altered at rest, as the
        # team's row, held to the commit, orders every push of the team)
        with self._reading(also=self.d.integrity_error):
            return self._push_tx(team, device, batch, ticket, known, relay, queued)

    def _push_tx(self, team, device, batch, ticket, known, relay, queued):
        with self.d.write() as db:
            if ticket is not None and not self._admit(db, *ticket):
                return None
            got = self._push(db, team, device, batch, known, relay)
            if queued is not None:
                left = max(0, int(queued) - len(got.results))
                db.execute("UPDATE devices SET queued = ? WHERE name = ? AND (queued IS NULL OR"
                           " queued <> ?)", (left, device, left))
            return got

    def _push(self, db, team, device, batch, known, relay):
        """push(), inside its transaction."""
        now = utc_now()
        manifest, writer = batch.manifest, batch.writer
        # the team's row, held to the commit, orders this team's commits
        head, lamport, chain, epoch, rekey = db.execute(
            "SELECT head, lamport, chain, epoch, rekey FROM teams WHERE team = ?"
            + self.d.for_update, (team,)).fetchone()
        chain = bytes(chain)
        chain_at = self._chain_at(db, team)
        diverged = check_known(known, head, chain_at)
        if diverged:
            return Pushed([], head, chain, diverged)
        # the writer point (what its device had seen) must be on the log: stored off
        # it, every reader would refuse the batch for good (a device's own push names
        # its known point, checked just above)
        wseq, wchain = writer
        if (known is None or (wseq, wchain) != (known[0], known[1].hex())) and (
                wseq > head or (wseq and chain_at(wseq) != bytes.fromhex(wchain or "00"))):
            return Pushed([], head, chain, None, refused=(
                f"the batch's writer point (seq {wseq}) is not a point of this team's log of"
                f" {head} events"))
        wrong_epoch = rekey_needed((epoch, rekey), batch.epoch)
        if not wrong_epoch and batch.epoch not in self._held(db, team, device):
            wrong_epoch = {"epoch": epoch, "rotate": False}   # share it with yourself first
        if wrong_epoch:
            return Pushed([], head, chain, None, None, wrong_epoch)
        existing = {r[0]: tuple(r) for r in
                    self.d.events_by_id(db, team, [e[0] for e in manifest])}
        results, new, lamport = plan_push(manifest, existing, lamport)
        taken = self._node_taken(db, team, device,
                                 [e for i, e in new if i not in relay])
        if taken:
            return Pushed([], head, chain, None, taken)
        if new:
            number_ = db.execute("SELECT coalesce(max(batch), 0) + 1 FROM batches"
                                 " WHERE team = ?", (team,)).fetchone()[0]
            text = sealed.canonical(manifest, writer)
            self.d.insert_many(db, "batches", ("team", *BATCH_COLUMNS), [(
                team, number_, batch.epoch, text, batch.sealed,
                len(text) + len(batch.sealed), device, now)])
            numbered, head, chain = number(new, head, chain)
            self.d.insert_many(db, "events", ("team", *STORED_COLUMNS), [
                (team, seq, e[0], e[1], e[2], number_, idx, c, device, now)
                for seq, c, idx, e in numbered])
            db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                       (head, lamport, chain, team))
            self.d.notify(db, team)
        return Pushed(results, head, chain, None)

    def _node_taken(self, db, team, device, entries):
        """Why the node ids of new events (event_id, node_id, clock) of `device`,
        not relayed, are not its own, or None: a node id bound to another device,
        or a (node, clock) stamp already given to another event (a copied home).
        Unbound node ids are bound to `device` here."""
        nodes = sorted({e[1] for e in entries})
        if not nodes:
            return None
        bound = dict(db.execute("SELECT node_id, device FROM nodes WHERE team = ? AND node_id IN ("
                                + ",".join("?" * len(nodes)) + ")", (team, *nodes)).fetchall())
        stamps = {}
        for eid, node, clock in entries:
            mine = stamps.setdefault(node, {})
            if mine.setdefault(clock, eid) != eid:   # one stamp twice in this very push
                return node_taken(node, bound.get(node) or device, device, clock)
        for node in nodes:
            owner = bound.get(node)
            if owner is not None and not isinstance(owner, str):
                raise TypeError(f"node {node}'s device is not text")
            if owner is not None and owner != device:
                return node_taken(node, owner, device)
            mine = stamps[node]
            for clock, eid in db.execute(
                    "SELECT lamport_clock, event_id FROM events WHERE team = ? AND node_id = ?"
                    " AND lamport_clock BETWEEN ? AND ?",
                    (team, node, min(mine), max(mine))).fetchall():
                if not isinstance(eid, str):   # not another event: a row altered at rest
                    raise Damaged(f"the server's stored event of node {node} at clock {clock}"
                                  " has an id that cannot be read as it was written (altered at"
                                  " rest?)")
                if clock in mine and mine[clock] != eid:
                    return node_taken(node, owner or device, device, clock)
        self.d.many(db, "INSERT INTO nodes(team, node_id, device) VALUES (?, ?, ?)"
                        " ON CONFLICT DO NOTHING", [(team, n, device) for n in nodes if n not in bound])
        return None

    @contextlib.contextmanager
    def _reading(self, after=None, also=()):
        """Where the store reads back what it stored: a cell that cannot be read as it
        was written (SQLite's undecodable text, text or a word where bytes or a number
        were) is Damaged (said to the device, sealed; the cause is in the server's
        log), never an internal error."""
        try:
            yield
        except Damaged:
            raise
        except Exception as e:
            if isinstance(e, also) or self._unreadable(e):
                raise Damaged.at(after, e) from e
            raise

    def _unreadable(self, e):
        """Whether `e` is what reading a cell altered at rest raises, here."""
        return isinstance(e, UNREADABLE) or self.d.unreadable(e)

    def pull(self, team, after, limit, skip=None, known=None):
        """A Page of the team's log after seq `after` (Damaged if what is stored there
        cannot be read as it was written)."""
        with self._reading(after):
            return self._pull(team, after, limit, skip, known)

    def _pull(self, team, after, limit, skip, known):
        with self.d.read(snapshot=True) as db:
            row = db.execute("SELECT head, chain FROM teams WHERE team = ?", (team,)).fetchone()
            head, chain = row if row else (0, GENESIS)
            diverged = check_known(known, head, self._chain_at(db, team), after)
            if diverged:
                return Page([], {}, {}, after, False, None, diverged)

            sizes = {}

            def size_of(batch, seq):   # a page's batches are numbered upward: 32 a query
                if batch not in sizes:
                    sizes.update(db.execute(
                        "SELECT batch, size FROM batches WHERE team = ? AND batch BETWEEN ? AND ?",
                        (team, batch, batch + 31)).fetchall())
                    if batch not in sizes:
                        raise Damaged(f"the server's stored event at seq {seq} is in batch"
                                      f" {batch}, which it does not hold (altered at rest?)")
                return sizes[batch]

            def rows():   # (seq, event_id, batch, idx, chain, cost); left out: no batch
                # read from their own cursor: the size lookups go on beside it
                for seq, eid, batch, idx, c, legacy, dev, node, clock in self.d.iter_rows(
                        db, self._select_page, (team, after, limit + 1)):
                    if skip is not None and (dev, node) == skip[:2] and clock <= skip[2]:
                        yield seq, eid, None, None, c, 0
                    elif batch is None:
                        yield seq, eid, None, None, c, (legacy or 0) + LEGACY_COST
                    else:
                        yield seq, eid, batch, idx, c, size_of(batch, seq)
            taken, more = cut_page(rows(), limit)
            batches, legacy = {}, {}
            ids = sorted({r[2] for r in taken if r[2] is not None})
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for b, epoch, manifest, blob, dev in db.execute(
                        "SELECT batch, epoch, manifest, sealed, device FROM batches WHERE team = ?"
                        " AND batch IN (" + ",".join("?" * len(chunk)) + ")", (team, *chunk)):
                    manifest = bytes(manifest)
                    manifest.decode()   # (the wire carries it as text)
                    batches[b] = (int(epoch), manifest, bytes(blob), dev)
            plain = [r[0] for r in taken if r[2] is None and r[5]]
            for i in range(0, len(plain), 500):
                chunk = plain[i:i + 500]
                for row in db.execute(
                        "SELECT l.seq, e.node_id, e.lamport_clock, l.event_type, l.aggregate_type,"
                        " l.aggregate_id, l.payload, l.timestamp FROM legacy l JOIN events e"
                        " ON e.team = l.team AND e.seq = l.seq WHERE l.team = ? AND l.seq IN ("
                        + ",".join("?" * len(chunk)) + ")", (team, *chunk)):
                    legacy[row[0]] = tuple(row[1:])
        out = [(r[0], r[1], r[2], r[3]) for r in taken]
        if more:
            return Page(out, batches, legacy, taken[-1][0], True, bytes(taken[-1][4]), None)
        return Page(out, batches, legacy, head, False, bytes(chain), None)

    # -- snapshots (sealed by members; the server keeps the newest few) -----------------
    def put_snapshot(self, team, device, seq, chain, epoch, blob, keep=3):
        """Keep a member's sealed snapshot of the team's state as of (seq, chain);
        StoreError if that point is not on the team's log."""
        with self.d.write() as db:
            head = db.execute("SELECT head FROM teams WHERE team = ?" + self.d.for_update,
                              (team,)).fetchone()[0]
            if check_known((seq, chain), head, self._chain_at(db, team)):
                raise StoreError(f"seq {seq} with that chain is not on this team's log")
            if epoch not in self._held(db, team, device):
                raise StoreError(f"this device was not given the team key of epoch {epoch}")
            db.execute("INSERT INTO snapshots (team, seq, chain, epoch, sealed, size, device,"
                       " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (team, seq, chain, epoch, blob, len(blob), device, utc_now()))
            old = [r[0] for r in db.execute("SELECT seq FROM snapshots WHERE team = ? ORDER BY"
                                            " seq DESC", (team,)).fetchall()[keep:]]
            self.d.many(db, "DELETE FROM snapshots WHERE team = ? AND seq = ?",
                        [(team, q) for q in old])

    def snapshot(self, team):
        """(seq, chain, epoch, sealed, device) of the team's newest snapshot, or None."""
        with self._reading(), self.d.read() as db:
            row = db.execute("SELECT seq, chain, epoch, sealed, device FROM snapshots WHERE"
                             " team = ? ORDER BY seq DESC LIMIT 1", (team,)).fetchone()
            if row is None:
                return None
            seq, chain, epoch, blob, device = row
            if not isinstance(device, str):
                raise TypeError("a snapshot's device is not text")
            return int(seq), bytes(chain), int(epoch), bytes(blob), device

    def snapshot_due(self, team, every, wait_ms=60_000):
        """True (once a minute at most) when the team's log has grown `every` events
        past its newest snapshot: the device that hears it is asked for one."""
        now = now_ms()
        with self._reading(), self.d.read() as db:
            head, asked, epoch = db.execute("SELECT head, asked, epoch FROM teams WHERE team = ?",
                                            (team,)).fetchone()
            last = db.execute("SELECT coalesce(max(seq), 0) FROM snapshots WHERE team = ?",
                              (team,)).fetchone()[0]
            if not every or epoch == 0 or head - last < every or now - asked < wait_ms:
                return False
        with self.d.write() as db:
            cur = db.execute("UPDATE teams SET asked = ? WHERE team = ? AND asked = ?",
                             (now, team, asked))
            return cur.rowcount == 1

    # -- team keys (the server keeps them sealed to each device's identity) -----------
    def keys(self, team, device):
        """What a device of `team` needs to hold and share the team key: the current
        epoch, whether a new one must begin (rekey), the approval mode, the epochs,
        the grants sealed to this device's identity, every member (identity,
        revoked, approval, the epochs granted to its identity), how many events
        are still in legacy, and the epochs this device holds (was granted, to any of
        its identities): only under those may it write, share or begin the next."""
        with self._reading(), self.d.read(snapshot=True) as db:
            epoch, rekey, approval, head = db.execute(
                "SELECT epoch, rekey, approval, head FROM teams WHERE team = ?", (team,)).fetchone()
            mine = db.execute("SELECT identity FROM devices WHERE name = ?", (device,)).fetchone()
            members = []
            for name, identity, revoked, appr in db.execute(
                    "SELECT name, identity, revoked, approval FROM devices WHERE team = ?"
                    " ORDER BY name", (team,)).fetchall():
                granted = [r[0] for r in db.execute(
                    "SELECT epoch FROM grants WHERE team = ? AND device = ? AND recipient = ?"
                    " ORDER BY epoch", (team, name, identity))] if identity else []
                members.append({"device": name, "identity": identity and bytes(identity),
                                "revoked": revoked, "approval": appr and bytes(appr),
                                "granted": granted})
            grants = [{"epoch": e, "sealed": bytes(g), "granted_by": by, "granter": bytes(gi)}
                      for e, g, by, gi in db.execute(
                          "SELECT epoch, sealed, granted_by, granter FROM grants WHERE team = ?"
                          " AND device = ? AND recipient = ? ORDER BY epoch",
                          (team, device, mine[0] if mine else None))]
            epochs = [{"epoch": e, "created_by": by, "start_seq": st} for e, by, st in db.execute(
                "SELECT epoch, created_by, start_seq FROM epochs WHERE team = ? ORDER BY epoch",
                (team,))]
            legacy = db.execute("SELECT count(*) FROM legacy WHERE team = ?", (team,)).fetchone()[0]
            holds = sorted(self._held(db, team, device))
            return {"epoch": int(epoch), "rekey": bool(rekey), "approval": bool(approval),
                    "head": int(head), "identity": mine[0] and bytes(mine[0]) if mine else None,
                    "epochs": epochs, "grants": grants, "members": members, "legacy": legacy,
                    "holds": holds}

    def put_keys(self, team, device, identity=None, epoch=None, grants=(), approval=None,
                 approvals=()):
        """Store what a member device sends of the team key, all in one transaction:
        its identity (only if the server has none for it, as for a device registered
        before protocol 2), a new epoch (only the next one: of two devices starting
        one at once, one wins and the other learns it), grants [(epoch, device,
        recipient identity, sealed)], the team's approval mode (once on, it stays),
        approvals [(device, identity, record)]. Returns why something was refused
        (and then nothing is stored), or None."""
        try:
            with self._reading():
                self._put_keys(team, device, identity, epoch, grants, approval, approvals)
        except _Refused as e:
            return str(e)
        return None

    def _put_keys(self, team, device, identity, epoch, grants, approval, approvals):
        now = utc_now()
        with self.d.write() as db:
            current, head = db.execute("SELECT epoch, head FROM teams WHERE team = ?"
                                       + self.d.for_update, (team,)).fetchone()
            if identity is not None:
                db.execute("UPDATE devices SET identity = ? WHERE name = ? AND identity IS NULL",
                           (identity, device))
            mine = db.execute("SELECT identity FROM devices WHERE name = ?", (device,)).fetchone()[0]
            held = self._held(db, team, device)
            if (epoch is not None or grants or approvals) and mine is None:
                raise _Refused("this device has no identity on the server yet")
            if epoch is not None:
                if epoch != current + 1:
                    raise _Refused(f"epoch {epoch} cannot begin: the team's key is at epoch"
                                   f" {current} (another device began one first)")
                if current and current not in held:
                    raise _Refused(f"epoch {epoch} cannot begin: this device was not given"
                                   f" the team key of epoch {current}")
                db.execute("UPDATE teams SET epoch = ?, rekey = 0 WHERE team = ?", (epoch, team))
                db.execute("INSERT INTO epochs(team, epoch, created_by, start_seq, created)"
                           " VALUES (?, ?, ?, ?, ?)", (team, epoch, device, head, now))
                current = epoch
            members = {n for (n,) in db.execute("SELECT name FROM devices WHERE team = ? AND"
                                                " revoked IS NULL", (team,))}
            for e, to, recipient, blob in grants:
                if not 1 <= e <= current or to not in members:
                    raise _Refused(f"no grant of epoch {e} to '{to}' can be stored")
                if e not in held and e != epoch:
                    raise _Refused(f"this device was not given the team key of epoch {e},"
                                   " so it cannot share it")
            self.d.many(db, "INSERT INTO grants(team, epoch, device, recipient, sealed, granted_by,"
                            " granter, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                            " ON CONFLICT DO NOTHING",
                        [(team, e, to, recipient, blob, device, mine, now)
                         for e, to, recipient, blob in grants])
            if (approval or approvals) and not (held or any(g[1] == device for g in grants)):
                raise _Refused("this device was not given the team key, so it cannot approve"
                               " devices or require approval")
            if approval:
                db.execute("UPDATE teams SET approval = 1 WHERE team = ?", (team,))
            for to, ident, record in approvals:
                if to not in members:
                    raise _Refused(f"no device '{to}' in the team to approve")
                db.execute("UPDATE devices SET approval = ? WHERE name = ? AND identity = ?",
                           (record, to, ident))

    def reseal(self, team, device, first, batch):
        """Put a sealed batch in place of the legacy (plaintext) events at seq first,
        first + 1, ...: the manifest must be exactly theirs (id, node, clock) in seq
        order. The plaintext is deleted. Returns how many events were sealed."""
        manifest, now = batch.manifest, utc_now()
        with self.d.write() as db:
            epoch, rekey = db.execute("SELECT epoch, rekey FROM teams WHERE team = ?"
                                      + self.d.for_update, (team,)).fetchone()
            if rekey_needed((epoch, rekey), batch.epoch) or batch.epoch not in self._held(
                    db, team, device):
                raise StoreError(f"a reseal must be sealed under the team's epoch {epoch}"
                                 " by a device that was given the team key of it")
            rows = db.execute("SELECT e.seq, e.event_id, e.node_id, e.lamport_clock FROM events e"
                              " JOIN legacy l ON l.team = e.team AND l.seq = e.seq"
                              " WHERE e.team = ? AND e.seq >= ? AND e.seq < ? ORDER BY e.seq",
                              (team, first, first + len(manifest))).fetchall()
            if [(r[1], r[2], r[3]) for r in rows] != [tuple(e) for e in manifest] or [
                    r[0] for r in rows] != list(range(first, first + len(manifest))):
                raise StoreError(f"the batch does not match the legacy events from seq {first}")
            number_ = db.execute("SELECT coalesce(max(batch), 0) + 1 FROM batches WHERE team = ?",
                                 (team,)).fetchone()[0]
            text = sealed.canonical(manifest, batch.writer)
            self.d.insert_many(db, "batches", ("team", *BATCH_COLUMNS), [(
                team, number_, batch.epoch, text, batch.sealed, len(text) + len(batch.sealed),
                device, now)])
            self.d.many(db, "UPDATE events SET batch = ?, idx = ? WHERE team = ? AND seq = ?",
                        [(number_, i, team, first + i) for i in range(len(manifest))])
            db.execute("DELETE FROM legacy WHERE team = ? AND seq >= ? AND seq < ?",
                       (team, first, first + len(manifest)))
            left = db.execute("SELECT count(*) FROM legacy WHERE team = ?", (team,)).fetchone()[0]
        if not left:
            self.d.scrub()
        return len(manifest)

    def seen(self, key_id, nonce):
        with self.d.read() as db:
            return db.execute("SELECT 1 FROM nonces WHERE key_id = ? AND nonce = ?",
                              (key_id, nonce)).fetchone() is not None

    def ping(self, quick=False):
        """Raise StoreError unless the database answers; quick: within ~2 s on a
        connection of its own (readiness, a metrics scrape), not after the pool's
        wait for a connection (10 s when the database is down)."""
        with (self.d.probe() if quick else self.d.read()) as db:
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
                    for t in ("teams", "devices", "events", "batches", "legacy", "snapshots")}

    # -- operations: what sk-admin status prints and the metrics export ----------
    def note_device(self, device, pulled=None, queued=None, end=True):
        """Remember what a device's request told (None: nothing): the point of its
        team's log a pull reached (end=False: a page with more after it, which only
        moves the point forward, so a pull of old history does not look like lag),
        how many events it says it has queued to push. Writes only what changed."""
        updates = []
        if pulled is not None:
            updates.append(("UPDATE devices SET pulled = ? WHERE name = ? AND (pulled IS NULL OR"
                            + (" pulled <> ?)" if end else " pulled < ?)"), int(pulled)))
        if queued is not None:
            updates.append(("UPDATE devices SET queued = ? WHERE name = ? AND (queued IS NULL OR"
                            " queued <> ?)", int(queued)))
        if not updates:
            return
        with self.d.write() as db:
            for sql, value in updates:
                db.execute(sql, (value, device, value))

    def status(self, events=True):
        """What sk-admin status prints and `sk server --metrics` exports, read in one
        snapshot: {"teams": [{"team", "head", "events" (stored; only with
        events=True: a count of the whole log), "snapshots", "epoch"}], "devices":
        [{"device", "team", "last_seen", "pulled" (the point its last pull
        reached), "lag" (head minus that), "queued" (what it last said it had
        queued), "revoked"}]}."""
        with self.d.read(snapshot=True) as db:
            teams = {t: {"team": t, "head": h, **({"events": 0} if events else {}),
                         "snapshots": 0, "epoch": ep}
                     for t, h, ep in db.execute("SELECT team, head, epoch FROM teams"
                                                " ORDER BY team").fetchall()}
            for t, n in db.execute("SELECT team, count(*) FROM snapshots GROUP BY team"):
                if t in teams:
                    teams[t]["snapshots"] = n
            if events:
                for t, n in db.execute("SELECT team, count(*) FROM events GROUP BY team"):
                    if t in teams:
                        teams[t]["events"] = n
            devices = []
            for name, team, seen, revoked, pulled, queued in db.execute(
                    "SELECT name, team, last_seen, revoked, pulled, queued FROM devices"
                    " ORDER BY team, name").fetchall():
                head = teams[team]["head"] if team in teams else 0
                devices.append({"device": name, "team": team, "last_seen": seen,
                                "pulled": pulled, "lag": max(0, head - (pulled or 0)),
                                "queued": queued, "revoked": revoked})
        return {"teams": list(teams.values()), "devices": devices}

    def verify(self, chunk=10_000):
        """Walk every team's log as it stood when the walk reached the team: seq
        dense from 1 up to the team's head, each event's chain value
        sha256(chain before it + event_id) from 32 zero bytes, each sealed event the
        entry (id, node, clock) its batch's manifest has at its place, and the
        team's own chain value the last event's. Yields {"team", "head", "checked",
        "seq" (None, or the first bad seq), "reason"} per team, in name order; reads
        `chunk` events a transaction, so memory stays bounded however long the log.
        A cell that cannot be read as it was written is a bad row too."""
        with self.d.read() as db:
            teams = [t for (t,) in db.execute("SELECT team FROM teams ORDER BY team")]
        for team in teams:
            head, seq, chain, bad = None, 0, GENESIS, None
            try:
                with self.d.read() as db:
                    head, recorded = db.execute("SELECT head, chain FROM teams WHERE team = ?",
                                                (team,)).fetchone()
                    head, recorded = int(head), bytes(recorded)
            except Exception as e:
                if not self._unreadable(e):
                    raise
                bad = (0, "the team's own head or chain cannot be read as it was written"
                          f" (altered at rest?): {type(e).__name__}")
            step = chunk
            while bad is None and seq < head:
                try:
                    seq, chain, bad = self._verify_chunk(team, head, seq, chain, step)
                except Exception as e:
                    if not self._unreadable(e):
                        raise
                    if step == 1:
                        bad = (seq + 1, f"its row cannot be read as it was written (altered at"
                                        f" rest?): {type(e).__name__}")
                    step = 1   # find the row: one at a time from here
            if bad is None and chain != recorded:
                bad = (head, "the team's recorded chain value is not the chain of its log")
            yield {"team": team, "head": head, "checked": seq,
                   "seq": bad and bad[0], "reason": bad and bad[1]}

    def _verify_chunk(self, team, head, seq, chain, chunk):
        """verify() over up to `chunk` events after `seq`: (seq, chain, bad)."""
        from sk.errors import IntegrityError
        from sk.protocol import _manifest
        with self.d.read() as db:
            rows = db.execute("SELECT seq, event_id, node_id, lamport_clock, batch, idx, chain"
                              " FROM events WHERE team = ? AND seq > ? AND seq <= ?"
                              " ORDER BY seq LIMIT ?", (team, seq, head, chunk)).fetchall()
            ids = sorted({r[4] for r in rows if r[4] is not None})
            manifests = {}
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                for b, text in db.execute(
                        "SELECT batch, manifest FROM batches WHERE team = ? AND batch IN ("
                        + ",".join("?" * len(part)) + ")", (team, *part)):
                    try:
                        manifests[b] = _manifest(bytes(text).decode())[0]
                    except (IntegrityError, *UNREADABLE):
                        manifests[b] = None   # its events are named below
        if not rows:
            return seq, chain, (seq + 1, f"event {seq + 1} is missing (the team's head is {head})")
        for n, eid, node, clock, b, idx, stored in rows:
            if n != seq + 1:
                return seq, chain, (seq + 1, f"event {seq + 1} is missing (the next one stored"
                                             f" is {n})")
            if not isinstance(eid, str):
                raise TypeError("an event id is not text")
            chain = chain_next(chain, eid)
            if bytes(stored) != chain:
                return seq, chain, (n, "its hash chain value is not sha256(the chain before it"
                                       " + its event_id): the row, or one before it, was altered")
            if b is not None:
                entries = manifests.get(b)
                if entries is None or not 0 <= idx < len(entries) or \
                        tuple(entries[idx]) != (eid, node, clock):
                    return seq, chain, (n, f"it is not the entry its batch {b}'s manifest has"
                                           f" at {idx} (a body moved to another event, or the"
                                           " manifest altered)")
            seq = n
        return seq, chain, None

    def backup(self, path):
        self.d.backup(path)

    def export_meta(self):
        with self.d.read(snapshot=True) as db:
            keys = [(k[0], k[1], unwrap(self._secret, k[0], k[2]), *k[3:]) for k in db.execute(
                "SELECT key_id, device, master, created, retired, retired_why FROM keys")]
            return {
                "teams": [(t, h, la, bytes(c), cr, ep, rk, ap) for t, h, la, c, cr, ep, rk, ap
                          in db.execute("SELECT team, head, lamport, chain, created, epoch, rekey,"
                                        " approval FROM teams ORDER BY team")],
                "devices": [tuple(d) for d in db.execute(
                    "SELECT " + ", ".join(DEVICE_COLUMNS) + " FROM devices ORDER BY name")],
                "keys": keys,
                "nonces": db.execute("SELECT key_id, nonce, expires FROM nonces"
                                     " WHERE expires >= ?", (now_ms(),)).fetchall(),
                "epochs": db.execute("SELECT team, epoch, created_by, start_seq, created"
                                     " FROM epochs").fetchall(),
                "grants": db.execute("SELECT team, epoch, device, recipient, sealed, granted_by,"
                                     " granter, created FROM grants").fetchall(),
                "nodes": db.execute("SELECT team, node_id, device FROM nodes").fetchall(),
                # where each device's last pull got to and what it said it had queued
                # (sk-admin status, the metrics), as of its last request
                "progress": db.execute("SELECT name, last_seen, pulled, queued FROM devices"
                                       " WHERE last_seen IS NOT NULL").fetchall(),
            }

    def import_meta(self, meta):
        with self.d.write() as db:
            many = self.d.many
            many(db, "INSERT INTO teams(team, head, lamport, chain, created, epoch, rekey,"
                     " approval) VALUES (?, 0, 0, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [(t[0], GENESIS, t[4], t[5], t[6], t[7]) for t in meta["teams"]])
            many(db, "UPDATE teams SET epoch = ?, rekey = ?, approval = ? WHERE team = ?"
                     " AND epoch < ?", [(t[5], t[6], t[7], t[0], t[5]) for t in meta["teams"]])
            many(db, "INSERT INTO devices(" + ", ".join(DEVICE_COLUMNS) + ") VALUES"
                     " (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", meta["devices"])
            many(db, "UPDATE devices SET revoked = ? WHERE name = ? AND revoked IS NULL",
                 [(d[4], d[0]) for d in meta["devices"] if d[4]])
            many(db, "INSERT INTO keys(key_id, device, master, created, retired, retired_why)"
                     " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [(k[0], k[1], self._wrap(k[0], k[2]), *k[3:]) for k in meta["keys"]])
            many(db, "UPDATE keys SET retired = ?, retired_why = ? WHERE key_id = ?"
                     " AND retired IS NULL", [(k[4], k[5], k[0]) for k in meta["keys"] if k[4]])
            many(db, "INSERT INTO nonces(key_id, nonce, expires) VALUES (?, ?, ?)"
                     " ON CONFLICT DO NOTHING", meta["nonces"])
            many(db, "INSERT INTO epochs(team, epoch, created_by, start_seq, created)"
                     " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", meta.get("epochs", []))
            many(db, "INSERT INTO grants(team, epoch, device, recipient, sealed, granted_by,"
                     " granter, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 meta.get("grants", []))
            many(db, "INSERT INTO nodes(team, node_id, device) VALUES (?, ?, ?)"
                     " ON CONFLICT DO NOTHING", meta.get("nodes", []))
            many(db, "UPDATE devices SET last_seen = ?, pulled = ?, queued = ? WHERE name = ?"
                     " AND (last_seen IS NULL OR last_seen <= ?)",   # unless newer here
                 [(seen, pulled, queued, name, seen)
                  for name, seen, pulled, queued in meta.get("progress", [])])

    def export_events(self, team, after, limit):
        """{"events": up to limit rows (STORED_COLUMNS) after seq `after`, "batches":
        the batches they are in (BATCH_COLUMNS), "legacy": their legacy rows}."""
        with self.d.read(snapshot=True) as db:
            rows = db.execute("SELECT " + ", ".join(STORED_COLUMNS) + " FROM events"
                              " WHERE team = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (team, after, limit)).fetchall()
            if not rows:
                return {"events": [], "batches": [], "legacy": []}
            lo, hi = rows[0][0], rows[-1][0]
            batches = db.execute("SELECT " + ", ".join(BATCH_COLUMNS) + " FROM batches WHERE"
                                 " team = ? AND batch IN (SELECT DISTINCT batch FROM events"
                                 " WHERE team = ? AND seq BETWEEN ? AND ?)",
                                 (team, team, lo, hi)).fetchall()
            legacy = db.execute("SELECT " + ", ".join(LEGACY_COLUMNS) + " FROM legacy WHERE"
                                " team = ? AND seq BETWEEN ? AND ?", (team, lo, hi)).fetchall()
        return {"events": rows, "batches": batches, "legacy": legacy}

    def import_events(self, team, chunk):
        try:
            self._import_events(team, chunk)
        except self.d.data_error as e:
            rows = chunk["events"]
            raise StoreError(f"team '{team}': events {rows[0][0]}-{rows[-1][0]} hold text"
                             f" this database cannot store: {str(e).strip().splitlines()[0]}"
                             " (a NUL character, which sk 0.2.0 let through)") from None

    def _import_events(self, team, chunk):
        with self.d.write() as db:
            head, lamport, chain = db.execute(
                "SELECT head, lamport, chain FROM teams WHERE team = ?" + self.d.for_update,
                (team,)).fetchone()
            head, lamport, chain = follow(team, head, lamport, bytes(chain), chunk["events"])
            self.d.many(db, "INSERT INTO batches(team, " + ", ".join(BATCH_COLUMNS) + ") VALUES"
                            " (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                        [(team, *b) for b in chunk["batches"]])
            self.d.insert_many(db, "legacy", ("team", *LEGACY_COLUMNS),
                               [(team, *r) for r in chunk["legacy"]])
            self.d.insert_many(db, "events", ("team", *STORED_COLUMNS),
                               [(team, *r) for r in chunk["events"]])
            db.execute("UPDATE teams SET head = ?, lamport = ?, chain = ? WHERE team = ?",
                       (head, lamport, chain, team))
            self.d.notify(db, team)

    def same_database(self, other):
        return isinstance(other, SQLStore) and self.d.same(other.d)

    def reset(self):
        self.d.reset()

    def close(self):
        self.d.close()
