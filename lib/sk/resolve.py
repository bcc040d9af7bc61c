"""Fold the event log into the state.

The merge rule, in one place: for each aggregate, each payload key is a
last-writer-wins register ordered by (lamport_clock, node_id) (then by the value's
JSON text, so even a forged tie is decided the same way everywhere); an event
whose type ends in ``_deleted`` deletes the aggregate as of its stamp, hiding
every field written before it; a later-stamped event of any other type brings
the aggregate back. Every step is a maximum, so the state does not depend on the
order or the number of times events arrive.

Path remapping rewrites string values in the state (never the log) that equal a
mapped prefix or start with it followed by '/'.
"""

import json

from .event import dumps, dumps_value, is_deletion

CHUNK = 5000
STATE_VERSION = "2"
# The state, in the device's file beside the log (sk.store), owned here.
STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS aggregates (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    live_lamport   INTEGER NOT NULL DEFAULT 0,
    live_node      TEXT NOT NULL DEFAULT '',
    del_lamport    INTEGER NOT NULL DEFAULT 0,
    del_node       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (aggregate_type, aggregate_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fields (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    field          TEXT NOT NULL,
    value          TEXT NOT NULL,    -- JSON, as written in the winning event
    mapped         TEXT,             -- JSON after path remapping, NULL when unchanged
    lamport        INTEGER NOT NULL,
    node_id        TEXT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, field)
) WITHOUT ROWID
"""


def state_tables(store):
    """Create the state tables in the device's file if they are not there yet."""
    if store.meta("state_schema") == STATE_VERSION:
        return
    from .history import tables
    with store.write() as db:
        for stmt in STATE_SCHEMA.split(";"):
            db.execute(stmt)
        tables(db)   # the conflicts found, and the aggregates to look at
        store.put("state_schema", STATE_VERSION)


def fold(events, aggs=None, fields=None):
    """Fold `events` (tuples event_type, aggregate_type, aggregate_id,
    lamport_clock, node_id, payload dict) into two dicts:
    aggs[(type, id)] = [live stamp, deletion stamp]; fields[(type, id, key)] =
    (lamport, node, value JSON). Pure; used by resolve() and by the tests."""
    aggs = {} if aggs is None else aggs
    fields = {} if fields is None else fields
    for etype, atype, aid, lamport, node, payload in events:
        key = (atype, aid)
        stamp = (lamport, node)
        slot = aggs.get(key)
        if slot is None:
            slot = aggs[key] = [(0, ""), (0, "")]
        if is_deletion(etype):
            if stamp > slot[1]:
                slot[1] = stamp
            continue
        if stamp > slot[0]:
            slot[0] = stamp
        for name, value in payload.items():
            cand = (lamport, node, dumps_value(value))
            fkey = (atype, aid, name)
            cur = fields.get(fkey)
            if cur is None or cand > cur:
                fields[fkey] = cand
    return aggs, fields


def view(aggs, fields, include_deleted=False):
    """The visible state {type: {id: {key: value}}} from fold()'s dicts."""
    out = {}
    for (atype, aid), (live, dead) in aggs.items():
        if dead >= live and not include_deleted:
            continue
        obj = out.setdefault(atype, {}).setdefault(aid, {})
        if dead >= live:
            obj["_deleted"] = True
    for (atype, aid, name), (lamport, node, value) in fields.items():
        live, dead = aggs[(atype, aid)]
        obj = out.get(atype, {}).get(aid)
        if obj is None:
            continue
        if (lamport, node) > dead or (dead >= live and include_deleted):
            obj[name] = json.loads(value)
    return out


def remap(value, pairs):
    """Apply path map `pairs` [(FROM, TO)] (longest first) to strings inside value."""
    if isinstance(value, str):
        for src, dst in pairs:
            if value == src:
                return dst
            if value.startswith(src + "/") or (src == "/" and value.startswith("/")):
                rest = value[len(src):].lstrip("/") if src != "/" else value[1:]
                return dst.rstrip("/") + "/" + rest
        return value
    if isinstance(value, list):
        return [remap(v, pairs) for v in value]
    if isinstance(value, dict):
        return {k: remap(v, pairs) for k, v in value.items()}
    return value


def _mapped(value_json, pairs):
    if not pairs or ('"' not in value_json):
        return None
    value = json.loads(value_json)
    new = remap(value, pairs)
    return None if new == value else dumps(new)


_AGG_UPSERT = """
INSERT INTO aggregates(aggregate_type, aggregate_id, live_lamport, live_node, del_lamport, del_node)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(aggregate_type, aggregate_id) DO UPDATE SET
  live_lamport = CASE WHEN (excluded.live_lamport, excluded.live_node) > (live_lamport, live_node)
                      THEN excluded.live_lamport ELSE live_lamport END,
  live_node    = CASE WHEN (excluded.live_lamport, excluded.live_node) > (live_lamport, live_node)
                      THEN excluded.live_node ELSE live_node END,
  del_lamport  = CASE WHEN (excluded.del_lamport, excluded.del_node) > (del_lamport, del_node)
                      THEN excluded.del_lamport ELSE del_lamport END,
  del_node     = CASE WHEN (excluded.del_lamport, excluded.del_node) > (del_lamport, del_node)
                      THEN excluded.del_node ELSE del_node END
"""
_FIELD_UPSERT = """
INSERT INTO fields(aggregate_type, aggregate_id, field, value, mapped, lamport, node_id)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(aggregate_type, aggregate_id, field) DO UPDATE SET
  value = excluded.value, mapped = excluded.mapped,
  lamport = excluded.lamport, node_id = excluded.node_id
WHERE (excluded.lamport, excluded.node_id, excluded.value) > (fields.lamport, fields.node_id, fields.value)
"""


def resolve(store, path_map=None, rebuild=False, progress=None):
    """Fold every unapplied event of `store` into its state tables, chunk by chunk,
    each chunk one transaction. `path_map` [(FROM, TO)] replaces the stored map
    when given (re-mapping the whole state if it changed). Returns events applied."""
    state_tables(store)
    db = store.db
    pairs = [tuple(p) for p in (path_map if path_map is not None
                                else json.loads(store.meta("path_map", "[]")))]
    if rebuild or store.meta("needs_rebuild") == "1":
        from .snapshot import restore_base
        with store.write():
            store.put("needs_rebuild", 0)
            db.execute("DELETE FROM aggregates")
            db.execute("DELETE FROM fields")
            db.execute("DELETE FROM conflicts")
            db.execute("UPDATE events SET applied = 0 WHERE applied = 1")
            restore_base(store)   # a shallow device starts again from its snapshot
    if path_map is not None and dumps(pairs) != store.meta("path_map", "[]"):
        _remap_all(store, pairs)
    applied = 0
    check_upto = int(store.meta("check_own_upto", "0") or 0)
    _GENERATION[0] += 1   # (a Folder's stamps no longer hold)
    while True:
        with store.write():
            rows = db.execute(
                "SELECT seq, event_type, aggregate_type, aggregate_id, lamport_clock, node_id,"
                " payload, extra, status = 'remote' FROM events WHERE applied = 0 ORDER BY seq"
                " LIMIT ?", (CHUNK,)).fetchall()
            if not rows:
                break
            _fold_in(db, [(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
                          for r in rows], pairs, check_upto)
            db.execute("UPDATE events SET applied = 1 WHERE applied = 0 AND seq <= ?",
                       (rows[-1][0],))
        applied += len(rows)
        if progress:
            progress(len(rows))
    return applied


_GENERATION = [0]   # moved by every fold of this process outside a Folder (resolve())


class Folder:
    """Folds pulled events into the state in the transaction that stores them
    (sk.protocol.accept_page's `fold`): what resolve() would do with them next,
    without reading them back and parsing them again; under the stored path map
    (read at each page). folder(db, events, payloads, extras): Events, their
    payload dicts and their extras (dicts or None), all another device's; then
    commit() once the page is stored, or forget() if it was not. `folded` counts
    the events folded and stored.

    It keeps the stamps of the values it folded, aggregate by aggregate (up to
    CACHED aggregates), so the next page's conflict check reads from the state
    only the aggregates it has not seen; that memory is dropped when anything else
    folded: another connection (PRAGMA data_version) or this process (resolve())."""

    CACHED = 20_000

    def __init__(self, store):
        state_tables(store)
        self.store, self.folded, self.pending = store, 0, 0
        self.stamps, self.seen = {}, None

    def __call__(self, db, events, payloads, extras):
        seen = (db.execute("PRAGMA data_version").fetchone()[0], _GENERATION[0])
        if seen != self.seen or len(self.stamps) > self.CACHED:
            self.stamps, self.seen = {}, seen
        pairs = [tuple(p) for p in json.loads(self.store.meta("path_map", "[]"))]
        _fold_in(db, [(None, *ev[1:6], p, x, True)
                      for ev, p, x in zip(events, payloads, extras)], pairs,
                 stamps=self.stamps)
        self.pending += len(events)

    def commit(self):
        self.folded, self.pending = self.folded + self.pending, 0

    def forget(self):
        self.stamps, self.pending = {}, 0


def _fold_in(db, items, pairs, check_upto=0, stamps=None):
    """Fold one chunk, items (seq, event_type, aggregate_type, aggregate_id, lamport,
    node, payload dict, extra (JSON text, dict or None), another device's), into
    the state tables, flagging what may have been lost on the way (_flag_suspects).
    stamps: {(type, id): {key: stamp}} the state's stamps of aggregates already
    read, kept up to date (Folder)."""
    _flag_suspects(db, items, check_upto, stamps)
    aggs, fields = fold(r[1:7] for r in items)
    db.executemany(_AGG_UPSERT, [(t, i, live[0], live[1], dead[0], dead[1])
                                 for (t, i), (live, dead) in aggs.items()])
    db.executemany(_FIELD_UPSERT, [(t, i, k, v, _mapped(v, pairs), lam, node)
                                   for (t, i, k), (lam, node, v) in fields.items()] if pairs
                   else [(t, i, k, v, None, lam, node)
                         for (t, i, k), (lam, node, v) in fields.items()])


def _flag_suspects(db, items, check_upto=0, stamps=None):
    """Flag the aggregates of a chunk about to be folded where a write may have been
    lost to a concurrent one (history.suspects_of), from the stamps of the values
    this device holds: one indexed lookup per aggregate that others wrote in the
    chunk (unless `stamps` holds it); this device's own writes (written against
    this state, folded in the order it wrote them), and sequential writes in order,
    flag nothing. Own events up to seq check_upto (written before a shallow start)
    are looked at too. stamps: as _fold_in's; aggregates read here are kept in it,
    and every aggregate it holds moves on with the chunk."""
    from .history import suspects_of
    from .store import by_pairs
    check = [bool(r[8]) or r[0] <= check_upto for r in items]
    keys = {(r[2], r[3]) for r, c in zip(items, check) if r[7] and c}
    if not keys and not stamps:
        return
    held = stamps if stamps is not None else {}
    read = sorted(keys - held.keys())
    for key in read:
        held[key] = {}
    for t, a, k, lam, node in by_pairs(
            db, "SELECT f.aggregate_type, f.aggregate_id, f.field, f.lamport, f.node_id FROM"
            " {pairs} AS k JOIN fields f ON f.aggregate_type = k.column1"
            " AND f.aggregate_id = k.column2", read):
        held[(t, a)][k] = (lam, node)
    flagged = suspects_of(((r[2], r[3], r[1], r[4], r[5], r[6], r[7], c)
                           for r, c in zip(items, check)), held)
    if flagged:
        db.executemany("INSERT OR IGNORE INTO suspects VALUES (?, ?)", sorted(flagged))


def _remap_all(store, pairs):
    with store.write() as db:
        rows = db.execute("SELECT aggregate_type, aggregate_id, field, value FROM fields"
                          " WHERE value LIKE '%\"%'").fetchall()
        db.execute("UPDATE fields SET mapped = NULL WHERE mapped IS NOT NULL")
        db.executemany("UPDATE fields SET mapped = ? WHERE aggregate_type = ? AND"
                       " aggregate_id = ? AND field = ?",
                       [(m, t, i, f) for t, i, f, v in rows
                        if (m := _mapped(v, pairs)) is not None])
        store.put("path_map", dumps(pairs))


def load_state(store, aggregate_type=None, aggregate_id=None, include_deleted=False):
    """The resolved state as {type: {id: {key: value}}} (path map applied)."""
    if not store.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fields'").fetchone():
        return {}   # nothing resolved yet (and a read creates nothing)
    where, args = "", []
    if aggregate_type is not None:
        where, args = " WHERE aggregate_type = ?", [aggregate_type]
        if aggregate_id is not None:
            where += " AND aggregate_id = ?"
            args.append(aggregate_id)
    with store.read() as db:
        aggs = {(t, i): [(ll, ln), (dl, dn)] for t, i, ll, ln, dl, dn in db.execute(
            "SELECT aggregate_type, aggregate_id, live_lamport, live_node, del_lamport,"
            " del_node FROM aggregates" + where, args)}
        fields = {(t, i, f): (lam, node, m if m is not None else v)
                  for t, i, f, v, m, lam, node in db.execute(
                      "SELECT aggregate_type, aggregate_id, field, value, mapped, lamport,"
                      " node_id FROM fields" + where, args)}
    return view(aggs, fields, include_deleted)
