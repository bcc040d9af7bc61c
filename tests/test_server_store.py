"""The server store directly, on each backend (SQLite and PostgreSQL): dense
per-team sequences in commit order, the hash chain, duplicate detection, pull
paging, nonces, device keys, export/import, backup."""

import itertools
import os
import sqlite3
import threading
import time
import uuid
from contextlib import closing

import pytest

from sk import crypto
from sk.event import check_stamped
from sk_server.devices import register, revoke, rotate
from sk_server.store import GENESIS, SCHEMA_VERSION, StoreError, chain_next, open_store, sqlite_store

from conftest import free_port, is_pg, query


_clock = itertools.count(1)   # a node stamps each clock value once


def row(**kw):
    ev = {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
          "aggregate_type": "feature", "aggregate_id": "f-1", "lamport_clock": next(_clock),
          "node_id": "n", "payload": {"v": 1}, "timestamp": "2026-01-31T12:00:00Z"}
    ev.update(kw)
    return check_stamped(ev)


@pytest.fixture
def store(server_db):
    s = open_store(server_db)
    s.keys = {}
    for name, team in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        s.keys[name] = register(s, name, team)
    s.db = server_db
    yield s
    s.close()


def seqs(store, team, after=0, limit=100_000, exclude=None):
    return [r[0] for r in store.pull(team, after, limit, exclude).rows]


def push(store, team, device, rows, **kw):
    return store.push(team, device, rows, **kw).results


def page(store, *args):
    return tuple(store.pull(*args)[:3])


def test_dense_sequence_per_team(store):
    a_ids, b_ids = [], []
    for i in range(10):
        rows = [row() for _ in range(i % 3 + 1)]
        team, ids = ("A", a_ids) if i % 2 else ("B", b_ids)
        assert push(store, team, "a1" if team == "A" else "b1", rows) == [("accepted", None)] * len(rows)
        ids += [r[0] for r in rows]
    for team, ids in (("A", a_ids), ("B", b_ids)):
        rows, nxt, more, *_ = store.pull(team, 0, 1000)
        assert [r[0] for r in rows] == list(range(1, len(ids) + 1))
        assert [r[1] for r in rows] == ids
        assert store.head(team) == len(ids) == nxt and more is False
    assert store.stats()["events"] == len(a_ids) + len(b_ids)
    assert store.head("nobody") == 0
    assert page(store, "nobody", 0, 10) == ([], 0, False)


def test_pulled_rows_round_trip(store):
    r = row(payload={"k": [1, 2, {"x": None}]}, lamport_clock=2 ** 32)
    assert push(store, "A", "a1", [r]) == [("accepted", None)]
    (got,), _, _, *_ = store.pull("A", 0, 10)
    assert got[0] == 1 and tuple(got[1:]) == r


def test_duplicate_and_conflict_detection(store):
    r = row()
    assert push(store, "A", "a1", [r]) == [("accepted", None)]
    assert push(store, "A", "a2", [r]) == [("duplicate", None)]
    changed = (r[0], *r[1:6], '{"v":2}', r[7])
    status, reason = push(store, "A", "a1", [changed])[0]
    assert status == "rejected" and "event_id" in reason
    # within one batch
    r2 = row()
    res = push(store, "A", "a1", [r2, r2, (r2[0], r2[1], r2[2], "other", *r2[4:])])
    assert [s for s, _ in res] == ["accepted", "duplicate", "rejected"]
    assert store.head("A") == 2 and store.stats()["events"] == 2
    # the other team's sequence is its own
    assert push(store, "B", "b1", [r])[0][0] in ("accepted", "rejected")
    assert seqs(store, "A") == [1, 2]
    (first,), _, _, *_ = store.pull("A", 0, 1)
    assert tuple(first[1:]) == r


def test_big_batch_with_duplicates_across_chunks(store):
    rows = [row() for _ in range(1200)]
    assert {s for s, _ in push(store, "A", "a1", rows[:700])} == {"accepted"}
    res = push(store, "A", "a1", rows)
    assert [s for s, _ in res] == ["duplicate"] * 700 + ["accepted"] * 500
    assert store.head("A") == 1200 and seqs(store, "A") == list(range(1, 1201))


