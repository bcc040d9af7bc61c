"""The server store directly, on each backend (SQLite and PostgreSQL): dense
per-team sequences in commit order, the hash chain, duplicate detection by event
id and stamp, node ids bound to devices, pull paging by count and by bytes, skip,
nonces, devices and the team key's state (epochs, grants, rekey), sealed batches
that the store keeps and cannot read, the upgrade of an sk 0.3.0 database (its
plaintext moved to `legacy`, then resealed and gone), export/import, migrate,
backup."""

import base64
import itertools
import os
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from sk import crypto, wire
from sk.event import Event, check_stamped
from sk.protocol import _manifest
from sk.sealed import canonical, open_batch
from sk_server import migrate
from sk_server.devices import register, revoke, rotate
from sk_server.secret import load_secret
from sk_server.store import (GENESIS, SCHEMA_VERSION, STORED_COLUMNS, StoreError, chain_next,
                             open_store, sqlite_store)
from sk_server.store.base import ROW_BYTES, secret_check
from sk_server.store.sql import LEGACY_COST

from conftest import (begin_epoch, free_port, grants_lacking, is_pg, query, sealed_batch,
                      share_epochs, team_key)


_clock = itertools.count(1)   # a node stamps each clock value once


def row(**kw):
    ev = {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
          "aggregate_type": "feature", "aggregate_id": "f-1", "lamport_clock": next(_clock),
          "node_id": "n", "payload": {"v": 1}, "timestamp": "2026-01-31T12:00:00Z"}
    ev.update(kw)
    return check_stamped(ev)


def identity(api_key):
    """The identity public key the holder of api_key derives (and the server keeps)."""
    return crypto.identity_public(crypto.identity_secret(api_key))


@pytest.fixture
def store(server_db):
    """A store with devices a1, a2 (team A) and b1 (team B); each team's key epoch 1
    begun by its first device."""
    s = open_store(server_db)
    s.api_keys = {}
    for name, team in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        s.api_keys[name] = register(s, name, team)
    begin_epoch(s, "A", "a1")
    begin_epoch(s, "B", "b1")
    s.db = server_db
    yield s
    s.close()


def batch(team, events, epoch=1, **kw):
    return sealed_batch(team, events, epoch, **kw)


def push(store, team, device, events, epoch=1, **kw):
    """The per-event results of pushing events as one sealed batch."""
    got = store.push(team, device, batch(team, events, epoch), **kw)
    assert got.diverged is None and got.node_taken is None and got.rekey is None, got
    return got.results


def seqs(store, team, after=0, limit=100_000, skip=None):
    return [r[0] for r in store.pull(team, after, limit, skip).rows]


def page(store, *args):
    return tuple(store.pull(*args)[:2]) + (store.pull(*args).more,)


def opened(page, team, keys=None):
    """[(seq, Event)] of a store Page as a member reads it: each row's event opened
    from its sealed batch (under the test's team key of the batch's epoch) and
    checked to be the manifest's entry the row names; a legacy row's plaintext; None
    for a row whose body is left out (the puller's own)."""
    batches = {}
    for b, (epoch, text, blob, _device) in page.batches.items():
        key = (keys or {}).get(epoch) or team_key(team, epoch)
        batches[b] = open_batch(team, epoch, key, *_manifest(bytes(text).decode()), blob)
    out = []
    for seq, eid, b, idx in page.rows:
        if b is not None:
            ev, _ = batches[b][idx]
            assert ev.event_id == eid, (seq, b, idx)
            out.append((seq, ev))
        elif seq in page.legacy:
            node, clock, etype, atype, aid, payload, ts = page.legacy[seq]
            out.append((seq, Event(eid, etype, atype, aid, clock, node, payload, ts)))
        else:
            out.append((seq, None))
    return out


def read_all(store, team, limit=5000, skip=None):
    """Every page of the team's log from the start: [Page]."""
    pages, after = [], 0
    while True:
        p = store.pull(team, after, limit, skip)
        assert p.diverged is None
        pages.append(p)
        after = p.next
        if not p.more:
            return pages


def test_dense_sequence_per_team(store):
    a_evs, b_evs = [], []
    for i in range(10):
        rows = [row() for _ in range(i % 3 + 1)]
        team, evs = ("A", a_evs) if i % 2 else ("B", b_evs)
        assert push(store, team, "a1" if team == "A" else "b1", rows) == [("accepted", None)] * len(rows)
        evs += rows
    for team, evs in (("A", a_evs), ("B", b_evs)):
        p = store.pull(team, 0, 1000)
        assert [r[0] for r in p.rows] == list(range(1, len(evs) + 1))
        assert [r[1] for r in p.rows] == [e.event_id for e in evs]
        assert store.head(team) == len(evs) == p.next and p.more is False
        assert [ev for _, ev in opened(p, team)] == evs
    assert store.stats()["events"] == len(a_evs) + len(b_evs)
    assert store.stats()["batches"] == 10
    assert store.head("nobody") == 0
    assert page(store, "nobody", 0, 10) == ([], {}, False)


def test_pulled_rows_round_trip(store):
    """What a pull gives is what was pushed: the row names its batch and place, the
    batch its epoch, canonical manifest (with the writer's point), the very sealed
    bytes and the pushing device; opened, the events as they were."""
    first = row(payload={"k": [1, 2, {"x": None}]}, lamport_clock=2 ** 32)
    assert push(store, "A", "a1", [first]) == [("accepted", None)]
    chain1 = chain_next(GENESIS, first.event_id)
    evs = [row(node_id="a2"), row(node_id="a2", payload={"s": "é\u2028"})]
    b = batch("A", evs, writer=(1, chain1.hex()))
    assert store.push("A", "a2", b).results == [("accepted", None)] * 2
    p = store.pull("A", 0, 10)
    assert [r[:2] for r in p.rows] == [(1, first.event_id), (2, evs[0].event_id),
                                      (3, evs[1].event_id)]
    (b1, i1), (b2, i2), (b3, i3) = [r[2:] for r in p.rows]
    assert b1 != b2 == b3 and (i1, i2, i3) == (0, 0, 1)
    assert p.batches[b2] == (1, canonical(b.manifest, (1, chain1.hex())), b.sealed, "a2")
    assert p.batches[b1][0] == 1 and p.batches[b1][3] == "a1"
    assert _manifest(p.batches[b2][1].decode()) == (b.manifest, (1, chain1.hex()))
    assert opened(p, "A") == [(1, first), (2, evs[0]), (3, evs[1])]
    assert p.legacy == {}
    # the server holds no event content: nothing of the payloads is in its tables
    for t in ("events", "batches"):
        text = repr(query(store.db, f"SELECT * FROM {t}"))
        assert "feature_created" not in text and '"k"' not in text


def test_duplicate_and_conflict_detection(store):
    r = row()
    assert push(store, "A", "a1", [r]) == [("accepted", None)]
    assert push(store, "A", "a2", [r]) == [("duplicate", None)]
    # the server sees the id and the stamp only: same id and stamp is the same event,
    # whatever the sealed body says; the body kept is the first
    assert push(store, "A", "a1", [r._replace(payload='{"v":2}')]) == [("duplicate", None)]
    for changed in (r._replace(lamport_clock=r.lamport_clock + 1), r._replace(node_id="m")):
        status, reason = push(store, "A", "a1", [changed])[0]
        assert status == "rejected" and "event_id" in reason
    # within one batch
    r2 = row()
    res = push(store, "A", "a1", [r2, r2, r2._replace(lamport_clock=next(_clock))])
    assert [s for s, _ in res] == ["accepted", "duplicate", "rejected"]
    assert store.head("A") == 2 and store.stats()["events"] == 2
    assert opened(store.pull("A", 0, 10), "A") == [(1, r), (2, r2)]
    # the other team's log is its own
    assert push(store, "B", "b1", [r]) == [("accepted", None)]
    assert seqs(store, "A") == [1, 2] and seqs(store, "B") == [1]


