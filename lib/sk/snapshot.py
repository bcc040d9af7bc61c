"""Snapshots: a team's resolved state as of a point (seq, chain) of its log, sealed
under the team key like events, so that a fresh device (a CI runner) starts from
it and the events after it, not the whole history (sk sync --shallow).

The server asks, in an ordinary push or pull answer ("snapshot_wanted"), when the
log has grown enough since its last snapshot; the device that hears it builds one
from its state once it has pulled to the end, and uploads it. It holds, for every
aggregate, its live and deletion stamps; for every register, its value, stamp and
the event behind it (for blame); and the open conflicts:

content  gzip(JSON {"seq", "chain", "aggregates": [[type, id, live_lamport,
         live_node, del_lamport, del_node]], "fields": [[type, id, key, value,
         lamport, node, event_id, event_type, timestamp, actor]], "conflicts":
         [[type, id, key, lost, closed]]})
blob     crypto.seal_data(data_key(team key, team, "snapshot"), content, ad)
ad       "sk/2 snapshot|<team>|<epoch>|<seq>|<chain hex>"

A device refuses (exit 5) a snapshot that does not authenticate, and one whose
point is not on the log: the events after it must continue its chain.
"""

import zlib

from .errors import IntegrityError
from .event import dumps, is_deletion, loads

MAX_CONTENT = 64 * 1024 * 1024   # a snapshot inflates to at most this
BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot_base (
    seq     INTEGER NOT NULL,
    chain   TEXT NOT NULL,
    content TEXT NOT NULL       -- the snapshot's JSON, opened: the state before the log held here
)
"""


def ad(team, epoch, seq, chain):
    return f"sk/2 snapshot|{team}|{int(epoch)}|{int(seq)}|{chain}".encode()


def seal(team, epoch, team_key, seq, chain, content_text, nonce=None):
    from . import crypto   # lazily: sk blame, sk-log and sk conflicts never seal
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    body = c.compress(content_text.encode()) + c.flush()
    return crypto.seal_data(crypto.data_key(team_key, team, "snapshot"), body,
                            ad(team, epoch, seq, chain), nonce)


def open_(team, epoch, team_key, seq, chain, blob):
    """The snapshot's content object; IntegrityError if it does not authenticate for
    this team, epoch and point, or is not a snapshot."""
    from . import crypto
    try:
        body = crypto.open_data(crypto.data_key(team_key, team, "snapshot"), blob,
                                ad(team, epoch, seq, chain), "snapshot")
        d = zlib.decompressobj(31)
        text = d.decompress(body, MAX_CONTENT)
        if d.unconsumed_tail or not d.eof:
            raise ValueError("too large or truncated")
        content = loads(text)
        if content.get("seq") != seq or content.get("chain") != chain:
            raise ValueError("its point is not the one it was sealed for")
        for k in ("aggregates", "fields", "conflicts"):
            if not isinstance(content.get(k), list):
                raise ValueError(f"no {k}")
    except crypto.CryptoError as e:
        raise IntegrityError(f"the snapshot at seq {seq} failed authentication under the team"
                             f" key: {e}") from None
    except (ValueError, TypeError, AttributeError, zlib.error) as e:
        raise IntegrityError(f"the snapshot at seq {seq} is not a snapshot: {e}") from None
    return content


# -- building ---------------------------------------------------------------------------
def build(store):
    """(seq, chain hex, content JSON text) of this device's state as of the end of
    the team log it pulled, or None when its state is not exactly that now (events
    not folded, or pushed since the pull). Aggregates that events not on the server
    touched (queued, local-only) are folded again from the server's events alone."""
    from .resolve import fold
    seq, chain = store.cursor(), store.cursor_chain()
    known = store.known()
    counts = store.counts(totals=False)
    if seq == 0 or chain is None or counts["unapplied"] or (known and known[0] != seq):
        return None
    db = store.db
    dirty = set(db.execute("SELECT DISTINCT aggregate_type, aggregate_id FROM events"
                           " WHERE status IN ('queued', 'local_only')").fetchall())
    aggs = {(t, i): [(ll, ln), (dl, dn)] for t, i, ll, ln, dl, dn in db.execute(
        "SELECT aggregate_type, aggregate_id, live_lamport, live_node, del_lamport, del_node"
        " FROM aggregates")}
    fields = {(t, i, k): (lam, node, v) for t, i, k, v, lam, node in db.execute(
        "SELECT aggregate_type, aggregate_id, field, value, lamport, node_id FROM fields")}
    for key in dirty:   # the state as the server's log alone makes it
        aggs.pop(key, None)
        for f in [f for f in fields if f[:2] == key]:
            del fields[f]
        a, f = fold((etype, t, i, lam, node, loads(p)) for etype, t, i, lam, node, p in db.execute(
            "SELECT event_type, aggregate_type, aggregate_id, lamport_clock, node_id, payload"
            " FROM events WHERE aggregate_type = ? AND aggregate_id = ? AND status IN"
            " ('sent', 'remote')", key))
        aggs.update(a)
        fields.update(f)
        for base in _base_rows(store, *key):
            aggs_base, fields_base = base
            _merge(aggs, fields, aggs_base, fields_base)
    who = _writers(store, fields)
    parts = [f'{{"seq":{seq},"chain":{dumps(chain.hex())},"aggregates":[']
    parts.append(",".join(dumps([t, i, live[0], live[1], dead[0], dead[1]])
                          for (t, i), (live, dead) in sorted(aggs.items())))
    parts.append('],"fields":[')
    parts.append(",".join(
        f"[{dumps(t)},{dumps(i)},{dumps(k)},{v},{int(lam)},{dumps(node)},"
        f"{dumps(who.get((node, lam), [None] * 4))[1:-1]}]"
        for (t, i, k), (lam, node, v) in sorted(fields.items())))
    parts.append('],"conflicts":[')
    rows = db.execute("SELECT aggregate_type, aggregate_id, field, lost, closed FROM conflicts"
                      ).fetchall() if _exists(db, "conflicts") else []
    parts.append(",".join(f"[{dumps(t)},{dumps(i)},{dumps(k)},{lost},{closed}]"
                          for t, i, k, lost, closed in rows))
    parts.append("]}")
    return seq, chain.hex(), "".join(parts)


