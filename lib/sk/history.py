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
import re

from .errors import PARTIAL, SkError
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
        self.device = store.meta("device")   # this device's name, as the server said it
        self._nodes = {}                      # node id -> its JSON text

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
        """The extra (JSON text) of a new event written with this stamp; the view
        moves on. Built as text: one is written for every event stamped."""
        view = self._load((atype, aid))
        last, fields = view
        text = self._stamp
        prior = ",".join(f"{dumps(k)}:[{','.join(text(s) for s in fields.get(k, ()))}]"
                         for k in payload_keys)
        out = (f'{{"seen":{text(last) if last != (0, "") else "null"},"prior":{{{prior}}}'
               + (f',"actor":{dumps(actor)}' if actor else "")
               + (f',"device":{dumps(self.device)}' if self.device else "") + "}")
        view[0] = max(last, stamp)
        for k in payload_keys:
            fields[k] = [stamp]
        return out

    def _stamp(self, stamp):
        node = self._nodes.get(stamp[1])
        if node is None:
            node = self._nodes[stamp[1]] = dumps(stamp[1])
        return f"[{int(stamp[0])},{node}]"


# -- flagging at resolve time ----------------------------------------------------------
def suspects_of(rows, held):
    """The aggregates of rows about to be folded (atype, aid, event_type, lamport,
    node, payload dict, extra (JSON text, dict or None), check) where a write may
    have been lost: a write of a key whose writer did not know the value this
    device holds for it (its prior lacks the current winner's stamp), one older
    than that value (it arrived after a write that beat it), or one that knew of
    losers (it may close their conflict). held[(atype, aid)] = {key: winner's
    stamp} here before these rows, for every aggregate with a row to check (others
    are passed over: nothing of theirs is checked); its stamps are moved on in
    place as the rows go. Rows with check False (this device's own, folded in the
    order it wrote them) only move the stamps on. Writes that follow each other,
    delivered in the order they were made, flag nothing; any order that is not
    causal flags what it must, so every device finds the same conflicts."""
    out = set()
    for atype, aid, etype, lamport, node, payload, extra, check in rows:
        if is_deletion(etype):
            continue
        cur = held.get((atype, aid))
        if cur is None:
            continue
        stamp = (lamport, node)
        prior = None
        if check and extra:
            x = loads(extra) if isinstance(extra, str) else extra
            prior = x.get("prior") if isinstance(x, dict) else None
            if prior is not None and not isinstance(prior, dict):
                prior = {}
        for key in payload:
            have = cur.get(key)
            if have is not None and prior is not None:
                # anything but "knew exactly the value it replaces" ([[lamport, node]]):
                # a possible loss, or a write that knew of losers (it may close their
                # conflict)
                known = prior.get(key)
                if (stamp < have or type(known) is not list or len(known) != 1
                        or type(known[0]) is not list or len(known[0]) != 2
                        or known[0][0] != have[0] or known[0][1] != have[1]):
                    out.add((atype, aid))
            if have is None or stamp > have:
                cur[key] = stamp
    return out


# -- the exact answer, one aggregate at a time -------------------------------------------
def _writes(store, atype, aid):
    """Every write of each key of the aggregate: {key: [write]} in stamp order, a
    write being a dict (stamp, value JSON, event, prior or None)."""
    out = {}
    me, my_name = store.meta("node_id"), store.meta("device")
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
                "device": x.get("device") or (my_name if node == me else None),
                "known": known, "status": status})
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


def writer_label(w):
    """'device (actor)', or 'node 1a2b3c4d' when the device is not known: who wrote a
    write, as sk blame and sk conflicts print it."""
    who = w.get("device") or f"node {w['node_id'][:8]}"
    return who + (f" ({w['actor']})" if w.get("actor") else "")