def test_pull_paging_and_skip(store):
    owners = []
    for dev, n in (("a1", 3), ("a2", 2), ("a1", 4), ("a2", 1), ("a1", 2)):
        push(store, "A", dev, [row(node_id=dev) for _ in range(n)])
        owners += [dev] * n
    head = store.head("A")
    assert head == 12
    after, got = 0, []
    while True:
        rows, nxt, more, *_ = store.pull("A", after, 5)
        assert len(rows) <= 5
        got += [r[0] for r in rows]
        assert nxt >= after
        after = nxt
        if not more:
            break
    assert got == list(range(1, 13)) and after == head
    rows, nxt, more, *_ = store.pull("A", 7, 5)
    assert [r[0] for r in rows] == [8, 9, 10, 11, 12] and nxt == head and more is False
    # excluding a1: only a2's, paged, and the cursor ends at the head
    want = [i + 1 for i, o in enumerate(owners) if o == "a2"]
    for limit in (1, 2, 100):
        after, got = 0, []
        while True:
            rows, nxt, more, *_ = store.pull("A", after, limit, ("a1", "a1", 2 ** 62))
            got += [r[0] for r in rows]
            after = nxt
            if not more:
                break
        assert got == want and after == head, limit
    assert page(store, "A", 10, 100, ("a1", "a1", 2 ** 62)) == ([], head, False)
    # events of a1 stamped above the mark are not left out, nor a1's node pushed by another
    assert seqs(store, "A", 0, 100, ("a1", "a1", 0)) == list(range(1, 13))
    assert seqs(store, "A", 0, 100, ("a2", "a1", 2 ** 62)) == list(range(1, 13))


def push_at_once(db, threads, rounds, size, device, timeout=60):
    """`threads` pushers of team A at once, each with a store (connections) of its
    own, `rounds` batches each of size(n) events as device(n); every batch must be
    accepted whole. Returns the ids pushed, once all are done."""
    errors, ids = [], []
    lock = threading.Lock()

    def worker(n):
        s = open_store(db)
        try:
            for _ in range(rounds):
                rows = [row(node_id=device(n)) for _ in range(size(n))]
                assert [x for x, _ in push(s, "A", device(n), rows)] == ["accepted"] * len(rows)
                with lock:
                    ids.extend(r[0] for r in rows)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            s.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout)
    assert not errors
    return ids


def test_concurrent_pushes_keep_the_sequence_dense(tmp_path, store):
    ids = push_at_once(store.db, 4, 15, lambda n: 3, lambda n: f"a{n % 2 + 1}")
    rows, nxt, _, *_ = store.pull("A", 0, 10_000)
    assert [r[0] for r in rows] == list(range(1, 181)) and nxt == 180 == store.head("A")
    assert sorted(r[1] for r in rows) == sorted(ids)


def test_nonces(store):
    key = "a1"
    kid, _ = crypto.parse_api_key(store.keys[key])
    later = int(time.time() * 1000) + 60_000
    n = os.urandom(12)
    assert store.admit(kid, key, n, later) is True
    assert store.admit(kid, key, n, later) is False
    assert store.admit("0" * 16, key, n, later) is True      # per key
    assert store.admit(kid, key, os.urandom(12), later) is True
    # the nonce is held in the database, so another connection/process sees it
    other = open_store(store.db)
    assert other.admit(kid, key, n, later) is False
    other.close()
    assert [d["last_seen"] is not None for d in store.list_devices() if d["name"] == key] == [True]


def test_devices_register_rotate_revoke(store):
    with pytest.raises(StoreError):
        register(store, "a1", "A")
    for bad in ("", "-x", "has space", "x" * 65, "a/b"):
        with pytest.raises(StoreError):
            register(store, bad, "A")
        with pytest.raises(StoreError):
            register(store, "ok-name", bad)
    k1 = register(store, "c1", "C")
    kid1, _ = crypto.parse_api_key(k1)
    rec = store.get_key(kid1)
    assert (rec.device, rec.team, rec.retired, rec.revoked) == ("c1", "C", None, None)
    assert rec.master == crypto.derive_master(k1)
    k2 = rotate(store, "c1")
    kid2, _ = crypto.parse_api_key(k2)
    assert store.get_key(kid1).retired and store.get_key(kid1).retired_why == "rotated"
    assert store.get_key(kid2).retired is None
    revoke(store, "c1")
    assert store.get_key(kid2).revoked and store.get_key(kid2).retired_why == "revoked"
    with pytest.raises(StoreError):
        revoke(store, "c1")
    with pytest.raises(StoreError):
        rotate(store, "c1")
    with pytest.raises(StoreError):
        revoke(store, "nobody")
    with pytest.raises(StoreError):
        rotate(store, "nobody")
    assert store.get_key("f" * 16) is None
    names = {d["name"]: d for d in store.list_devices()}
    assert set(names) == {"a1", "a2", "b1", "c1"}
    assert names["c1"]["revoked"] and names["c1"]["team"] == "C"