def _writers(store, fields):
    """{(node, lamport): [event_id, event_type, timestamp, actor]} of the writes that
    win each register: from the log, else from the snapshot this device began at."""
    from .store import by_pairs
    out = {}
    stamps = sorted({(node, lam) for lam, node, _ in fields.values()})
    for node, lam, eid, etype, ts, extra in by_pairs(
            store.db, "SELECT e.node_id, e.lamport_clock, e.event_id, e.event_type, e.timestamp,"
            " e.extra FROM {pairs} AS k JOIN events e ON e.node_id = k.column1"
            " AND e.lamport_clock = k.column2", stamps):
        if not is_deletion(etype):
            out[(node, lam)] = [eid, etype, ts, (loads(extra).get("actor") if extra else None)]
    base = _base(store)
    if base:
        for t, i, k, v, lam, node, eid, etype, ts, actor in base["fields"]:
            out.setdefault((node, lam), [eid, etype, ts, actor])
    return out


def _merge(aggs, fields, aggs_base, fields_base):
    for key, (live, dead) in aggs_base.items():
        slot = aggs.setdefault(key, [(0, ""), (0, "")])
        slot[0], slot[1] = max(slot[0], live), max(slot[1], dead)
    for key, cand in fields_base.items():
        if key not in fields or cand > fields[key]:
            fields[key] = cand


def _exists(db, table):
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() \
        is not None


# -- a shallow device: its state begins at a snapshot -------------------------------------
def _base(store):
    """The snapshot this device began at (opened; read once per store), or None."""
    cached = store.__dict__.get("_snapshot_base")
    if cached is not None and cached[0] == store.meta("shallow"):
        return cached[1]
    base = None
    if _exists(store.db, "snapshot_base"):
        row = store.db.execute("SELECT content FROM snapshot_base").fetchone()
        base = loads(row[0]) if row else None
    store._snapshot_base = (store.meta("shallow"), base)
    return base


def _base_rows(store, atype, aid):
    """[(aggregates, fields)] of one aggregate in the snapshot this device began at."""
    base = _base(store)
    if not base:
        return []
    aggs = {(t, i): [(ll, ln), (dl, dn)] for t, i, ll, ln, dl, dn in base["aggregates"]
            if (t, i) == (atype, aid)}
    fields = {(t, i, k): (lam, node, dumps(v)) for t, i, k, v, lam, node, *_ in base["fields"]
              if (t, i) == (atype, aid)}
    return [(aggs, fields)]


def base_fields(store, atype, aid):
    """{key: the write behind it} of an aggregate in the snapshot this device began
    at ({} for a device that holds its whole history)."""
    base = _base(store)
    if not base:
        return {}
    return {k: {"value": v, "event_id": eid, "event_type": etype, "lamport_clock": lam,
                "node_id": node, "timestamp": ts, "actor": actor, "device": None}
            for t, i, k, v, lam, node, eid, etype, ts, actor in base["fields"]
            if (t, i) == (atype, aid)}


def restore_base(store):
    """Put the snapshot this device began at into its (emptied) state tables, inside
    the caller's write: a rebuild of a shallow device folds its events onto it."""
    base = _base(store)
    if not base:
        return
    from .resolve import _mapped
    pairs = [tuple(p) for p in loads(store.meta("path_map", "[]"))]
    db = store.db
    db.executemany("INSERT INTO aggregates VALUES (?, ?, ?, ?, ?, ?)", base["aggregates"])
    db.executemany("INSERT INTO fields(aggregate_type, aggregate_id, field, value, mapped,"
                   " lamport, node_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(t, i, k, dumps(v), _mapped(dumps(v), pairs), lam, node)
                    for t, i, k, v, lam, node, *_ in base["fields"]])
    db.executemany("INSERT OR REPLACE INTO conflicts VALUES (?, ?, ?, ?, ?)",
                   [(t, i, k, dumps(lost), dumps(closed))
                    for t, i, k, lost, closed in base["conflicts"]])