def test_big_batch_with_duplicates_across_chunks(store):
    rows = [row() for _ in range(1200)]
    assert {s for s, _ in push(store, "A", "a1", rows[:700])} == {"accepted"}
    res = push(store, "A", "a1", rows)
    assert [s for s, _ in res] == ["duplicate"] * 700 + ["accepted"] * 500
    assert store.head("A") == 1200 and seqs(store, "A") == list(range(1, 1201))
    # the second batch's rows are its entries 700..1199
    p = store.pull("A", 700, 1000)
    assert [r[3] for r in p.rows] == list(range(700, 1200)) and len(p.batches) == 1
    assert [ev for _, ev in opened(p, "A")] == rows[700:]


def test_node_ids_belong_to_the_first_device_pushing_under_them(store):
    mine = row(node_id="x")
    assert push(store, "A", "a1", [mine]) == [("accepted", None)]
    head = store.head("A")
    # another device's new events under that node: nothing of the batch is stored
    for evs in ([row(node_id="x")], [row(node_id="y"), row(node_id="x")]):
        got = store.push("A", "a2", batch("A", evs))
        assert got.results == [] and got.head == head and got.node_taken["node_id"] == "x"
        assert got.node_taken["device"] == "a1"
        assert "belongs to device 'a1'" in got.node_taken["reason"]
    assert store.head("A") == head
    # a duplicate is no new event: giving back a1's event is fine
    assert push(store, "A", "a2", [mine]) == [("duplicate", None)]
    # node y was not bound to a2 by the push that stored nothing
    assert push(store, "A", "a1", [row(node_id="y")]) == [("accepted", None)]
    # a (node, clock) stamp belongs to one event: a copied home stamping again
    twin = row(node_id="x", lamport_clock=mine.lamport_clock)
    got = store.push("A", "a1", batch("A", [twin]))
    assert got.results == [] and got.node_taken["node_id"] == "x"
    assert f"Lamport clock {mine.lamport_clock}" in got.node_taken["reason"]
    # relayed events (a device giving others' back to a restored server) pass
    given = row(node_id="x")
    got = store.push("A", "a2", batch("A", [row(node_id="a2"), given]), relay={1})
    assert got.results == [("accepted", None)] * 2 and got.node_taken is None
    assert store.push("A", "a2", batch("A", [row(node_id="x")])).node_taken["device"] == "a1"
    # the binding is per team
    assert push(store, "B", "b1", [row(node_id="x")]) == [("accepted", None)]
    assert [ev.node_id for _, ev in opened(store.pull("A", 0, 10), "A")] == ["x", "y", "a2", "x"]


def test_pull_paging_and_skip(store):
    owners, clocks = [], []
    for dev, n in (("a1", 3), ("a2", 2), ("a1", 4), ("a2", 1), ("a1", 2)):
        evs = [row(node_id=dev) for _ in range(n)]
        push(store, "A", dev, evs)
        owners += [dev] * n
        clocks += [e.lamport_clock for e in evs]
    head = store.head("A")
    assert head == 12
    after, got = 0, []
    while True:
        p = store.pull("A", after, 5)
        assert len(p.rows) <= 5
        got += [r[0] for r in p.rows]
        assert p.next >= after
        after = p.next
        if not p.more:
            break
    assert got == list(range(1, 13)) and after == head
    p = store.pull("A", 7, 5)
    assert [r[0] for r in p.rows] == [8, 9, 10, 11, 12] and p.next == head and p.more is False
    # skipping a1's own: every row is listed (the cursor passes them), but only a2's
    # bodies come, and only a2's batches
    skip = ("a1", "a1", 2 ** 62)
    want = [i + 1 for i, o in enumerate(owners) if o == "a2"]
    for limit in (1, 2, 100):
        pages = read_all(store, "A", limit, skip)
        rows = [r for p in pages for r in p.rows]
        assert [r[0] for r in rows] == list(range(1, 13)) and pages[-1].next == head, limit
        assert [r[0] for r in rows if r[2] is not None] == want, limit
        assert all(r[2:] == (None, None) for r in rows if r[0] not in want)
        assert {p.batches[b][3] for p in pages for b in p.batches} == {"a2"}
        assert [ev.node_id for p in pages for _, ev in opened(p, "A") if ev] == ["a2"] * 3
    p = store.pull("A", 10, 100, skip)
    assert [r[0] for r in p.rows] == [11, 12] and p.batches == {} and p.next == head
    # a mark in the middle: a1's events stamped above it come
    mark = clocks[6]   # seq 7
    got = [r[0] for r in store.pull("A", 0, 100, ("a1", "a1", mark)).rows if r[2] is not None]
    assert got == [4, 5, 8, 9, 10, 11, 12]
    # nothing is left out that the device did not push under that node, at or below the mark
    for other in (("a1", "a1", 0), ("a2", "a1", 2 ** 62), ("a1", "a2", 2 ** 62)):
        p = store.pull("A", 0, 100, other)
        assert all(r[2] is not None for r in p.rows) and len(opened(p, "A")) == 12, other
    assert [r[0] for r in store.pull("A", 0, 100, ("a2", "a2", 2 ** 62)).rows
            if r[2] is None] == want


def big_events(n, node, size=175_000):
    """n events whose payloads do not compress (random bytes, base64): about 0.76 *
    size * 4/3 sealed bytes each."""
    return [row(node_id=node, payload={"blob": base64.b64encode(os.urandom(size)).decode()})
            for _ in range(n)]


def test_pull_pages_are_cut_by_bytes(store):
    """A page holds at most wire.MAX_BATCH_BYTES of batches (each batch counted once,
    however many of its rows the page has), so a page of large batches is cut
    before the cap; one batch over the cap travels alone, so it never blocks."""
    cap = wire.MAX_BATCH_BYTES
    layout = [[row(node_id="a1") for _ in range(30)]]
    layout += [big_events(7, "a1") for _ in range(5)]   # about 1.24 MB sealed each
    layout += [big_events(26, "a1")]                     # over the cap alone
    layout += [[row(node_id="a1"), row(node_id="a1")]]
    pushed, sizes = [], {}
    for evs in layout:
        b = batch("A", evs)
        assert store.push("A", "a1", b).results == [("accepted", None)] * len(evs)
        pushed += evs
        sizes[len(sizes) + 1] = len(canonical(b.manifest, b.writer)) + len(b.sealed)
    large = list(sizes.values())[1:6]
    assert 3 * max(large) + sizes[1] < cap < 4 * min(large) and sizes[7] > cap   # as planned

    def cost(p):
        return sum(sizes[b] for b in p.batches) + ROW_BYTES * len(p.rows)

    pages = read_all(store, "A")
    assert [sorted(p.batches) for p in pages] == [[1, 2, 3, 4], [5, 6], [7], [8]]
    for p, nxt in zip(pages, pages[1:]):
        assert p.more and len(p.rows) < 5000
        assert len(p.batches) == 1 or cost(p) <= cap
        # cut by bytes: the next row's batch did not fit
        assert cost(p) + ROW_BYTES + sizes[nxt.rows[0][2]] > cap
    assert pages[2].rows == [(s, e.event_id, 7, i) for i, (s, e) in enumerate(
        zip(range(66, 92), pushed[65:91]))]
    assert not pages[-1].more and pages[-1].next == store.head("A") == len(pushed)
    assert [ev for p in pages for _, ev in opened(p, "A")] == pushed
    # the oversize batch alone, from just before it and from its middle
    p = store.pull("A", 65, 5000)
    assert sorted(p.batches) == [7] and [r[0] for r in p.rows] == list(range(66, 92)) and p.more
    p = store.pull("A", 80, 5000)
    assert sorted(p.batches) == [7] and [r[0] for r in p.rows] == list(range(81, 92))
    # a count cut inside a batch: each page carries that batch again
    small = read_all(store, "A", 10)[:3]
    assert [[r[0] for r in p.rows] for p in small] == [list(range(1, 11)), list(range(11, 21)),
                                                      list(range(21, 31))]
    assert all(sorted(p.batches) == [1] for p in small)
    assert [ev for p in small for _, ev in opened(p, "A")] == pushed[:30]


