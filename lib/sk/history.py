"""History: who wrote each value, what last-writer-wins overwrote, the state as of then.

Every event sk stamps records, in its sealed extra, what its writer had seen:
  seen   the aggregate's newest stamp [lamport, node] in the writer's state
  prior  for each payload key it writes, the stamps it overwrites: the value the
         writer's state held, and the writes it knew to have lost to it
  actor  who made it (sk-append --actor, SK_ACTOR), when given

A write w of a register (aggregate, key) is *superseded knowingly* when a later
write knew it: w is reachable from that write through prior. It is *lost* when the
register's winner does not know it: a concurrent write beat it, and nobody who
had seen both wrote the key since. A write that beat another without knowing it
made a conflict; once a later write knows the loser, the conflict is closed.
Events without prior (from before it was recorded) know every write below them:
unknown, never a conflict. All of this is a function of the events alone, so it
is the same on every device that holds them, whatever order they arrived in.

Conflicts are found where they can be: resolve flags an aggregate when an event's
`seen` is not the aggregate's stamp before it (which sequential writes always
match), and the flagged aggregates are looked at exactly (conflicts()), one
aggregate's events at a time, by index.
"""

import json

from .event import dumps, is_deletion, loads

CONFLICTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS conflicts (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    field          TEXT NOT NULL,
    lost           TEXT NOT NULL,    -- JSON [[lamport, node, event_id], ...] the winner does not know
    closed         TEXT NOT NULL,    -- JSON: the same, of conflicts closed since
    PRIMARY KEY (aggregate_type, aggregate_id, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS suspects (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) WITHOUT ROWID
"""


def tables(db):
    for stmt in CONFLICTS_SCHEMA.split(";"):
        db.execute(stmt)


# -- what a writer had seen (at stamp time) -------------------------------------------
class WriterView:
    """The state each new event is written against: per aggregate its newest
    stamp and, per key, the stamps the writer knows (the value and its open
    losers). Read from the state tables, the conflicts and the events not yet
    folded; updated as events are stamped."""

    def __init__(self, store):
        self.store, self.db = store, store.db
        self._aggs = {}
        self._pending = None
        self._tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}

    def _unapplied(self):
        """The events of the log not folded yet, by aggregate (usually none)."""
        if self._pending is None:
            self._pending = {}
            if self._has("fields"):
                rows = self.db.execute("SELECT aggregate_type, aggregate_id, event_type,"
                                       " lamport_clock, node_id, payload FROM events"
                                       " WHERE applied = 0")
            else:
                rows = self.db.execute("SELECT aggregate_type, aggregate_id, event_type,"
                                       " lamport_clock, node_id, payload FROM events")
            for atype, aid, etype, lamport, node, payload in rows:
                self._pending.setdefault((atype, aid), []).append(
                    (etype, lamport, node, payload))
        return self._pending

    def _has(self, table):
        return table in self._tables

    def _load(self, key):
        view = self._aggs.get(key)
        if view is not None:
            return view
        last, fields = (0, ""), {}
        if self._has("fields"):
            row = self.db.execute("SELECT live_lamport, live_node, del_lamport, del_node FROM"
                                  " aggregates WHERE aggregate_type = ? AND aggregate_id = ?",
                                  key).fetchone()
            if row:
                last = max((row[0], row[1]), (row[2], row[3]))
            for field, lamport, node in self.db.execute(
                    "SELECT field, lamport, node_id FROM fields WHERE aggregate_type = ? AND"
                    " aggregate_id = ?", key):
                fields[field] = [(lamport, node)]
        if self._has("conflicts"):
            for field, lost in self.db.execute(
                    "SELECT field, lost FROM conflicts WHERE aggregate_type = ? AND"
                    " aggregate_id = ?", key):
                fields.setdefault(field, []).extend((la, n) for la, n, _ in json.loads(lost))
        for etype, lamport, node, payload in self._unapplied().get(key, ()):
            stamp = (lamport, node)
            last = max(last, stamp)
            if not is_deletion(etype):
                for field in loads(payload):
                    cur = fields.get(field)
                    if not cur or stamp > cur[0]:
                        fields[field] = [stamp] + (cur or [])
        view = self._aggs[key] = [last, fields]
        return view

    def extra(self, atype, aid, payload_keys, stamp, actor=None):
        """The extra of a new event written with this stamp; the view moves on."""
        view = self._load((atype, aid))
        last, fields = view
        out = {"seen": list(last) if last != (0, "") else None,
               "prior": {k: [list(s) for s in fields.get(k, [])] for k in payload_keys}}
        if actor:
            out["actor"] = actor
        view[0] = max(last, stamp)
        for k in payload_keys:
            fields[k] = [stamp]
        return out


# -- flagging at resolve time ----------------------------------------------------------
def suspects_of(rows, before):
    """The aggregates of folded rows (atype, aid, lamport, node, extra text) whose
    writer had not seen what this device had of them: before[(atype, aid)] is the
    aggregate's newest stamp here before these rows. Sequential writes, delivered
    in order, are never suspects."""
    last = dict(before)
    out = set()
    for atype, aid, lamport, node, extra in rows:
        key = (atype, aid)
        cur = last.get(key, (0, ""))
        seen = (loads(extra).get("seen") if extra else None)
        if extra and cur != (0, "") and (seen is None or tuple(seen) != cur):
            out.add(key)
        if (lamport, node) > cur:
            last[key] = (lamport, node)
    return out


# -- the exact answer, one aggregate at a time -------------------------------------------
def _writes(store, atype, aid):
    """Every write of each key of the aggregate: {key: [write]} in stamp order, a
    write being a dict (stamp, value JSON, event, prior or None)."""
    out = {}
    for eid, etype, lamport, node, payload, ts, extra, status in store.db.execute(
            "SELECT event_id, event_type, lamport_clock, node_id, payload, timestamp, extra,"
            " status FROM events WHERE aggregate_type = ? AND aggregate_id = ?", (atype, aid)):
        if is_deletion(etype):
            continue
        x = loads(extra) if extra else {}
        prior = x.get("prior") if isinstance(x.get("prior"), dict) else None
        for key, value in loads(payload).items():
            known = None
            if prior is not None and isinstance(prior.get(key), list):
                known = {tuple(s) for s in prior[key] if isinstance(s, list) and len(s) == 2}
            out.setdefault(key, []).append({
                "stamp": (lamport, node), "value": dumps(value), "event_id": eid,
                "event_type": etype, "timestamp": ts, "actor": x.get("actor"),
                "device": x.get("device"), "known": known, "status": status})
    for writes in out.values():
        writes.sort(key=lambda w: (w["stamp"], w["value"]))
    return out


def _register(writes):
    """(winner, open losers, closed ones) of one register's writes in stamp order."""
    index = {w["stamp"]: i for i, w in enumerate(writes)}
    knows = []                         # bitset of the writes each one knows
    for i, w in enumerate(writes):
        if w["known"] is None:         # no prior recorded: knows everything below it
            k = (1 << i) - 1
        else:
            k = 0
            for stamp in w["known"]:
                j = index.get(stamp)
                if j is not None and j < i:
                    k |= knows[j] | (1 << j)
        knows.append(k)
    win = len(writes) - 1
    beaten = 0                         # writes some later known-prior write did not know
    for i, w in enumerate(writes):
        if w["known"] is not None:
            beaten |= ~knows[i] & ((1 << i) - 1)
    lost, closed = [], []
    for i, w in enumerate(writes[:-1]):
        if w["known"] is None or not beaten >> i & 1:
            continue
        (closed if knows[win] >> i & 1 else lost).append(w)
    return writes[win], lost, closed


def _brief(w):
    return {"value": loads(w["value"]), "event_id": w["event_id"], "event_type": w["event_type"],
            "lamport_clock": w["stamp"][0], "node_id": w["stamp"][1], "timestamp": w["timestamp"],
            "actor": w["actor"], "device": w["device"]}


def aggregate_conflicts(store, atype, aid):
    """[{aggregate_type, aggregate_id, field, winner, lost: [...], closed: [...]}]."""
    out = []
    for key, writes in sorted(_writes(store, atype, aid).items()):
        winner, lost, closed = _register(writes)
        if lost or closed:
            out.append({"aggregate_type": atype, "aggregate_id": aid, "field": key,
                        "winner": _brief(winner), "lost": [_brief(w) for w in lost],
                        "closed": [_brief(w) for w in closed]})
    return out


def refresh(store, aggregates):
    """Look at flagged aggregates exactly; keep their open and closed conflicts in
    the conflicts table. Returns how many conflicts are open in them now."""
    n = 0
    with store.write() as db:
        tables(db)
        for atype, aid in aggregates:
            db.execute("DELETE FROM conflicts WHERE aggregate_type = ? AND aggregate_id = ?",
                       (atype, aid))
            for c in aggregate_conflicts(store, atype, aid):
                db.execute("INSERT INTO conflicts VALUES (?, ?, ?, ?, ?)", (
                    atype, aid, c["field"],
                    dumps([[w["lamport_clock"], w["node_id"], w["event_id"]] for w in c["lost"]]),
                    dumps([[w["lamport_clock"], w["node_id"], w["event_id"]] for w in c["closed"]])))
                n += len(c["lost"])
            db.execute("DELETE FROM suspects WHERE aggregate_type = ? AND aggregate_id = ?",
                       (atype, aid))
    return n


def conflicts(store, atype=None, aid=None, include_closed=False):
    """The conflicts of one aggregate (looked at now), of a type, or all (those the
    conflicts table holds, after looking at every flagged aggregate)."""
    if aid is not None:
        found = aggregate_conflicts(store, atype, aid)
    else:
        pending_suspects(store)
        where, args = "", ()
        if atype is not None:
            where, args = " WHERE aggregate_type = ?", (atype,)
        found = []
        if _exists(store, "conflicts"):
            for t, i in store.db.execute("SELECT DISTINCT aggregate_type, aggregate_id FROM"
                                         " conflicts" + where + " ORDER BY 1, 2", args).fetchall():
                found += aggregate_conflicts(store, t, i)
    return [c for c in found if c["lost"] or include_closed]


def pending_suspects(store):
    """Look at every aggregate flagged since; the number of open conflicts found."""
    if not _exists(store, "suspects"):
        return 0
    aggs = store.db.execute("SELECT aggregate_type, aggregate_id FROM suspects").fetchall()
    return refresh(store, aggs) if aggs else 0


def open_ids(store):
    """{(type, id, key, lost event id)} of the open conflicts, after looking at every
    aggregate flagged since: what a run brought in is the difference."""
    pending_suspects(store)
    if not _exists(store, "conflicts"):
        return set()
    return {(t, i, k, w[2]) for t, i, k, lost in store.db.execute(
        "SELECT aggregate_type, aggregate_id, field, lost FROM conflicts")
        for w in json.loads(lost)}


def open_count(store):
    if not _exists(store, "conflicts"):
        return 0
    return sum(len(json.loads(lost)) for (lost,) in store.db.execute("SELECT lost FROM conflicts"))


def _exists(store, table):
    return store.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() \
        is not None


def blame(store, atype, aid):
    """{key: the winning write (value, event_id, event_type, node_id, lamport_clock,
    timestamp, actor, device)} of an aggregate, from its events; a key whose event
    this device does not hold (a shallow device) comes from its snapshot, said so."""
    out = {k: _brief(_register(w)[0]) for k, w in _writes(store, atype, aid).items()}
    from .snapshot import base_fields
    for key, info in base_fields(store, atype, aid).items():
        cur = out.get(key)
        if cur is None or (info["lamport_clock"], info["node_id"]) > (
                cur["lamport_clock"], cur["node_id"]):
            out[key] = {**info, "from_snapshot": True}
    return dict(sorted(out.items()))


# -- the state as of then ---------------------------------------------------------------
def state_at(store, lamport=None, time=None, atype=None, aid=None):
    """The state {type: {id: {key: value}}} folded from the events stamped at or
    before a Lamport clock, or displayed at or before a time (RFC 3339 text)."""
    from .resolve import fold, view
    where, args = [], []
    if lamport is not None:
        where.append("lamport_clock <= ?")
        args.append(lamport)
    if time is not None:
        where.append("timestamp <= ?")
        args.append(time)
    if atype is not None:
        where.append("aggregate_type = ?")
        args.append(atype)
        if aid is not None:
            where.append("aggregate_id = ?")
            args.append(aid)
    sql = ("SELECT event_type, aggregate_type, aggregate_id, lamport_clock, node_id, payload"
           " FROM events" + (" WHERE " + " AND ".join(where) if where else ""))
    aggs, fields = fold((r[0], r[1], r[2], r[3], r[4], loads(r[5]))
                        for r in store.db.execute(sql, args))
    return view(aggs, fields)
