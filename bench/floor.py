"""The floor: the least work any end-to-end encrypted design must do to move N events
device A -> server -> device B, in one process, with no HTTP, no process start-up, no
validation, no auth bookkeeping and no retries.

Push: read A's queue from a cursor (seq > last acknowledged), 1,000 events a batch
(the protocol's limit); encode the batch as JSON (payloads as stored text), gzip it and
seal it once under the team key (AES-256-GCM); seal the request (the transport) once;
on the "server", open the transport, store the sealed batch and one index row per event
(id, node, clock) in one transaction, fsync'd (synchronous=FULL); seal and open the
acknowledgement; mark the batch sent on A in one transaction.
Pull: page the server's index 5,000 events a time (the protocol's page), with the sealed
batches those rows come from; seal the page once; on B open it, open each batch
(GCM, gunzip, JSON), insert the events and fold them into the state (last writer wins
per key), one transaction a page. The server never parses an event: it cannot.
It runs with Python's cyclic garbage collector off, as sk's device commands do.
"""

import json
import os
import sqlite3
import time
import zlib

from Cryptodome.Cipher import AES

BATCH, PAGE = 1000, 5000
COLS = "event_id, event_type, aggregate_type, aggregate_id, lamport_clock, node_id, payload, timestamp"


def _db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _seal(key, data):
    nonce = os.urandom(12)
    ct, tag = AES.new(key, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(data)
    return nonce + ct + tag


def _open(key, blob):
    return AES.new(key, AES.MODE_GCM, nonce=blob[:12]).decrypt_and_verify(blob[12:-16], blob[-16:])


def _gzip(data):
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def run(workdir, events):
    """Move `events` (tuples in COLS order, payload as JSON text) A -> server -> B.
    Returns (push seconds, pull+resolve seconds)."""
    team, transport = os.urandom(32), os.urandom(32)
    a, s, b = (_db(os.path.join(workdir, f"floor-{n}.db")) for n in "asb")
    a.execute(f"CREATE TABLE events (seq INTEGER PRIMARY KEY, {COLS}, sent INTEGER DEFAULT 0)")
    s.execute("CREATE TABLE batches (batch INTEGER PRIMARY KEY, sealed BLOB)")
    s.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, node TEXT,"
              " clock INTEGER, batch INTEGER, idx INTEGER)")
    b.execute(f"CREATE TABLE events (seq INTEGER PRIMARY KEY, {COLS})")
    b.execute("CREATE UNIQUE INDEX b_id ON events(event_id)")
    b.execute("CREATE TABLE state (t TEXT, i TEXT, f TEXT, v TEXT, l INTEGER, n TEXT,"
              " PRIMARY KEY (t, i, f)) WITHOUT ROWID")
    a.execute("BEGIN")
    a.executemany(f"INSERT INTO events({COLS}) VALUES (?,?,?,?,?,?,?,?)", events)
    a.execute("COMMIT")
    dumps = json.JSONEncoder(separators=(",", ":")).encode

    t0 = time.perf_counter()
    cursor = 0
    while True:
        rows = a.execute(f"SELECT seq, {COLS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                         (cursor, BATCH)).fetchall()
        if not rows:
            break
        manifest = dumps([[r[1], r[6], r[5]] for r in rows]).encode()
        content = ('{"events":[' + ",".join(
            f"[{dumps(r[2])},{dumps(r[3])},{dumps(r[4])},{r[7]},{dumps(r[8])}]" for r in rows)
            + "]}").encode()
        sealed = _seal(team, _gzip(content))
        body = _seal(transport, len(manifest).to_bytes(4, "big") + manifest + sealed)
        plain = _open(transport, body)                          # the server
        n = int.from_bytes(plain[:4], "big")
        got = json.loads(plain[4:4 + n])
        s.execute("BEGIN")
        batch = s.execute("INSERT INTO batches (sealed) VALUES (?)", (plain[4 + n:],)).lastrowid
        s.executemany("INSERT INTO events (event_id, node, clock, batch, idx) VALUES (?,?,?,?,?)",
                      [(e, node, clock, batch, i) for i, (e, node, clock) in enumerate(got)])
        s.execute("COMMIT")
        _open(transport, _seal(transport, dumps([e[0] for e in got]).encode()))  # the answer
        a.execute("BEGIN")
        a.execute("UPDATE events SET sent = 1 WHERE seq > ? AND seq <= ?", (cursor, rows[-1][0]))
        a.execute("COMMIT")
        cursor = rows[-1][0]
    push = time.perf_counter() - t0

    t0 = time.perf_counter()
    cursor = 0
    while True:
        rows = s.execute("SELECT seq, event_id, node, clock, batch, idx FROM events WHERE seq > ?"
                         " ORDER BY seq LIMIT ?", (cursor, PAGE)).fetchall()
        if not rows:
            break
        cursor = rows[-1][0]
        ids = sorted({r[4] for r in rows})
        blobs = dict(s.execute(f"SELECT batch, sealed FROM batches WHERE batch IN"
                               f" ({','.join('?' * len(ids))})", ids).fetchall())
        index = dumps([[r[1], r[2], r[3], r[4], r[5]] for r in rows]).encode()
        page = _seal(transport, len(index).to_bytes(4, "big") + index
                     + b"".join(len(blobs[i]).to_bytes(4, "big") + blobs[i] for i in ids))
        plain = _open(transport, page)                          # device B
        n = int.from_bytes(plain[:4], "big")
        got, at, opened = json.loads(plain[4:4 + n]), 4 + n, {}
        for i in ids:
            size = int.from_bytes(plain[at:at + 4], "big")
            opened[i] = json.loads(zlib.decompress(_open(team, plain[at + 4:at + 4 + size]),
                                                   31))["events"]
            at += 4 + size
        out, fields = [], {}
        for eid, node, clock, batch, idx in got:
            etype, atype, aid, payload, ts = opened[batch][idx]
            out.append((eid, etype, atype, aid, clock, node, dumps(payload), ts))
            for f, v in payload.items():
                k, stamp = (atype, aid, f), (clock, node)
                if k not in fields or stamp > fields[k][1:]:
                    fields[k] = (dumps(v), *stamp)
        b.execute("BEGIN")
        b.executemany(f"INSERT INTO events({COLS}) VALUES (?,?,?,?,?,?,?,?)", out)
        b.executemany("INSERT INTO state VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                      " v = excluded.v, l = excluded.l, n = excluded.n"
                      " WHERE (excluded.l, excluded.n) > (l, n)",
                      [(*k, *v) for k, v in fields.items()])
        b.execute("COMMIT")
    pull = time.perf_counter() - t0
    for db in (a, s, b):
        db.close()
    return push, pull


if __name__ == "__main__":
    import gc
    import sys
    gc.disable()   # as sk's commands run (sk.cmd._common): the floor must not pay what sk does not
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    from sk.event import new_event_id   # the ids sk-stamp gives
    workdir, ndjson = sys.argv[1], sys.argv[2]
    events = []
    with open(ndjson) as f:
        for i, line in enumerate(f):
            ev = json.loads(line)
            events.append((ev.get("event_id") or new_event_id(), ev["event_type"], ev["aggregate_type"],
                           ev["aggregate_id"], i + 1, "node-a",
                           json.dumps(ev["payload"], separators=(",", ":")),
                           "2026-11-22T00:00:00.000Z"))
    push, pull = run(workdir, events)
    print(json.dumps({"push": push, "pull": pull}))