def value_text(value, limit):
    """A value as JSON text on one line, cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        # an aggregate neither flagged nor holding conflicts has none (the flags miss
        # nothing the exact analysis finds): answered by index, however many events
        flagged = any(_exists(store, t) and store.db.execute(
            f"SELECT 1 FROM {t} WHERE aggregate_type = ? AND aggregate_id = ? LIMIT 1",
            (atype, aid)).fetchone() for t in ("suspects", "conflicts"))
        found = aggregate_conflicts(store, atype, aid) if flagged else []
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


def deletion(store, atype, aid):
    """The newest deletion of an aggregate (event_id, event_type, lamport_clock,
    node_id, timestamp, actor, device), or None."""
    best = None
    for eid, etype, lam, node, ts, extra in store.db.execute(
            "SELECT event_id, event_type, lamport_clock, node_id, timestamp, extra FROM events"
            " WHERE aggregate_type = ? AND aggregate_id = ? AND event_type LIKE '%\\_deleted'"
            " ESCAPE '\\'", (atype, aid)):
        if best is None or (lam, node) > (best["lamport_clock"], best["node_id"]):
            x = loads(extra) if extra else {}
            best = {"event_id": eid, "event_type": etype, "lamport_clock": lam, "node_id": node,
                    "timestamp": ts, "actor": x.get("actor"), "device": x.get("device")}
    from .snapshot import _base_rows
    for aggs, _ in _base_rows(store, atype, aid):
        for live, dead in aggs.values():
            if dead != (0, "") and (best is None or dead > (best["lamport_clock"],
                                                            best["node_id"])):
                best = {"event_id": None, "event_type": None, "lamport_clock": dead[0],
                        "node_id": dead[1], "timestamp": None, "actor": None, "device": None,
                        "from_snapshot": True}
    return best


def _winners(store, atype, aid):
    """{key: brief of the write that wins it} from the aggregate's events, by index:
    one pass over the payloads, the extra read only for the winners (what blame
    needs; _writes is for conflicts)."""
    best, rows = {}, []
    for row in store.db.execute(
            "SELECT event_id, event_type, lamport_clock, node_id, payload, timestamp, extra"
            " FROM events WHERE aggregate_type = ? AND aggregate_id = ?", (atype, aid)):
        if is_deletion(row[1]):
            continue
        stamp = (row[2], row[3])
        for key, value in loads(row[4]).items():
            cur = best.get(key)
            if cur is None or stamp > cur[0]:
                best[key] = (stamp, value, len(rows))
        rows.append(row)
    me, my_name = store.meta("node_id"), store.meta("device")
    out, extras = {}, {}
    for key, (stamp, value, i) in best.items():
        eid, etype, lamport, node, _, ts, extra = rows[i]
        if i not in extras:
            extras[i] = loads(extra) if extra else {}
        x = extras[i] if isinstance(extras[i], dict) else {}
        out[key] = {"value": value, "event_id": eid, "event_type": etype, "lamport_clock": lamport,
                    "node_id": node, "timestamp": ts, "actor": x.get("actor"),
                    "device": x.get("device") or (my_name if node == me else None)}
    return out


def blame(store, atype, aid):
    """{key: the winning write (value, event_id, event_type, node_id, lamport_clock,
    timestamp, actor, device)} of the keys the aggregate shows (as sk-state does:
    a key written before the aggregate was deleted and made again is gone; a
    deleted aggregate shows its last values, as sk-state --deleted does). A key
    whose event this device does not hold (a shallow device) comes from its
    snapshot, said so."""
    out = _winners(store, atype, aid)
    from .snapshot import base_fields
    for key, info in base_fields(store, atype, aid).items():
        cur = out.get(key)
        if cur is None or (info["lamport_clock"], info["node_id"]) > (
                cur["lamport_clock"], cur["node_id"]):
            out[key] = {**info, "from_snapshot": True}
    gone = deletion(store, atype, aid)
    if gone is not None:
        dead = (gone["lamport_clock"], gone["node_id"])
        live = max([(w["lamport_clock"], w["node_id"]) for w in out.values()], default=(0, ""))
        live = max(live, _live_stamp(store, atype, aid))
        from .snapshot import _base_rows
        for aggs, _ in _base_rows(store, atype, aid):   # a shallow device's snapshot
            live = max([live] + [slot[0] for slot in aggs.values()])
        if live > dead:
            out = {k: w for k, w in out.items() if (w["lamport_clock"], w["node_id"]) > dead}
        else:   # deleted: its last values, and the deletion, as sk-state --deleted shows it
            out["_deleted"] = gone
    return dict(sorted(out.items()))


def _live_stamp(store, atype, aid):
    """The newest non-deletion event of an aggregate (an empty payload writes no key)."""
    row = store.db.execute(
        "SELECT max(lamport_clock) FROM events WHERE aggregate_type = ? AND aggregate_id = ?"
        " AND event_type NOT LIKE '%\\_deleted' ESCAPE '\\'", (atype, aid)).fetchone()
    if not row or row[0] is None:
        return (0, "")
    node = store.db.execute(
        "SELECT max(node_id) FROM events WHERE aggregate_type = ? AND aggregate_id = ? AND"
        " lamport_clock = ? AND event_type NOT LIKE '%\\_deleted' ESCAPE '\\'",
        (atype, aid, row[0])).fetchone()[0]
    return (row[0], node)


# -- the state as of then ---------------------------------------------------------------
_WHEN = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)")


def time_key(text):
    """Display timestamps (UTC RFC 3339, any number of fraction digits) as text
    that sorts as they do."""
    frac = text[20:].rstrip("Zz").split("+")[0] if len(text) > 20 and text[19] == "." else ""
    return text[:19] + "." + frac.ljust(9, "0")


def parse_when(text):
    """--at: a Lamport clock (an integer) or an RFC 3339 time with its offset.
    Returns ("lamport", n) or ("time", key for time_key's order); ValueError else."""
    text = text.strip()
    if text.isdigit():
        return "lamport", int(text)
    m = _WHEN.fullmatch(text)
    if not m:
        raise ValueError(f"--at {text!r} is neither a Lamport clock (an integer) nor an RFC 3339"
                         " time with its offset, such as 2026-12-01T09:30:00Z")
    from datetime import datetime, timedelta, timezone
    day, clock, frac, off = m.groups()
    try:
        base = datetime.fromisoformat(f"{day}T{clock}")
    except ValueError:
        raise ValueError(f"--at {text!r} is not a real date and time") from None
    if off not in ("Z", "z"):
        sign = 1 if off[0] == "+" else -1
        base -= sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6]))
    utc = base.replace(tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return "time", utc + "." + (frac or ".")[1:].ljust(9, "0")


def state_at(store, when, atype=None, aid=None, include_deleted=False):
    """The state {type: {id: {key: value}}} folded from the events stamped at or
    before a Lamport clock, or displayed at or before a time (parse_when's
    answer), the path map applied as sk-state does. On a shallow device the
    snapshot it began at comes first, and a point before it is an error: that
    history is not here (HistoryError)."""
    from .resolve import fold, remap, view
    from .snapshot import _base, _base_rows
    kind, at = when
    where, args = [], []
    if kind == "lamport":
        where.append("lamport_clock <= ?")
        args.append(at)
    if atype is not None:
        where.append("aggregate_type = ?")
        args.append(atype)
        if aid is not None:
            where.append("aggregate_id = ?")
            args.append(aid)
    aggs, fields = {}, {}
    base = _base(store)
    if base:
        newest = max([(f[4], f[8] or "") for f in base["fields"]]
                     + [(a[2], "") for a in base["aggregates"]] + [(a[4], "") for a in
                                                                    base["aggregates"]],
                     default=(0, ""))
        if (kind == "lamport" and at < newest[0]) or (
                kind == "time" and newest[1] and at < time_key(newest[1])):
            raise HistoryError("this device's history is shallow: it begins at a snapshot of"
                               f" seq {base['seq']} (Lamport clock {newest[0]}), after that"
                               " point; 'sk-pull --unshallow' fetches the rest")
        if aid is not None:
            for a, f in _base_rows(store, atype, aid):
                aggs.update(a)
                fields.update(f)
        else:
            aggs = {(t, i): [(ll, ln), (dl, dn)] for t, i, ll, ln, dl, dn in base["aggregates"]
                    if atype in (None, t)}
            fields = {(t, i, k): (lam, node, dumps(v)) for t, i, k, v, lam, node, *_ in
                      base["fields"] if atype in (None, t)}
    sql = ("SELECT event_type, aggregate_type, aggregate_id, lamport_clock, node_id, payload,"
           " timestamp FROM events" + (" WHERE " + " AND ".join(where) if where else ""))
    rows = store.db.execute(sql, args)
    fold(((r[0], r[1], r[2], r[3], r[4], loads(r[5])) for r in rows
          if kind == "lamport" or time_key(r[6]) <= at), aggs, fields)
    pairs = [tuple(p) for p in json.loads(store.meta("path_map", "[]"))]
    out = view(aggs, fields, include_deleted)
    if pairs:
        for objs in out.values():
            for obj in objs.values():
                for k, v in obj.items():
                    obj[k] = remap(v, pairs)
    return out


class HistoryError(SkError):
    """What this device's history cannot answer (a shallow device, before its start)."""

    exit_code = PARTIAL