def test_backup_is_a_consistent_copy(tmp_path, store):
    if is_pg(store.db):
        with pytest.raises(StoreError, match="pg_dump"):
            store.backup(tmp_path / "backup.db")
        return
    push(store, "A", "a1", [row() for _ in range(7)])
    push(store, "B", "b1", [row() for _ in range(3)])
    target = tmp_path / "backup.db"
    store.backup(target)
    copy = sqlite_store(target, secret=store._secret)  # a backup needs the server secret
    assert copy.stats() == store.stats() == {"teams": 2, "devices": 3, "events": 10}
    for team in ("A", "B"):
        assert copy.pull(team, 0, 100) == store.pull(team, 0, 100)
        assert copy.head(team) == store.head(team)
    assert sqlite3.connect(target).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # the copy is independent of the live database
    push(store, "A", "a1", [row()])
    assert copy.head("A") == 7 and store.head("A") == 8
    copy.close()


def test_reopen_keeps_everything(tmp_path, store):
    push(store, "A", "a1", [row() for _ in range(4)])
    store.close()
    again = open_store(store.db)
    assert again.head("A") == 4 and again.stats()["devices"] == 3
    assert push(again, "A", "a2", [row(node_id="a2")]) == [("accepted", None)]
    assert again.head("A") == 5
    again.close()


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "no-such-dir" / "s.db"))
    with pytest.raises(StoreError, match="cannot open PostgreSQL"):
        open_store(f"postgresql://nobody@127.0.0.1:{free_port()}/sk")
    s = open_store("sqlite:///" + str(tmp_path / "u.db"))
    assert os.path.exists(tmp_path / "u.db") and s.stats()["events"] == 0
    s.close()
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "junk.db"))


def test_lamport_jump_past_the_limit_is_rejected(store):
    """One device must not push the team's clock to 2^63 and stop all stamping."""
    big, ok = row(lamport_clock=2 ** 63 - 1), row(lamport_clock=5)
    assert push(store, "A", "a1", [big, ok]) == [
        ("rejected", "lamport_clock jumps more than 2^32 past the team's highest clock"),
        ("accepted", None)]
    # the allowance moves with the team's clock
    assert push(store, "A", "a1", [row(lamport_clock=5 + 2 ** 32)]) == [("accepted", None)]
    assert seqs(store, "A") == [1, 2]


def test_dedup_lookup_uses_the_event_id_index(tmp_path):
    """Walking the team by primary key instead made every push slower as the log
    grew (O(N^2) in all: 2k events/s at a million). SQLite's plan must use events_id."""
    store = sqlite_store(tmp_path / "plan.db")
    db = store.d._db()
    plans = []
    db.set_trace_callback(lambda sql: plans.append(sql) if "event_id IN" in sql else None)
    for n in (1, 500):
        store.d.events_by_id(db, "A", ["x"] * n)
    assert len(plans) == 2
    for sql in plans:
        plan = " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "INDEX events_id" in plan and "PRIMARY KEY" not in plan, plan


def test_hash_chain_and_known_points(store):
    ids = []
    for n in (3, 1, 4):
        rows = [row() for _ in range(n)]
        got = store.push("A", "a1", rows)
        ids += [r[0] for r in rows]
        assert got.diverged is None and got.head == len(ids)
    chains = [GENESIS]
    for eid in ids:
        chains.append(chain_next(chains[-1], eid))
    assert store.push("A", "a1", []).chain == chains[-1]
    # every page tells the chain at its next cursor
    for after in range(len(ids) + 1):
        for limit in (1, 3, 100):
            p = store.pull("A", after, limit)
            assert p.diverged is None and p.chain == chains[p.next], (after, limit)
    # a point on the log passes; one past its end or off it is refused
    for seq in range(len(ids) + 1):
        assert store.pull("A", seq, 10, known=(seq, chains[seq])).diverged is None
    why = store.pull("A", 0, 10, known=(len(ids) + 5, chains[-1])).diverged
    assert "holds 8 events, but this device saw 13" in why
    why = store.pull("A", 0, 10, known=(4, chains[3])).diverged
    assert "event 4 of the server's log is not the one this device saw" in why
    # a push from a device whose point is off the log stores nothing
    got = store.push("A", "a1", [row()], known=(9, os.urandom(32)))
    assert got.diverged and got.results == [] and store.head("A") == 8
    got = store.push("A", "a1", [row()], known=(8, chains[8]))
    assert got.diverged is None and got.head == 9
    # another team's chain is its own
    assert store.pull("B", 0, 10).chain == GENESIS