def push_at_once(db, threads, rounds, size, device, timeout=60):
    """`threads` pushers of team A at once, each with a store (connections) of its
    own, `rounds` batches each of size(n) events as device(n); every batch must be
    accepted whole. Returns the events pushed, once all are done."""
    errors, pushed = [], []
    lock = threading.Lock()

    def worker(n):
        s = open_store(db)
        try:
            for _ in range(rounds):
                rows = [row(node_id=device(n)) for _ in range(size(n))]
                assert [x for x, _ in push(s, "A", device(n), rows)] == ["accepted"] * len(rows)
                with lock:
                    pushed.extend(rows)
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
    assert not any(t.is_alive() for t in workers)
    return pushed


def test_concurrent_pushes_keep_the_sequence_dense(store):
    pushed = push_at_once(store.db, 4, 15, lambda n: 3, lambda n: f"a{n % 2 + 1}")
    p = store.pull("A", 0, 10_000)
    assert [r[0] for r in p.rows] == list(range(1, 181)) and p.next == 180 == store.head("A")
    assert sorted(r[1] for r in p.rows) == sorted(e.event_id for e in pushed)
    # each batch's events are consecutive, in manifest order: commit order
    evs = opened(p, "A")
    assert sorted((ev for _, ev in evs), key=lambda e: e.event_id) == \
        sorted(pushed, key=lambda e: e.event_id)
    for i in range(0, 180, 3):
        assert len({r[2] for r in p.rows[i:i + 3]}) == 1 and [r[3] for r in p.rows[i:i + 3]] == [0, 1, 2]
    chain = GENESIS
    for r in p.rows:
        chain = chain_next(chain, r[1])
    assert p.chain == chain


def test_nonces(store):
    key = "a1"
    kid, _ = crypto.parse_api_key(store.api_keys[key])
    later = int(time.time() * 1000) + 60_000
    n = os.urandom(12)
    assert store.seen(kid, n) is False
    assert store.admit(kid, key, n, later) is True
    assert store.seen(kid, n) is True
    assert store.admit(kid, key, n, later) is False
    assert store.seen("0" * 16, n) is False
    assert store.admit("0" * 16, key, n, later) is True      # per key
    assert store.admit(kid, key, os.urandom(12), later) is True
    # the nonce is held in the database, so another connection/process sees it
    other = open_store(store.db)
    assert other.seen(kid, n) is True
    assert other.admit(kid, key, n, later) is False
    other.close()
    assert [d["last_seen"] is not None for d in store.list_devices() if d["name"] == key] == [True]
    # an expired nonce is pruned
    old = os.urandom(12)
    assert store.admit(kid, key, old, int(time.time() * 1000) - 1)
    store.prune()
    assert store.seen(kid, old) is False and store.seen(kid, n) is True
    store.ping()


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
    assert rec.master == crypto.derive_master(k1) and store.key_valid(kid1)
    assert store.keys("C", "c1")["identity"] == identity(k1)
    k2 = rotate(store, "c1")
    kid2, _ = crypto.parse_api_key(k2)
    assert store.get_key(kid1).retired and store.get_key(kid1).retired_why == "rotated"
    assert store.get_key(kid2).retired is None
    assert not store.key_valid(kid1) and store.key_valid(kid2)
    assert store.keys("C", "c1")["identity"] == identity(k2) != identity(k1)
    revoke(store, "c1")
    assert store.get_key(kid2).revoked and store.get_key(kid2).retired_why == "revoked"
    assert not store.key_valid(kid2) and not store.key_valid("f" * 16)
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
    assert names["a1"]["identity"] == identity(store.api_keys["a1"])
    # a team with no key epoch yet needs none begun again: no rekey flag
    assert store.keys("C", "c1")["rekey"] is False and store.keys("C", "c1")["epoch"] == 0


def test_rotate_and_revoke_stop_writes_until_the_next_epoch(store):
    assert push(store, "A", "a1", [row(node_id="a1")]) == [("accepted", None)]
    for change, epoch in ((lambda: rotate(store, "a2"), 2), (lambda: revoke(store, "a2"), 3)):
        change()
        state = store.keys("A", "a1")
        assert state["rekey"] is True and state["epoch"] == epoch - 1
        head = store.head("A")
        # nothing is written, under the old epoch or the one not begun yet
        for e in (epoch - 1, epoch):
            got = store.push("A", "a1", batch("A", [row(node_id="a1")], e))
            assert got.rekey == {"epoch": epoch - 1, "rotate": True} and got.results == []
        with pytest.raises(StoreError):
            store.reseal("A", "a1", 1, batch("A", [row(node_id="a1")], epoch - 1))
        assert store.head("A") == head
        # the other team writes on
        assert push(store, "B", "b1", [row(node_id="b1")]) == [("accepted", None)]
        assert store.keys("B", "b1")["rekey"] is False
        # a member begins the next epoch: that clears it; a second device beginning
        # the same epoch is refused, and so is skipping one
        begin_epoch(store, "A", "a1", epoch)
        assert "cannot begin" in store.put_keys("A", "a1", epoch=epoch + 2)
        if epoch == 2:
            assert "another device began one first" in store.put_keys("A", "a2", epoch=epoch)
        state = store.keys("A", "a1")
        assert state["rekey"] is False and state["epoch"] == epoch
        assert state["epochs"][-1] == {"epoch": epoch, "created_by": "a1", "start_seq": head}
        # now only the current epoch is written
        got = store.push("A", "a1", batch("A", [row(node_id="a1")], epoch - 1))
        assert got.rekey == {"epoch": epoch, "rotate": False} and got.results == []
        assert push(store, "A", "a1", [row(node_id="a1")], epoch) == [("accepted", None)]
    assert [e["epoch"] for e in store.keys("A", "a1")["epochs"]] == [1, 2, 3]
    p = store.pull("A", 0, 10)
    assert [p.batches[r[2]][0] for r in p.rows] == [1, 2, 3]
    assert len(opened(p, "A")) == 3
    # a team with no epoch: every push is answered with the epoch to begin
    register(store, "c1", "C")
    assert store.push("C", "c1", batch("C", [row(node_id="c1")])).rekey == {
        "epoch": 0, "rotate": True}
    assert store.head("C") == 0


