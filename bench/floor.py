"""The floor: the least work any design must do to move N events device A ->
server -> device B, in one process, with no HTTP and no process start-up.

Read the queue from A's SQLite, JSON-encode, gzip and AES-GCM seal each batch;
open, gunzip and parse it on the "server" and insert it in one transaction per
batch; mark the batch acknowledged on A; then page the events out of the server
(select, JSON, gzip, seal), open them on B, insert them in one transaction per
page and fold them into B's state. No validation, no auth, no retries: every
real design does at least this much.
"""

import json
import os
import sqlite3
import time
import zlib

from Cryptodome.Cipher import AES

BATCH = 1000
COLS = "event_id, event_type, aggregate_type, aggregate_id, lamport_clock, node_id, payload, timestamp"


def _db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _seal(key, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    plain = c.compress(data) + c.flush()
    nonce = os.urandom(12)
    ct, tag = AES.new(key, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(plain)
    return nonce + ct + tag


def _open(key, blob):
    plain = AES.new(key, AES.MODE_GCM, nonce=blob[:12]).decrypt_and_verify(blob[12:-16], blob[-16:])
    return json.loads(zlib.decompress(plain, 31))


def run(workdir, events):
    """Move `events` (tuples in COLS order, payload as JSON text) A -> server -> B.
    Returns (push seconds, pull+resolve seconds)."""
    key = os.urandom(32)
    a, s, b = (_db(os.path.join(workdir, f"floor-{n}.db")) for n in "asb")
    a.execute(f"CREATE TABLE events (seq INTEGER PRIMARY KEY, {COLS}, sent INTEGER DEFAULT 0)")
    a.execute("CREATE INDEX q ON events(seq) WHERE sent = 0")
    s.execute(f"CREATE TABLE events (seq INTEGER PRIMARY KEY, {COLS})")
    s.execute("CREATE UNIQUE INDEX s_id ON events(event_id)")
    b.execute(f"CREATE TABLE events (seq INTEGER PRIMARY KEY, {COLS})")
    b.execute("CREATE UNIQUE INDEX b_id ON events(event_id)")
    b.execute("CREATE TABLE state (t TEXT, i TEXT, f TEXT, v TEXT, l INTEGER, n TEXT,"
              " PRIMARY KEY (t, i, f)) WITHOUT ROWID")
    a.execute("BEGIN")
    a.executemany(f"INSERT INTO events({COLS}) VALUES (?,?,?,?,?,?,?,?)", events)
    a.execute("COMMIT")

    t0 = time.perf_counter()
    while True:
        rows = a.execute(f"SELECT seq, {COLS} FROM events WHERE sent = 0 ORDER BY seq LIMIT ?",
                         (BATCH,)).fetchall()
        if not rows:
            break
        blob = _seal(key, [dict(zip(COLS.split(", "), r[1:]), payload=json.loads(r[7]))
                           for r in rows])
        got = _open(key, blob)                                  # the server
        s.execute("BEGIN")
        s.executemany(f"INSERT INTO events({COLS}) VALUES (?,?,?,?,?,?,?,?)",
                      [(e["event_id"], e["event_type"], e["aggregate_type"], e["aggregate_id"],
                        e["lamport_clock"], e["node_id"], json.dumps(e["payload"]), e["timestamp"])
                       for e in got])
        s.execute("COMMIT")
        _open(key, _seal(key, [e["event_id"] for e in got]))    # the acknowledgement
        a.execute("BEGIN")
        a.execute("UPDATE events SET sent = 1 WHERE sent = 0 AND seq <= ?", (rows[-1][0],))
        a.execute("COMMIT")
    push = time.perf_counter() - t0

    t0 = time.perf_counter()
    cursor = 0
    while True:
        rows = s.execute(f"SELECT seq, {COLS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                         (cursor, BATCH)).fetchall()
        if not rows:
            break
        cursor = rows[-1][0]
        page = _open(key, _seal(key, [dict(zip(COLS.split(", "), r[1:]), payload=json.loads(r[7]))
                                      for r in rows]))
        b.execute("BEGIN")
        b.executemany(f"INSERT INTO events({COLS}) VALUES (?,?,?,?,?,?,?,?)",
                      [(e["event_id"], e["event_type"], e["aggregate_type"], e["aggregate_id"],
                        e["lamport_clock"], e["node_id"], json.dumps(e["payload"]), e["timestamp"])
                       for e in page])
        fields = {}
        for e in page:
            for f, v in e["payload"].items():
                k = (e["aggregate_type"], e["aggregate_id"], f)
                stamp = (e["lamport_clock"], e["node_id"])
                if k not in fields or stamp > fields[k][1:]:
                    fields[k] = (json.dumps(v), *stamp)
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
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    from sk.event import new_event_id   # the ids sk-stamp gives
    workdir, ndjson = sys.argv[1], sys.argv[2]
    events = []
    with open(ndjson) as f:
        for i, line in enumerate(f):
            ev = json.loads(line)
            events.append((ev.get("event_id") or new_event_id(), ev["event_type"], ev["aggregate_type"],
                           ev["aggregate_id"], i + 1, "node-a", json.dumps(ev["payload"]),
                           "2026-11-22T00:00:00Z"))
    push, pull = run(workdir, events)
    print(json.dumps({"push": push, "pull": pull}))