def test_a_replayed_ticket_stores_nothing(store):
    kid, _ = crypto.parse_api_key(store.keys["a1"])
    ticket = (kid, "a1", os.urandom(12), int(time.time() * 1000) + 60_000)
    assert store.push("A", "a1", [row()], ticket=ticket).results == [("accepted", None)]
    assert store.push("A", "a1", [row()], ticket=ticket) is None
    assert store.head("A") == 1


def test_export_and_import_keep_sequence_chain_and_keys(tmp_path, store):
    for i in range(5):
        push(store, "A", "a1", [row() for _ in range(i + 1)])
        push(store, "B", "b1", [row()])
    rotate(store, "a2")
    revoke(store, "b1")
    target = sqlite_store(tmp_path / "copy.db")
    target.import_meta(store.export_meta())
    for team in ("A", "B"):
        after = 0
        while rows := store.export_events(team, after, 4):
            target.import_events(team, rows)
            after = rows[-1][0]
        assert target.pull(team, 0, 100) == store.pull(team, 0, 100)
    for name, key in store.keys.items():
        kid, _ = crypto.parse_api_key(key)
        a, b = store.get_key(kid), target.get_key(kid)
        assert (a.device, a.team, a.master, a.retired, a.revoked) == \
               (b.device, b.team, b.master, b.retired, b.revoked)
    assert target.stats() == store.stats()
    # importing again is harmless; rows that do not follow the head are refused
    target.import_meta(store.export_meta())
    with pytest.raises(StoreError, match="does not follow"):
        target.import_events("A", store.export_events("A", 3, 2))
    assert target.head("A") == store.head("A") == 15
    target.close()


def test_a_pull_never_skips_an_event_that_commits_late(store):
    """Pushers of one team at once while a puller follows its cursor: it must end
    with every event exactly once. (A sequence taken before commit, as a plain
    auto-increment or a PostgreSQL sequence gives, lets a late commit fall behind
    a cursor that has moved past it; the team row lock prevents that.)"""
    stop = threading.Event()
    got = []

    def puller():
        s = open_store(store.db)
        after = 0
        try:
            while True:
                done = stop.is_set()
                p = s.pull("A", after, 7)
                got.extend(r[1] for r in p.rows)
                after = p.next
                if done and not p.more:
                    break
        finally:
            s.close()

    reader = threading.Thread(target=puller)
    reader.start()
    try:
        pushed = push_at_once(store.db, 6, 40, lambda n: 1 + n % 3, lambda n: "a1", timeout=120)
    finally:
        stop.set()
        reader.join(60)
    assert len(got) == len(set(got)) == len(pushed) == store.head("A")
    assert set(got) == set(pushed)


def test_a_schema_1_database_gains_its_hash_chain(tmp_path):
    """A server database of sk 0.2.0 (no chain) is upgraded in place when opened."""
    path = tmp_path / "old.db"
    s = sqlite_store(path)
    register(s, "a1", "A")
    push(s, "A", "a1", [row() for _ in range(5)])
    s.close()
    db = sqlite3.connect(path)
    with db:   # back to schema 1: what 0.2.0 wrote
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
        for table in ("events", "teams"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN chain")
    db.close()
    s = sqlite_store(path)
    ids = [r[1] for r in s.pull("A", 0, 10).rows]
    chain = GENESIS
    for i, eid in enumerate(ids, 1):
        chain = chain_next(chain, eid)
        assert s.pull("A", 0, 10, known=(i, chain)).diverged is None
    assert s.pull("A", 0, 10).chain == chain
    assert push(s, "A", "a1", [row()]) == [("accepted", None)]
    assert query(path, "SELECT value FROM meta WHERE key = 'schema'") == [(str(SCHEMA_VERSION),)]
    s.close()
    # an sk 0.2.0 server still running on the file goes on writing events without
    # a chain and moves only the head: the next open mends the chain
    extra = row()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO events(team, seq, event_id, event_type, aggregate_type,"
                   " aggregate_id, lamport_clock, node_id, payload, timestamp, device, received)"
                   " VALUES ('A', 7, ?, ?, ?, ?, ?, ?, ?, ?, 'a1', 'now')", extra)
        db.execute("UPDATE teams SET head = 7 WHERE team = 'A'")
    s = sqlite_store(path)
    ids = [r[1] for r in s.pull("A", 0, 10).rows]
    chain = GENESIS
    for eid in ids:
        chain = chain_next(chain, eid)
    assert ids[-1] == extra[0] and s.pull("A", 0, 10, known=(7, chain)).diverged is None
    assert s.push("A", "a1", [row()]).head == 8
    s.close()