def race(db, n, work):
    """Run work(store, i) for i < n in threads at once, each with a store of its own;
    their answers in order."""
    out, errors = [None] * n, []
    ready = threading.Barrier(n)

    def worker(i):
        s = open_store(db)
        try:
            ready.wait(30)
            out[i] = work(s, i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    return out


def test_of_devices_racing_one_wins(store):
    """Of devices beginning the next epoch at once, one wins and the others are
    told; of devices pushing under one new node id at once, one gets it."""
    rotate(store, "a1")
    register(store, "a3", "A")
    devs = ["a1", "a2", "a3"]
    grants = grants_lacking(store, "A", {2})   # the winner's, to each of them
    got = race(store.db, 3, lambda s, i: s.put_keys("A", devs[i], epoch=2, grants=grants))
    assert sorted(g is None for g in got) == [False, False, True], got
    assert got[2] is not None   # a3 was never given epoch 1: it begins none after it
    winner = devs[got.index(None)]
    state = store.keys("A", "a1")
    assert state["epoch"] == 2 and not state["rekey"]
    assert [(e["epoch"], e["created_by"]) for e in state["epochs"]] == [(1, "a1"), (2, winner)]
    got = race(store.db, 3, lambda s, i: s.push("A", devs[i], batch("A", [row(node_id="new")], 2)))
    won = [i for i, g in enumerate(got) if g.results == [("accepted", None)]]
    assert len(won) == 1 and store.head("A") == 1
    assert all(g.node_taken["device"] == devs[won[0]] for i, g in enumerate(got) if i != won[0])


def test_key_state(store):
    """keys(): the epochs, grants sealed to the device's current identity only,
    every member with the epochs granted to its current identity; put_keys stores
    identities (never replacing one), grants, the approval mode and approvals."""
    keys = {n: register(store, n, "C") for n in ("c1", "c2", "c3")}
    ids = {n: identity(k) for n, k in keys.items()}
    state = store.keys("C", "c1")
    assert (state["epoch"], state["rekey"], state["approval"], state["head"], state["legacy"]) \
        == (0, False, False, 0, 0)
    assert state["identity"] == ids["c1"] and state["epochs"] == [] and state["grants"] == []
    assert state["members"] == [{"device": n, "identity": ids[n], "revoked": None,
                                 "approval": None, "granted": []} for n in ("c1", "c2", "c3")]
    k1 = os.urandom(32)
    priv1 = crypto.identity_secret(keys["c1"])

    def grant(epoch, to, key, recipient=None):
        recipient = recipient or ids[to]
        return (epoch, to, recipient, crypto.seal_grant("C", epoch, key, priv1, recipient))

    g = {n: grant(1, n, k1) for n in ("c1", "c2")}
    assert store.put_keys("C", "c1", epoch=1, grants=list(g.values())) is None
    push(store, "C", "c1", [row(node_id="c1")])
    state = store.keys("C", "c2")
    assert state["epoch"] == 1 and state["epochs"] == [{"epoch": 1, "created_by": "c1",
                                                         "start_seq": 0}]
    assert state["grants"] == [{"epoch": 1, "sealed": g["c2"][3], "granted_by": "c1",
                                "granter": ids["c1"]}]
    assert crypto.open_grant("C", 1, state["grants"][0]["sealed"],
                             crypto.identity_secret(keys["c2"]), ids["c1"]) == k1
    assert [m["granted"] for m in state["members"]] == [[1], [1], []]
    assert store.keys("C", "c3")["grants"] == []
    # grants that cannot be: an epoch not begun, to a device of another team or none
    for bad in (grant(2, "c3", k1), grant(0, "c3", k1), (1, "a1", ids["c1"], g["c1"][3]),
                (1, "nobody", ids["c1"], g["c1"][3])):
        assert store.put_keys("C", "c1", grants=[bad]) is not None
    assert [m["granted"] for m in store.keys("C", "c1")["members"]] == [[1], [1], []]
    assert [g["granted_by"] for g in store.keys("A", "a1")["grants"]] == ["a1"]   # none of C's
    # an identity is stored only for a device without one: never replaced
    assert store.put_keys("C", "c2", identity=os.urandom(32)) is None
    assert store.keys("C", "c2")["identity"] == ids["c2"]
    kid, old_key = crypto.new_api_key()
    store.create_device("old", "C", kid, crypto.derive_master(old_key))   # from before protocol 2
    assert store.keys("C", "old")["identity"] is None
    assert "no identity" in store.put_keys("C", "old", grants=[grant(1, "c3", k1)])
    assert store.put_keys("C", "old", identity=identity(old_key)) is None
    assert store.keys("C", "old")["identity"] == identity(old_key)
    # the approval mode, once on, stays on; approvals bind a device's identity
    record = os.urandom(32)
    assert store.put_keys("C", "c1", approval=True,
                          approvals=[("c3", ids["c3"], record), ("c2", os.urandom(32), record)]) is None
    assert store.put_keys("C", "c2", approval=False) is None
    state = store.keys("C", "c1")
    assert state["approval"] is True
    assert {m["device"]: m["approval"] for m in state["members"]} == {
        "c1": None, "c2": None, "c3": record, "old": None}
    assert store.put_keys("C", "c1", approvals=[("a1", ids["c1"], record)]) is not None
    # rotating c2: a new identity, no approval; grants to the old one are not its
    new_key = rotate(store, "c2")
    rotate(store, "c3")
    state = store.keys("C", "c2")
    assert state["identity"] == identity(new_key) and state["grants"] == [] and state["rekey"]
    members = {m["device"]: m for m in state["members"]}
    assert members["c2"]["granted"] == [] and members["c3"]["approval"] is None
    assert members["c1"]["granted"] == [1]
    # the next epoch, and the history, granted to the new identity
    ids["c2"] = identity(new_key)
    k2 = os.urandom(32)
    assert store.put_keys("C", "c1", epoch=2, grants=[
        grant(1, "c2", k1), grant(2, "c2", k2), grant(2, "c1", k2)]) is None
    state = store.keys("C", "c2")
    assert [(gr["epoch"], gr["granted_by"]) for gr in state["grants"]] == [(1, "c1"), (2, "c1")]
    assert {m["device"]: m["granted"] for m in state["members"]} == {
        "c1": [1, 2], "c2": [1, 2], "c3": [], "old": []}
    assert state["epochs"][-1] == {"epoch": 2, "created_by": "c1", "start_seq": 1}
    # a revoked device is still listed (as revoked), and gets no grant
    revoke(store, "c3")
    state = store.keys("C", "c1")
    assert [m["device"] for m in state["members"] if m["revoked"]] == ["c3"]
    assert store.put_keys("C", "c1", grants=[grant(2, "c3", k2, ids["c3"])]) is not None


def test_a_refused_put_keys_stores_nothing(store):
    """put_keys is one transaction: when any part is refused, nothing of it is
    stored. A new epoch whose grants could not be stored must not begin (the
    device that sent it keeps no key it was refused, so nobody would hold the
    epoch every write then needs, and no one could begin the next)."""
    revoke(store, "a2")
    state = store.keys("A", "a1")
    assert state["rekey"] and state["epoch"] == 1
    me = identity(store.api_keys["a1"])
    priv = crypto.identity_secret(store.api_keys["a1"])
    key = os.urandom(32)
    refused = store.put_keys("A", "a1", epoch=2, grants=[
        (2, "a1", me, crypto.seal_grant("A", 2, key, priv, me)),
        (2, "a2", me, crypto.seal_grant("A", 2, key, priv, me))])   # a2 is revoked now
    assert refused is not None
    after = store.keys("A", "a1")
    assert (after["epoch"], after["rekey"]) == (1, True)
    assert [g["epoch"] for g in after["grants"]] == [1]   # epoch 1's, from the fixture
    assert [e["epoch"] for e in after["epochs"]] == [1]
    refused = store.put_keys("A", "a1", epoch=2, approvals=[("nobody", me, os.urandom(32))])
    assert refused is not None and store.keys("A", "a1")["epoch"] == 1


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
    assert copy.stats() == store.stats() == {"teams": 2, "devices": 3, "events": 10,
                                             "batches": 2, "legacy": 0, "snapshots": 0}
    for team, dev in (("A", "a1"), ("A", "a2"), ("B", "b1")):
        assert copy.pull(team, 0, 100) == store.pull(team, 0, 100)
        assert copy.head(team) == store.head(team)
        assert copy.keys(team, dev) == store.keys(team, dev)
    assert len(opened(copy.pull("A", 0, 100), "A")) == 7
    assert sqlite3.connect(target).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # the copy is independent of the live database
    push(store, "A", "a1", [row()])
    assert copy.head("A") == 7 and store.head("A") == 8
    copy.close()


def test_reopen_keeps_everything(store):
    evs = [row(node_id="a1") for _ in range(4)]
    push(store, "A", "a1", evs)
    rotate(store, "a2")
    before = {(t, d): store.keys(t, d) for t, d in (("A", "a1"), ("A", "a2"), ("B", "b1"))}
    store.close()
    again = open_store(store.db)
    assert again.head("A") == 4 and again.stats()["devices"] == 3
    assert {(t, d): again.keys(t, d) for t, d in before} == before
    assert again.push("A", "a1", batch("A", [row(node_id="a1")])).rekey   # still to begin
    begin_epoch(again, "A", "a2", 2)
    assert push(again, "A", "a2", [row(node_id="a2")], 2) == [("accepted", None)]
    assert again.push("A", "a2", batch("A", [row(node_id="a1")], 2)).node_taken  # a1's node
    assert again.head("A") == 5
    assert [ev for _, ev in opened(again.pull("A", 0, 10), "A")][:4] == evs
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


def test_a_newer_schema_is_refused(server_db):
    open_store(server_db).close()
    if is_pg(server_db):
        import psycopg
        with psycopg.connect(server_db, autocommit=True) as c:
            c.execute("UPDATE meta SET value = %s WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    else:
        with closing(sqlite3.connect(server_db)) as c, c:
            c.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer than this sk server"):
        open_store(server_db)


def test_lamport_jump_past_the_limit_is_rejected(store):
    """One device must not push the team's clock to 2^63 and stop all stamping."""
    big, ok = row(lamport_clock=2 ** 63 - 1), row(lamport_clock=5)
    assert push(store, "A", "a1", [big, ok]) == [
        ("rejected", "lamport_clock jumps more than 2^32 past the team's highest clock"),
        ("accepted", None)]
    # the allowance moves with the team's clock
    up = row(lamport_clock=5 + 2 ** 32)
    assert push(store, "A", "a1", [up]) == [("accepted", None)]
    assert push(store, "A", "a1", [row(lamport_clock=6 + 2 ** 33)]) == [
        ("rejected", "lamport_clock jumps more than 2^32 past the team's highest clock")]
    p = store.pull("A", 0, 10)
    assert [r[0] for r in p.rows] == [1, 2] and p.rows[0][3] == 1   # entry 1 of its batch
    assert opened(p, "A") == [(1, ok), (2, up)]


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
    store.close()


def test_hash_chain_and_known_points(store):
    evs, last = [], None
    for n in (3, 1, 4):
        rows = [row() for _ in range(n)]
        last = store.push("A", "a1", batch("A", rows))
        evs += rows
        assert last.diverged is None and last.head == len(evs)
    ids = [e.event_id for e in evs]
    chains = [GENESIS]
    for eid in ids:
        chains.append(chain_next(chains[-1], eid))
    assert last.chain == chains[-1]
    # a push of duplicates only answers the same point
    again = store.push("A", "a1", batch("A", evs[:2]))
    assert again.results == [("duplicate", None)] * 2 and (again.head, again.chain) == (8, chains[-1])
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
    why = store.pull("A", 9, 10).diverged
    assert "has read up to 9" in why
    # a push from a device whose point is off the log stores nothing
    got = store.push("A", "a1", batch("A", [row()]), known=(9, os.urandom(32)))
    assert got.diverged and got.results == [] and store.head("A") == 8
    got = store.push("A", "a1", batch("A", [row()]), known=(3, os.urandom(32)))
    assert "event 3" in got.diverged and store.head("A") == 8
    got = store.push("A", "a1", batch("A", [row()]), known=(8, chains[8]))
    assert got.diverged is None and got.head == 9
    # another team's chain is its own
    assert store.pull("B", 0, 10).chain == GENESIS


def test_a_replayed_ticket_stores_nothing(store):
    kid, _ = crypto.parse_api_key(store.api_keys["a1"])
    ticket = (kid, "a1", os.urandom(12), int(time.time() * 1000) + 60_000)
    assert store.push("A", "a1", batch("A", [row()]), ticket=ticket).results == [("accepted", None)]
    assert store.seen(kid, ticket[2])
    assert store.push("A", "a1", batch("A", [row()]), ticket=ticket) is None
    assert store.head("A") == 1 and store.stats()["batches"] == 1


def copy_events(source, target, team, chunk):
    after = 0
    while True:
        part = source.export_events(team, after, chunk)
        if not part["events"]:
            return
        target.import_events(team, part)
        after = part["events"][-1][0]


def test_export_and_import_keep_sequence_chain_and_keys(tmp_path, store):
    for i in range(5):
        push(store, "A", "a1", [row() for _ in range(i + 1)])
        push(store, "B", "b1", [row()])
    rotate(store, "a2")
    revoke(store, "b1")
    part = store.export_events("A", 0, 4)
    assert [r[0] for r in part["events"]] == [1, 2, 3, 4] and part["legacy"] == []
    assert sorted(b[0] for b in part["batches"]) == [1, 2, 3]   # 1 + 2 + the first of 3
    assert store.export_events("A", 15, 4) == {"events": [], "batches": [], "legacy": []}
    target = sqlite_store(tmp_path / "copy.db")
    target.import_meta(store.export_meta())
    for team in ("A", "B"):
        copy_events(store, target, team, 4)   # batches cut across chunks
        assert target.pull(team, 0, 100) == store.pull(team, 0, 100)
    for key in store.api_keys.values():
        kid, _ = crypto.parse_api_key(key)
        a, b = store.get_key(kid), target.get_key(kid)
        assert (a.device, a.team, a.master, a.retired, a.revoked) == \
               (b.device, b.team, b.master, b.retired, b.revoked)
    for team, dev in (("A", "a1"), ("A", "a2"), ("B", "b1")):
        assert target.keys(team, dev) == store.keys(team, dev)
    assert target.stats() == store.stats()
    assert len(opened(target.pull("A", 0, 100), "A")) == 15
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
    assert not reader.is_alive()
    assert len(got) == len(set(got)) == len(pushed) == store.head("A")
    assert set(got) == {e.event_id for e in pushed}


# -- databases of sk 0.3.0 (schema 2, 3) and 0.2.0 (schema 1): events in plaintext ---------
OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE teams (
    team    TEXT PRIMARY KEY,
    head    {bigint} NOT NULL DEFAULT 0,
    lamport {bigint} NOT NULL DEFAULT 0,
    chain   {blob} NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE devices (
    name      TEXT PRIMARY KEY,
    team      TEXT NOT NULL REFERENCES teams(team),
    created   TEXT NOT NULL,
    last_seen TEXT,
    revoked   TEXT
);
CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices(name),
    master      {blob} NOT NULL,
    created     TEXT NOT NULL,
    retired     TEXT,
    retired_why TEXT
);
CREATE TABLE events (
    team           TEXT NOT NULL,
    seq            {bigint} NOT NULL,
    event_id       TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    lamport_clock  {bigint} NOT NULL,
    node_id        TEXT NOT NULL,
    payload        TEXT NOT NULL,
    timestamp      TEXT NOT NULL,
    chain          {blob} NOT NULL,
    device         TEXT NOT NULL,
    received       TEXT NOT NULL,
    PRIMARY KEY (team, seq)
){without_rowid};
CREATE UNIQUE INDEX events_id ON events(team, event_id);
CREATE INDEX events_stamp ON events(team, node_id, lamport_clock);
CREATE TABLE nodes (
    team    TEXT NOT NULL,
    node_id TEXT NOT NULL,
    device  TEXT NOT NULL,
    PRIMARY KEY (team, node_id)
){without_rowid};
CREATE TABLE nonces (
    key_id  TEXT NOT NULL,
    nonce   {blob} NOT NULL,
    expires {bigint} NOT NULL,
    PRIMARY KEY (key_id, nonce)
){without_rowid};
CREATE INDEX nonces_expires ON nonces(expires);
CREATE TABLE auth_failures (
    addr         TEXT PRIMARY KEY,
    window_start {bigint} NOT NULL,
    count        {bigint} NOT NULL
){without_rowid};
CREATE TABLE ws_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    expires    {bigint} NOT NULL,
    used       {bigint}
){without_rowid}
"""
MARK = "plaintext-marker-7d1f"   # in every old event's payload and aggregate id


def old_event(node, n):
    big = "x" * (6000 if n % 3 == 0 else 10)   # some payloads overflow a SQLite page
    return row(node_id=node, event_type="zz_old_type", aggregate_id=f"{MARK}-agg-{n}",
               payload={"title": f"{MARK} {n} {node}", "pad": big})


def old_server(db, schema, teams, secret=None, unchained=0):
    """Write by hand a server database as sk 0.3.0 (schema 3; 2 has no nodes table)
    or sk 0.2.0 (schema 1: SQLite, no hash chain) left it: its events in plaintext.
    teams {team: [(device, Event)]}; the last `unchained` events of each team
    written as an sk 0.2.0 server still running on a 0.3.0 file writes them: no
    chain, only the head moved. Returns {device: api_key}."""
    secret = secret or load_secret(db)
    pg = is_pg(db)
    words = ({"blob": "BYTEA", "bigint": "BIGINT", "without_rowid": ""} if pg else
             {"blob": "BLOB", "bigint": "INTEGER", "without_rowid": " WITHOUT ROWID"})
    if pg:
        import psycopg
        conn = psycopg.connect(db, autocommit=True)
    else:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")   # as sk 0.3.0 kept it

    def run(sql, args=()):
        conn.execute(sql.replace("?", "%s") if pg else sql, args)

    run("BEGIN")
    for stmt in OLD_SCHEMA.format(**words).split(";"):
        run(stmt)
    now, api_keys = "2026-01-01T00:00:00Z", {}
    for team, evs in teams.items():
        chain, chains = GENESIS, []
        for _, ev in evs:
            chain = chain_next(chain, ev.event_id)
            chains.append(chain)
        good = len(evs) - unchained
        run("INSERT INTO teams VALUES (?, ?, ?, ?, ?)",
            (team, len(evs), max(e.lamport_clock for _, e in evs),
             chains[good - 1] if good else GENESIS, now))
        for dev in dict.fromkeys(d for d, _ in evs):
            key_id, api_keys[dev] = crypto.new_api_key()
            run("INSERT INTO devices VALUES (?, ?, ?, NULL, NULL)", (dev, team, now))
            run("INSERT INTO keys VALUES (?, ?, ?, ?, NULL, NULL)",
                (key_id, dev, crypto.wrap_key(secret, key_id, crypto.derive_master(api_keys[dev])),
                 now))
            if schema == 3:
                run("INSERT INTO nodes VALUES (?, ?, ?)", (team, dev, dev))
        for seq, ((dev, ev), chain) in enumerate(zip(evs, chains), 1):
            run("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (team, seq, *ev, chain if seq <= good else b"", dev, now))
    run("INSERT INTO meta VALUES ('schema', ?)", (str(schema),))
    run("INSERT INTO meta VALUES ('secret_check', ?)", (secret_check(secret),))
    if schema < 3:
        run("DROP INDEX events_stamp")
        run("DROP TABLE nodes")
    if schema == 1:
        for table in ("events", "teams"):
            run(f"ALTER TABLE {table} DROP COLUMN chain")
    run("COMMIT")
    conn.close()
    return api_keys


def old_teams():
    a = [(d, old_event(d, n)) for n, d in enumerate(("a1", "a1", "a2", "a1", "a2", "a2", "a1"))]
    b = [("b1", old_event("b1", n)) for n in range(10, 13)]
    return {"A": a, "B": b}


def file_bytes(path):
    """The bytes of a SQLite database and of its -wal and -journal files."""
    return b"".join(Path(f"{path}{s}").read_bytes() for s in ("", "-wal", "-journal", "-shm")
                    if Path(f"{path}{s}").exists())


def legacy_events(page):
    return [ev for _, ev in opened(page, "?")]


def reseal_all(store, team, device, size, epoch=1):
    """Seal the team's legacy events from their plaintext (as a member device that
    read them does), `size` a batch; returns how many."""
    p = store.pull(team, 0, 5000)
    old = [(seq, ev) for (seq, ev), r in zip(opened(p, team), p.rows) if r[2] is None]
    done = 0
    for i in range(0, len(old), size):
        part = old[i:i + size]
        assert [s for s, _ in part] == list(range(part[0][0], part[0][0] + len(part)))
        done += store.reseal(team, device, part[0][0],
                             batch(team, [ev for _, ev in part], epoch))
    return done


@pytest.mark.parametrize("schema", [2, 3])
def test_an_sk_0_3_0_database_is_upgraded_and_its_plaintext_resealed(server_db, schema):
    """A database of sk 0.3.0 (schema 2 or 3) is upgraded when opened: its events
    keep seq, id, node, clock and chain, their plaintext moves to `legacy` (pulls
    serve it) and nothing of it is left in the events table. A member then seals it
    again (the manifest must be exactly the legacy events'): after that the
    plaintext is nowhere in the database, its files included (SQLite)."""
    upgrade_and_reseal(server_db, schema)


def test_a_schema_1_database_gains_its_hash_chain_and_is_resealed(tmp_path):
    """A server database of sk 0.2.0 (no hash chain; SQLite only) is upgraded in
    place when opened: chains computed, plaintext to `legacy`, then resealed."""
    upgrade_and_reseal(str(tmp_path / "old.db"), 1)


@pytest.mark.parametrize("schema", [2, 3])
def test_node_ids_stay_bound_to_their_devices_across_the_upgrade(server_db, schema):
    """Each node id belongs to the device that first pushed under it, before the
    upgrade too: the events say which (schema 2 had no nodes table), so after the
    upgrade no other device may push under it."""
    node_ids_stay_bound(server_db, schema)


def test_node_ids_of_an_sk_0_2_0_database_stay_bound_to_their_devices(tmp_path):
    node_ids_stay_bound(str(tmp_path / "old.db"), 1)


def node_ids_stay_bound(db, schema):
    api_keys = old_server(db, schema, old_teams())
    with closing(open_store(db)) as s:
        for dev, team in (("a1", "A"), ("a2", "A"), ("b1", "B")):
            assert s.put_keys(team, dev, identity=identity(api_keys[dev])) is None
        begin_epoch(s, "A", "a1")
        for dev, node in (("a1", "a2"), ("a2", "a1")):
            got = s.push("A", dev, batch("A", [row(node_id=node)]))
            assert got.node_taken and got.node_taken["device"] == node, (schema, dev, node, got)
        assert push(s, "A", "a2", [row(node_id="a2")]) == [("accepted", None)]
        assert s.head("A") == 8


def upgrade_and_reseal(server_db, schema):
    teams = old_teams()
    api_keys = old_server(server_db, schema, teams)
    if not is_pg(server_db):
        assert MARK.encode() in file_bytes(server_db)   # the check below can fail
    s = open_store(server_db)
    try:
        assert query(server_db, "SELECT value FROM meta WHERE key = 'schema'") == [
            (str(SCHEMA_VERSION),)]
        assert MARK not in repr(query(server_db, "SELECT * FROM events"))
        for team, evs in teams.items():
            chains, chain = [], GENESIS
            for _, ev in evs:
                chain = chain_next(chain, ev.event_id)
                chains.append(chain)
            stored = query(server_db, "SELECT " + ", ".join(STORED_COLUMNS) + " FROM events"
                           " WHERE team = ? ORDER BY seq", (team,))
            assert [(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), r[7]) for r in stored] == [
                (i, ev.event_id, ev.node_id, ev.lamport_clock, None, None, c, dev)
                for i, ((dev, ev), c) in enumerate(zip(evs, chains), 1)]
            assert query(server_db, "SELECT seq, event_type, aggregate_type, aggregate_id,"
                                    " payload, timestamp FROM legacy WHERE team = ? ORDER BY seq",
                         (team,)) == [(i, ev.event_type, ev.aggregate_type, ev.aggregate_id,
                                       ev.payload, ev.timestamp) for i, (_, ev) in enumerate(evs, 1)]
            p = s.pull(team, 0, 100)
            assert p.rows == [(i, ev.event_id, None, None) for i, (_, ev) in enumerate(evs, 1)]
            assert legacy_events(p) == [ev for _, ev in evs] and p.batches == {}
            assert p.chain == chains[-1] and s.head(team) == len(evs)
            for i, c in enumerate(chains, 1):
                assert s.pull(team, 0, 1, known=(i, c)).diverged is None
        for dev, key in api_keys.items():   # the old keys work, unwrapped with the secret
            kid, _ = crypto.parse_api_key(key)
            assert s.get_key(kid).master == crypto.derive_master(key) and s.key_valid(kid)
        assert s.keys("A", "a1")["legacy"] == 7 and s.stats()["legacy"] == 10
        assert s.keys("A", "a1")["epoch"] == 0 and s.keys("A", "a1")["identity"] is None
        # a device of protocol 1 gives its identity, and begins the team's key
        for dev, team in (("a1", "A"), ("a2", "A"), ("b1", "B")):
            assert s.put_keys(team, dev, identity=identity(api_keys[dev])) is None
        begin_epoch(s, "A", "a1")
        begin_epoch(s, "B", "b1")
        # the log goes on, sealed; the old events are known by id and stamp
        new = row(node_id="a1")
        assert push(s, "A", "a1", [new]) == [("accepted", None)]
        assert push(s, "A", "a2", [teams["A"][2][1]]) == [("duplicate", None)]
        assert push(s, "A", "a2", [teams["A"][2][1]._replace(lamport_clock=next(_clock))]) == [
            ("rejected", "event_id already used by a different event")]
        twin = row(node_id="a2", lamport_clock=teams["A"][2][1].lamport_clock)
        assert s.push("A", "a2", batch("A", [twin])).node_taken["node_id"] == "a2"

        # resealing: the batch must be exactly the legacy events there, in seq order
        evs = [ev for _, ev in teams["A"]]
        batches = s.stats()["batches"]
        for team, first, part in (
                ("A", 2, evs[0:3]),                             # not where they are
                ("A", 1, [evs[1], evs[0], evs[2]]),             # out of order
                ("A", 1, evs[0:2] + [evs[2]._replace(lamport_clock=evs[2].lamport_clock + 1)]),
                ("A", 6, evs[5:7] + [new]),                     # running into a sealed event
                ("A", 1, [teams["B"][0][1]])):                  # another team's
            with pytest.raises(StoreError, match="does not match the legacy events"):
                s.reseal(team, "a2", first, batch(team, part))
        with pytest.raises(StoreError, match="was given the team key"):  # in a team not its own
            s.reseal("B", "a2", 1, batch("B", evs[0:1]))
        with pytest.raises(StoreError, match="epoch"):
            s.reseal("A", "a2", 1, batch("A", evs[0:3], 2))
        assert s.stats()["batches"] == batches and s.keys("A", "a1")["legacy"] == 7
        assert s.reseal("A", "a2", 1, batch("A", evs[0:3])) == 3
        with pytest.raises(StoreError, match="does not match"):   # sealed already
            s.reseal("A", "a2", 1, batch("A", evs[0:3]))
        assert s.keys("A", "a1")["legacy"] == 4
        p = s.pull("A", 0, 100)
        assert [r[2] is None for r in p.rows] == [False] * 3 + [True] * 4 + [False]
        assert [ev for _, ev in opened(p, "A")] == evs + [new]
        assert p.batches[p.rows[0][2]][3] == "a2"   # sealed by the device that resealed
        assert reseal_all(s, "A", "a1", 3) == 4 and reseal_all(s, "B", "b1", 2) == 3
        assert s.stats()["legacy"] == 0 and s.keys("B", "b1")["legacy"] == 0
        assert query(server_db, "SELECT count(*) FROM legacy") == [(0,)]
        for team, old in teams.items():   # same log, chain and events, now sealed
            p = s.pull(team, 0, 100)
            assert [ev for _, ev in opened(p, team)][:len(old)] == [ev for _, ev in old]
            assert all(r[2] is not None for r in p.rows) and p.legacy == {}
            chain = GENESIS
            for r in p.rows:
                chain = chain_next(chain, r[1])
            assert p.chain == chain
        assert s.pull("A", 0, 100, known=(7, chain_next(GENESIS, evs[0].event_id))).diverged
    finally:
        s.close()
    if not is_pg(server_db):
        # SQLite: the plaintext is overwritten, in the database and its write-ahead log
        data = file_bytes(server_db)
        assert MARK.encode() not in data and b"zz_old_type" not in data
    for table in ("events", "batches", "legacy", "teams", "devices", "nodes", "meta"):
        assert MARK not in repr(query(server_db, f"SELECT * FROM {table}")), table


@pytest.mark.parametrize("char, n", [("y", 250_000), ("\u20ac", 83_000)])
def test_legacy_rows_are_paged_by_their_size(server_db, char, n):
    """Legacy events count their plaintext's UTF-8 bytes on a page (what the wire
    carries), as sealed ones their batch: a page of them stays within the cap."""
    big = [row(node_id="a1", payload={"blob": char * n}) for _ in range(40)]
    old_server(server_db, 3, {"A": [("a1", ev) for ev in big]})
    each = len(big[0].payload.encode()) + LEGACY_COST + ROW_BYTES
    per_page = wire.MAX_BATCH_BYTES // each
    assert 1 < per_page < 40 and each > 200_000
    with closing(open_store(server_db)) as s:
        pages = read_all(s, "A")
        assert [len(p.rows) for p in pages] == [per_page] * (40 // per_page) + [40 % per_page]
        for p in pages:
            assert sum(len(v[5].encode()) for v in p.legacy.values()) + \
                (LEGACY_COST + ROW_BYTES) * len(p.rows) <= wire.MAX_BATCH_BYTES
        assert [ev for p in pages for ev in legacy_events(p)] == big


def test_an_sk_0_2_0_server_writing_on_after_the_upgrade_is_mended(tmp_path):
    """An sk 0.2.0 server still running on a file a 0.3.0 tool had upgraded wrote
    events without a chain and moved only the head: opening it mends the chain."""
    path = tmp_path / "old.db"
    teams = {"A": [("a1", old_event("a1", n)) for n in range(5)]}
    old_server(path, 3, teams, unchained=2)
    with closing(sqlite_store(path)) as s:
        chain = GENESIS
        for i, (_, ev) in enumerate(teams["A"], 1):
            chain = chain_next(chain, ev.event_id)
            assert s.pull("A", 0, 10, known=(i, chain)).diverged is None
        assert s.pull("A", 0, 10).chain == chain
        assert bytes(query(path, "SELECT chain FROM events WHERE seq = 5")[0][0]) == chain
        s.put_keys("A", "a1", identity=os.urandom(32))
        begin_epoch(s, "A", "a1")
        assert s.push("A", "a1", batch("A", [row(node_id="a1")])).head == 6


def test_migrate_keeps_batches_legacy_keys_and_chains(tmp_path, server_db):
    """sk-admin migrate's work (migrate.plan, migrate.migrate) from a SQLite server
    that was upgraded from sk 0.3.0 and is half resealed into a new database: the
    same logs (sealed batches, legacy rows, seq and chain), key state, key material
    and node bindings; run again, it copies nothing; the target then reseals the
    rest."""
    (tmp_path / "src").mkdir()
    src_path = tmp_path / "src" / "server.db"
    secret = os.urandom(32)
    teams = old_teams()
    api_keys = old_server(src_path, 3, teams, secret=secret)
    source = sqlite_store(src_path, secret=secret)
    target = open_store(server_db)
    try:
        for dev, team in (("a1", "A"), ("a2", "A"), ("b1", "B")):
            source.put_keys(team, dev, identity=identity(api_keys[dev]))
        api_keys["a3"] = register(source, "a3", "A")
        me = identity(api_keys["a1"])
        grant = crypto.seal_grant("A", 1, team_key("A"), crypto.identity_secret(api_keys["a1"]), me)
        assert source.put_keys("A", "a1", epoch=1, grants=[(1, "a1", me, grant)]) is None
        share_epochs(source, "A", "a1")
        begin_epoch(source, "B", "b1")
        evs = [ev for _, ev in teams["A"]]
        assert source.reseal("A", "a1", 1, batch("A", evs[:3])) == 3
        for n in (2, 1, 4):
            push(source, "A", "a3", [row(node_id="a3") for _ in range(n)])
        rotate(source, "a2")   # team A must begin epoch 2 before writing more
        with closing(sqlite3.connect(src_path)) as c, c:   # a1 and b1 made requests
            c.execute("UPDATE devices SET last_seen = '2026-12-01T10:00:00Z' WHERE name IN"
                      " ('a1', 'b1')")
        source.note_device("a1", pulled=9, queued=4)
        source.note_device("b1", pulled=3, queued=0)
        meta, work = migrate.plan(source, target)
        assert sorted(work) == [("A", 0, 14), ("B", 0, 3)]
        done = migrate.migrate(source, target, meta, work, chunk=3)
        assert (done["events"], done["already"], done["teams"], done["devices"]) == (17, 0, 2, 4)
        for team, devs in (("A", ("a1", "a2", "a3")), ("B", ("b1",))):
            assert target.pull(team, 0, 100) == source.pull(team, 0, 100)
            for dev in devs:
                assert target.keys(team, dev) == source.keys(team, dev)
        assert target.stats() == source.stats()
        # where each device's pull got to and its queue (sk-admin status, the metrics)
        assert target.status(events=False)["devices"] == source.status(events=False)["devices"]
        assert {d["device"]: (d["lag"], d["queued"]) for d in target.status(events=False)[
            "devices"]} == {"a1": (5, 4), "a2": (14, None), "a3": (14, None), "b1": (0, 0)}
        assert target.stats()["legacy"] == 7 and target.keys("A", "a1")["grants"][0]["sealed"] == grant
        for key in api_keys.values():
            kid, _ = crypto.parse_api_key(key)
            a, b = source.get_key(kid), target.get_key(kid)
            assert (a.device, a.team, a.master, a.retired) == (b.device, b.team, b.master, b.retired)
        assert target.push("A", "a1", batch("A", [row(node_id="a1")])).rekey   # still to begin
        # again: nothing is copied
        meta, work = migrate.plan(source, target)
        assert sorted(work) == [("A", 14, 14), ("B", 3, 3)]
        again = migrate.migrate(source, target, meta, work, chunk=3)
        assert (again["events"], again["already"]) == (0, 17)
        # the target goes on: a new epoch, node ids still bound, the rest resealed
        begin_epoch(target, "A", "a1", 2)
        assert target.push("A", "a1", batch("A", [row(node_id="a3")], 2)).node_taken
        assert target.reseal("A", "a2", 4, batch("A", evs[3:], 2)) == 4
        assert reseal_all(target, "B", "b1", 5) == 3 and target.stats()["legacy"] == 0
        p = target.pull("A", 0, 100)
        assert [ev for _, ev in opened(p, "A")][:7] == evs
        assert p.chain == source.pull("A", 0, 100).chain
    finally:
        source.close()
        target.close()


def test_a_push_wakes_the_listeners_of_every_server_on_the_database(store, server_db):
    """What makes a watcher on one server get an event pushed through another at
    once (test_scale measures how soon): on PostgreSQL a push that stores something
    notifies every store listening on the database, with the team; SQLite, one
    process's, says it has no such thing (its sessions are woken in-process)."""
    other = open_store(server_db)
    heard = []
    try:
        if not other.d.listen(heard.append):
            assert not is_pg(server_db)
            return
        other.pull("A", 0, 1)   # (a store listens from its first use on)
        deadline = time.monotonic() + 10
        while None not in heard and time.monotonic() < deadline:   # listening now
            time.sleep(0.01)
        e = row(node_id="n-wake")
        push(store, "A", "a1", [e])
        while "A" not in heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "A" in heard, heard
        before = len(heard)
        assert push(store, "A", "a1", [e]) == [("duplicate", None)]   # nothing new stored:
        time.sleep(0.3)                                               # no one woken
        assert heard[before:] == []
    finally:
        other.close()