def load(store, content, seq, chain, device=None):
    """Begin this (fresh) device's state at a snapshot: its state tables, its cursor
    and chain, its known point and its Lamport clock, in one transaction. Its own
    events (appended before its first sync) are folded again on top."""
    from .resolve import state_tables
    state_tables(store)
    text = dumps(content)
    with store.write() as db:
        if not fresh(store):
            raise IntegrityError("a snapshot begins only a fresh device's state")
        db.execute(BASE_SCHEMA)
        db.execute("DELETE FROM snapshot_base")
        db.execute("INSERT INTO snapshot_base VALUES (?, ?, ?)", (seq, chain, text))
        db.execute("DELETE FROM aggregates")
        db.execute("DELETE FROM fields")
        db.execute("DELETE FROM conflicts")
        restore_base(store)
        top = max([r[2] for r in content["aggregates"]] + [r[4] for r in content["aggregates"]]
                  + [0])
        store.put("clock", max(store.clock(), top) + 1)
        store.put("cursor", seq)
        store.put("cursor_chain", chain)
        store.put("known", f"{seq}:{chain}")
        store.put("shallow", seq)
        store.put("shallow_from", dumps({"seq": seq, "device": device}))
        db.execute("UPDATE events SET applied = 0")
        # its own events were written without the snapshot's state: look at them as
        # at others' (resolve flags what they may have overwritten unseen)
        top = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        store.put("check_own_upto", top)
    return len(content["aggregates"])


def end(store):
    """The history before the snapshot is held now (sk-pull --unshallow): the
    device holds its whole history, and a rebuild folds it all."""
    with store.write() as db:
        store.put("shallow", "")
        store.put("shallow_from", "")
        db.execute("DROP TABLE IF EXISTS snapshot_base")


def shallow_seq(store):
    """The seq this device's history begins after, or None if it holds all of it."""
    value = store.meta("shallow")
    return int(value) if value else None


def point(store):
    """(seq, chain hex) of the snapshot this device began at, or None."""
    base = _base(store)
    return (base["seq"], base["chain"]) if base else None


def shallow_info(store):
    """{"seq", "device"} of the snapshot a shallow device began at, or None."""
    if shallow_seq(store) is None:
        return None
    return loads(store.meta("shallow_from") or "null") or {"seq": shallow_seq(store),
                                                           "device": None}


def offer(store, client, ring):
    """Build a snapshot and give it to the server (it asked). Returns its seq, or
    None if this device's state is not exactly a point of the log right now."""
    built = build(store)
    if built is None:
        return None
    seq, chain, text = built
    epoch, key = ring.current()
    blob = seal(ring.team, epoch, key, seq, chain, text)
    if len(blob) > 7 * 1024 * 1024:
        return None   # (a state this large goes without snapshots: one request carries one)
    client.call("snapshot", {"seq": seq, "chain": chain, "epoch": epoch}, [blob])
    return seq


def fetch(client, ring):
    """The newest snapshot the server holds, opened: (seq, chain, content, device)
    or None (none yet, or sealed under an epoch this device is not granted)."""
    answer = client.call("snapshot-get", {})
    if answer.get("seq") is None:
        return None
    seq, chain, epoch = answer.get("seq"), answer.get("chain"), answer.get("epoch")
    blobs = answer.get("attachments", [])
    if (type(seq) is not int or seq < 1 or not isinstance(chain, str) or type(epoch) is not int
            or len(blobs) != 1):
        raise IntegrityError("malformed snapshot answer from the server")
    key = ring.get(epoch)
    if key is None:
        return None
    device = answer.get("device") if isinstance(answer.get("device"), str) else None
    return seq, chain, open_(ring.team, epoch, key, seq, chain, blobs[0]), device


def fresh(store):
    """True if this device has read nothing of its team's log yet (it may hold
    events of its own): its state may begin at a snapshot."""
    return (store.cursor() == 0 and shallow_seq(store) is None
            and store.db.execute("SELECT 1 FROM events WHERE status = 'remote' LIMIT 1"
                                 ).fetchone() is None)


def begin(store, client, ring):
    """Begin a fresh device's state at the team's newest snapshot: {seq, aggregates,
    device} or None if the server holds none this device can open (it then reads
    the whole log, as always)."""
    if not fresh(store):
        return None
    got = fetch(client, ring)
    if got is None:
        return None
    seq, chain, content, device = got
    return {"seq": seq, "aggregates": load(store, content, seq, chain, device),
            "device": device}


__all__ = ["base_fields", "begin", "build", "end", "fetch", "fresh", "load", "point", "offer", "open_",
           "restore_base", "seal", "shallow_info", "shallow_seq"]
