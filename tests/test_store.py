"""sk.store.LocalStore: append (all or nothing), stamp (idempotent, clock in the same
transaction), the push queue, receive, counts, the log and sync bookkeeping."""

import json
import sqlite3
import threading
import uuid

import pytest

from sk import store as store_mod
from sk.errors import ConfigError
from sk.event import (FIELDS, Event, EventError, NeverSync, check_new, check_timestamp,
                      parse_ndjson)
from sk.store import LocalStore


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "dev" / "sk.db")
    yield s
    s.close()


def ev(aid="F-1", etype="feature_updated", atype="feature", **kw):
    return check_new({"event_type": etype, "aggregate_type": atype, "aggregate_id": aid, **kw})


def remote(n, lamport, node="remote-node", aid="F-1", etype="feature_updated", payload=None):
    return Event(str(uuid.UUID(int=n)), etype, "feature", aid, lamport, node,
                 json.dumps(payload or {"n": n}), "2026-01-01T00:00:00Z")


def events(store_, **filters):
    return list(store_.log(**filters))


# -- opening ---------------------------------------------------------------------------
def test_open_creates_schema_and_nested_directory(tmp_path):
    path = tmp_path / "a" / "b" / "sk.db"
    s = LocalStore(path)
    assert path.exists()
    assert s.meta("schema") == store_mod.SCHEMA_VERSION
    assert s.clock() == 0 and s.cursor() == 0
    s.close()


def test_open_without_create_refuses_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no local log"):
        LocalStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_open_refuses_a_file_that_is_not_sqlite(tmp_path):
    bad = tmp_path / "sk.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot open local log"):
        LocalStore(bad)


def test_node_id_is_stable_across_reopen(tmp_path):
    path = tmp_path / "sk.db"
    a = LocalStore(path)
    node = a.node_id()
    assert str(uuid.UUID(node)) == node
    assert a.node_id() == node
    a.close()
    b = LocalStore(path, create=False)
    assert b.node_id() == node
    b.close()


# -- append ----------------------------------------------------------------------------
def test_append_stores_unstamped_rows(store):
    assert store.append([ev("A"), ev("B")]) == 2
    assert store.counts()["unstamped"] == 2
    assert events(store) == []


def test_append_is_all_or_nothing_on_a_bad_ndjson_line(store):
    lines = [json.dumps({"event_type": "x", "aggregate_type": "feature", "aggregate_id": "A"}),
             json.dumps({"event_type": "x", "aggregate_type": "feature", "aggregate_id": "B"}),
             json.dumps({"event_type": "BAD", "aggregate_type": "feature", "aggregate_id": "C"})]
    with pytest.raises(EventError, match="line 3"):
        store.append(parse_ndjson(lines))
    assert store.counts()["unstamped"] == 0
    assert store.append(parse_ndjson(lines[:2])) == 2


def test_append_is_all_or_nothing_across_chunks(store):
    def gen():
        for i in range(store_mod.CHUNK + 10):
            yield ev(f"A{i}")
        raise EventError("line 5011: broken")
    with pytest.raises(EventError, match="5011"):
        store.append(gen())
    assert store.counts()["unstamped"] == 0
    n = store.append(ev(f"A{i}") for i in range(store_mod.CHUNK + 10))
    assert n == store_mod.CHUNK + 10
    assert store.counts()["unstamped"] == n


# -- stamp -----------------------------------------------------------------------------
def test_stamp_assigns_every_stamp_field(store):
    given_id = str(uuid.uuid4())
    store.append([ev("A", payload={"t": 1}), ev("B", event_id=given_id,
                                                 timestamp="2025-05-05T05:05:05Z"), ev("C")])
    assert store.stamp(NeverSync()) == (3, 0, 0, [])
    log = events(store)
    node = store.node_id()
    assert [e["aggregate_id"] for e in log] == ["A", "B", "C"]
    assert [e["lamport_clock"] for e in log] == [1, 2, 3]
    assert store.clock() == 3
    assert all(e["node_id"] == node for e in log)
    assert all(e["status"] == "queued" for e in log)
    assert log[0]["payload"] == {"t": 1}
    assert log[1]["event_id"] == given_id
    assert log[1]["timestamp"] == "2025-05-05T05:05:05Z"
    for e in (log[0], log[2]):
        assert str(uuid.UUID(e["event_id"])) == e["event_id"]
        assert check_timestamp(e["timestamp"]) and e["timestamp"].endswith("Z")
    assert len({e["event_id"] for e in log}) == 3
    assert store.counts()["unstamped"] == 0


def test_stamp_is_idempotent(store):
    store.append([ev("A"), ev("B")])
    store.stamp(NeverSync())
    before = events(store)
    assert store.stamp(NeverSync()) == (0, 0, 0, [])
    assert store.stamp(NeverSync()) == (0, 0, 0, [])
    assert events(store) == before
    assert store.clock() == 2


def test_stamp_ticks_clock_by_one_per_event_across_runs(store):
    for i in range(1, 4):
        store.append([ev(f"A{i}")])
        store.stamp(NeverSync())
        assert store.clock() == i
    assert [e["lamport_clock"] for e in events(store)] == [1, 2, 3]


def test_stamp_drops_an_event_id_already_in_the_log(store):
    eid = str(uuid.uuid4())
    store.append([ev("A", event_id=eid, payload={"v": 1})])
    assert store.stamp(NeverSync()) == (1, 0, 0, [])
    store.append([ev("A", event_id=eid, payload={"v": 1}), ev("B")])   # the same event
    assert store.stamp(NeverSync()) == (1, 0, 1, [])
    log = events(store)
    assert len(log) == 2
    assert [e for e in log if e["event_id"] == eid][0]["payload"] == {"v": 1}
    assert store.clock() == 2
    assert store.counts()["unstamped"] == 0


def test_stamp_sets_aside_an_event_id_in_the_log_with_other_content(store):
    eid = str(uuid.uuid4())
    store.append([ev("A", event_id=eid, payload={"v": 1})])
    store.stamp(NeverSync())
    store.append([ev("A", event_id=eid, payload={"v": 2})])
    stamped, _, dups, problems = store.stamp(NeverSync())
    assert (stamped, dups) == (0, 0)
    assert len(problems) == 1 and "other content" in problems[0][1]
    assert [e["payload"] for e in events(store)] == [{"v": 1}]
    aside = events(store, status="rejected")
    assert [e["payload"] for e in aside] == [{"v": 2}] and "other content" in aside[0]["reason"]
    assert store.counts()["unstamped"] == 0 and store.clock() == 1


def test_append_with_known_tells_duplicates_and_sets_aside_other_content(store):
    eid = str(uuid.uuid4())
    store.append([ev("A", event_id=eid, payload={"v": 1})])
    store.stamp(NeverSync())
    known = []
    assert store.append([ev("A", event_id=eid, payload={"v": 1}),
                         ev("A", event_id=eid, payload={"v": 3}), ev("B")], known=known) == 1
    assert [(k[0], k[1]) for k in known] == [(eid, "duplicate"), (eid, "rejected")]
    assert [e["payload"] for e in events(store, status="rejected")] == [{"v": 3}]
    # a later event set aside from the log may take the seq it had: it gets the next one
    assert store.stamp(NeverSync()) == (1, 0, 0, [])
    b = events(store)[-1]
    store.set_aside(b["event_id"], "refused")
    aside = events(store, status="rejected")
    assert [e["payload"] for e in aside] == [{"v": 3}, {}]
    assert len({e["seq"] for e in aside}) == 2


def test_stamp_drops_a_duplicate_event_id_within_one_run(store):
    eid = str(uuid.uuid4())
    store.append([ev("A", event_id=eid), ev("A", event_id=eid), ev("B")])
    assert store.stamp(NeverSync()) == (2, 0, 1, [])
    assert [e["lamport_clock"] for e in events(store)] == [1, 2]


def test_stamp_drops_event_id_received_from_remote(store):
    store.receive([remote(1, 3)], cursor=1)
    store.append([ev("F-1", event_id=str(uuid.UUID(int=1)), payload={"n": 1})])
    assert store.stamp(NeverSync()) == (0, 0, 1, [])
    assert len(events(store)) == 1
    store.append([ev("X", event_id=str(uuid.UUID(int=1)))])       # other content: set aside
    assert store.stamp(NeverSync())[3][0][1].startswith("event id ")
    assert len(events(store)) == 1 and len(events(store, status="rejected")) == 1


def test_unstamped_table_is_an_interface_and_bad_rows_stay(store):
    db = store.db
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id)"
               " VALUES ('feature_created', 'feature', 'RAW-1')")
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id)"
               " VALUES ('Bad-Type', 'feature', 'RAW-2')")
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id, payload)"
               " VALUES ('x', 'feature', 'RAW-3', 'not json')")
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id, payload)"
               " VALUES ('x', 'feature', 'RAW-4', '[1,2]')")
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id, event_id)"
               " VALUES ('x', 'feature', 'RAW-5', 'NOT-A-UUID')")
    db.execute("INSERT INTO unstamped(event_type, aggregate_type, aggregate_id, payload)"
               " VALUES ('x', 'feature', 'RAW-6', '{\"ok\": true}')")
    stamped, local_only, dups, problems = store.stamp(NeverSync())
    assert (stamped, local_only, dups) == (2, 0, 0)
    assert [seq for seq, _ in problems] == [2, 3, 4, 5]
    reasons = dict(problems)
    assert "event_type" in reasons[2]
    assert "not JSON" in reasons[3]
    assert "payload" in reasons[4]
    assert "event_id" in reasons[5]
    log = events(store)
    assert [e["aggregate_id"] for e in log] == ["RAW-1", "RAW-6"]
    assert log[0]["payload"] == {} and log[1]["payload"] == {"ok": True}
    assert store.clock() == 2
    assert store.counts()["unstamped"] == 4
    # still there, still reported, and they do not consume clock ticks
    again = store.stamp(NeverSync())
    assert again[:3] == (0, 0, 0) and [s for s, _ in again[3]] == [2, 3, 4, 5]
    assert store.clock() == 2


def test_never_sync_events_are_local_only(store):
    store.append([ev("smtp_password", "setting_changed", "setting", payload={"v": "hunter2"}),
                  ev("theme", "setting_changed", "setting", payload={"v": "dark"}),
                  ev("GITHUB_PAT", "setting_changed", "setting")])
    assert store.stamp(NeverSync()) == (3, 2, 0, [])
    status = {e["aggregate_id"]: e["status"] for e in events(store)}
    assert status == {"smtp_password": "local_only", "theme": "queued",
                      "GITHUB_PAT": "local_only"}
    queued = store.queued(100)
    assert [row[3] for _, row, *_ in queued] == ["theme"]
    c = store.counts()
    assert (c["local_only"], c["queued"]) == (2, 1)


def test_never_sync_extra_rules_apply_at_stamping(store):
    store.append([ev("F-secret-ish", atype="feature"), ev("P-private", atype="project")])
    store.stamp(NeverSync(["project:*private*"]))
    assert {e["aggregate_id"]: e["status"] for e in events(store)} == {
        "F-secret-ish": "queued", "P-private": "local_only"}


def test_stamp_failure_leaves_clock_and_log_untouched(store, monkeypatch):
    store.append([ev("A")])
    store.stamp(NeverSync())
    store.append([ev("B"), ev("C")])
    store.node_id()
    import sk.event as event_mod
    real = event_mod.new_event_id
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real()
    monkeypatch.setattr(event_mod, "new_event_id", flaky)
    with pytest.raises(RuntimeError):
        store.stamp(NeverSync())
    assert len(calls) == 2
    monkeypatch.setattr(event_mod, "new_event_id", real)
    assert store.clock() == 1
    assert len(events(store)) == 1
    assert store.counts()["unstamped"] == 2
    assert store.stamp(NeverSync()) == (2, 0, 0, [])
    assert [e["lamport_clock"] for e in events(store)] == [1, 2, 3]


def test_concurrent_stampers_never_reuse_a_lamport_value(tmp_path):
    path = tmp_path / "sk.db"
    LocalStore(path).close()
    errors = []

    def worker(i):
        try:
            s = LocalStore(path)
            for j in range(10):
                s.append([ev(f"T{i}-{j}")])
                s.stamp(NeverSync())
            s.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = LocalStore(path)
    log = events(s)
    assert len(log) == 40
    assert sorted(e["lamport_clock"] for e in log) == list(range(1, 41))
    assert s.clock() == 40
    assert len({e["node_id"] for e in log}) == 1
    s.close()


# -- receive -----------------------------------------------------------------------------
def test_receive_stores_sets_cursor_and_advances_clock(store):
    store.append([ev("L")])
    store.stamp(NeverSync())                         # clock 1
    assert store.receive([remote(1, 10), remote(2, 4)], cursor=2) == 2
    assert store.clock() == 11                        # max(1, 10) + 1
    assert store.cursor() == 2
    log = events(store, status="remote")
    assert [e["lamport_clock"] for e in log] == [10, 4]
    assert log[0]["node_id"] == "remote-node" and log[0]["payload"] == {"n": 1}
    store.append([ev("L2")])
    store.stamp(NeverSync())
    assert events(store, aggregate_id="L2")[0]["lamport_clock"] == 12


def test_receive_of_older_events_still_ticks_past_own_clock(store):
    store.append([ev(f"L{i}") for i in range(5)])
    store.stamp(NeverSync())                         # clock 5
    store.receive([remote(1, 2)], cursor=1)
    assert store.clock() == 6                        # max(5, 2) + 1


def test_receive_ignores_duplicates(store):
    assert store.receive([remote(1, 3), remote(1, 3), remote(2, 4)], cursor=2) == 2
    assert store.receive([remote(2, 4), remote(3, 5)], cursor=3) == 1
    assert store.receive([remote(1, 3)], cursor=3) == 0
    assert len(events(store)) == 3
    assert store.cursor() == 3


def test_receive_of_own_pushed_event_keeps_its_status(store):
    store.append([ev("A")])
    store.stamp(NeverSync())
    mine = events(store)[0]
    store.mark_pushed([(mine["event_id"], "accepted", None)])
    row = Event(*(mine[c] if c != "payload" else json.dumps(mine[c]) for c in FIELDS))
    assert store.receive([row], cursor=1) == 0
    assert events(store)[0]["status"] == "sent"


def test_receive_empty_page_only_moves_cursor(store):
    store.append([ev("A")])
    store.stamp(NeverSync())
    assert store.receive([], cursor=42) == 0
    assert store.cursor() == 42 and store.clock() == 1


def test_receive_is_one_transaction(store):
    good = remote(1, 50)
    bad = remote(2, 60)[:7]                                   # one column short
    with pytest.raises(sqlite3.ProgrammingError):
        store.receive([good, bad], cursor=9)
    assert events(store) == []
    assert store.clock() == 0 and store.cursor() == 0


# -- push side -----------------------------------------------------------------------------
def _stamp(store_, n):
    store_.append([ev(f"E{i}") for i in range(n)])
    store_.stamp(NeverSync())
    return [e["event_id"] for e in events(store_)]


def test_queued_pages_in_local_order(store):
    ids = _stamp(store, 7)
    first = store.queued(3)
    assert [row[0] for _, row, *_ in first] == ids[:3]
    nxt = store.queued(3, after=first[-1][0])
    assert [row[0] for _, row, *_ in nxt] == ids[3:6]
    assert len(store.queued(100)) == 7
    seq, row, relay, _ = first[0]
    assert relay is False   # stamped here: not another device's event
    assert len(row) == len(FIELDS)
    assert json.loads(row[6]) == {}


def test_mark_pushed_applies_statuses(store):
    ids = _stamp(store, 4)
    store.mark_pushed([(ids[0], "accepted", None), (ids[1], "duplicate", None),
                       (ids[2], "rejected", "payload too large"), (ids[3], "rejected", None)])
    by_id = {e["event_id"]: e for e in events(store)}
    assert by_id[ids[0]]["status"] == by_id[ids[1]]["status"] == "sent"
    # rejected events are set aside: out of the log, listed with their reason
    assert ids[2] not in by_id and ids[3] not in by_id
    aside = {e["event_id"]: e for e in events(store, status="rejected")}
    assert aside[ids[2]]["status"] == "rejected"
    assert aside[ids[2]]["reason"] == "payload too large"
    assert aside[ids[3]]["reason"] == "rejected by server"
    assert "reason" not in by_id[ids[0]]
    assert store.queued(100) == []
    c = store.counts()
    assert (c["sent"], c["rejected"], c["queued"]) == (2, 2, 0)
    assert [e["event_id"] for e in events(store, status="rejected")] == ids[2:]


def test_a_push_moves_the_cursor_over_its_own_events_only_when_the_chain_says_so(store):
    """A device caught up to the server's log pushes: when the answer's head is the
    cursor plus exactly the accepted events and its chain is the one they make, the
    cursor moves there (a pull would only read their ids back to check that chain);
    otherwise (another device's events in between, a chain that differs) it stays."""
    import hashlib
    ids = _stamp(store, 5)

    def chain(start, eids):
        for e in eids:
            start = hashlib.sha256(start + e.encode()).digest()
        return start

    genesis = bytes(32)
    assert store.cursor() == 0 and store.cursor_chain() == genesis
    # accepted, duplicate (no seq for it), accepted: the log is the cursor's plus two
    store.mark_pushed([(ids[0], "accepted", None), (ids[1], "duplicate", None),
                       (ids[2], "accepted", None)], (2, chain(genesis, [ids[0], ids[2]]).hex()))
    assert store.cursor() == 2 and store.cursor_chain() == chain(genesis, [ids[0], ids[2]])
    # another device's event came in between: head 4, not 3; the cursor stays
    at = store.cursor_chain()
    store.mark_pushed([(ids[3], "accepted", None)], (4, chain(at, [str(uuid.uuid4()), ids[3]]).hex()))
    assert store.cursor() == 2 and store.known()[0] == 4
    # the right head, a chain that is not the one these events make: it stays
    other = chain(at, [str(uuid.uuid4())]).hex()
    store.mark_pushed([(ids[4], "accepted", None)], (3, other))
    assert store.cursor() == 2 and store.cursor_chain() == at


def test_a_pushed_run_is_marked_sent_only_when_it_is_still_the_queue(store):
    """A batch as queued() read it is marked sent in one statement over its seqs;
    when the queue changed under it (an event of the run no longer queued, another
    queued between), only the batch's own events are marked, one by one."""
    ids = _stamp(store, 6)
    rows = store.queued(3)
    store.mark_pushed([(r[1].event_id, "accepted", None) for r in rows], None,
                      [r[0] for r in rows])
    by_id = {e["event_id"]: e["status"] for e in events(store)}
    assert [by_id[i] for i in ids] == ["sent"] * 3 + ["queued"] * 3
    rows = store.queued(3, after=rows[-1][0])
    # meanwhile the middle one was sent by someone else, and an older one queued again
    store.db.execute("UPDATE events SET status = 'sent' WHERE event_id = ?", (ids[4],))
    store.db.execute("UPDATE events SET status = 'queued' WHERE event_id = ?", (ids[0],))
    store.mark_pushed([(r[1].event_id, "duplicate", None) for r in rows[::2]], None,
                      [r[0] for r in rows[::2]])
    by_id = {e["event_id"]: e["status"] for e in events(store)}
    assert [by_id[i] for i in ids] == ["queued"] + ["sent"] * 5
    # the run with another event queued inside it: marked one by one, that one kept
    more = _stamp(store, 3)[6:]
    rows = [r for r in store.queued(10) if r[1].event_id in more]
    assert [r[1].event_id for r in rows] == more
    store.db.execute("UPDATE events SET status = 'queued' WHERE event_id = ?", (ids[3],))
    store.mark_pushed([(rows[0][1].event_id, "accepted", None),
                       (rows[2][1].event_id, "accepted", None)], None, [rows[0][0], rows[2][0]])
    by_id = {e["event_id"]: e["status"] for e in events(store)}
    assert (by_id[more[0]], by_id[more[1]], by_id[more[2]]) == ("sent", "queued", "sent")


def test_mark_pushed_only_touches_queued_events(store):
    ids = _stamp(store, 2)
    store.append([ev("tok", "setting_changed", "setting", payload={"v": 1})])
    store.append([ev("api_token", "setting_changed", "setting")])
    store.stamp(NeverSync())
    private = [e["event_id"] for e in events(store, status="local_only")]
    store.mark_pushed([(ids[0], "accepted", None)])
    store.mark_pushed([(ids[0], "rejected", "late"), (private[0], "accepted", None),
                       (str(uuid.uuid4()), "accepted", None)])
    by_id = {e["event_id"]: e["status"] for e in events(store)}
    assert by_id[ids[0]] == "sent"
    assert by_id[private[0]] == "local_only"
    assert by_id[ids[1]] == "queued"


def test_set_aside_and_requeue(store):
    ids = _stamp(store, 3)
    store.set_aside(ids[1], "413 from proxy")
    assert [row[0] for _, row, *_ in store.queued(10)] == [ids[0], ids[2]]
    assert events(store, status="rejected")[0]["reason"] == "413 from proxy"
    assert store.requeue_rejected() == 1
    assert len(store.queued(10)) == 3
    assert "reason" not in events(store, aggregate_id="E1")[0]


# -- counts, log, bookkeeping --------------------------------------------------------------
def test_counts_cover_every_state(store):
    store.append([ev("A", timestamp="2026-03-01T00:00:00Z"),
                  ev("B", timestamp="2026-02-01T00:00:00Z"),
                  ev("db.password", "setting_changed", "setting")])
    store.stamp(NeverSync())
    store.append([ev("C")])
    store.receive([remote(1, 9)], cursor=1)
    c = store.counts()
    oldest = c.pop("oldest_queued")   # when it was stamped here, not the event's own time
    assert c == {"queued": 2, "sent": 0, "rejected": 0, "local_only": 1, "remote": 1,
                 "unstamped": 1, "unapplied": 4}
    stamped_at = store.db.execute("SELECT min(stamped_at) FROM events WHERE status = 'queued'"
                                  ).fetchone()[0]
    assert oldest == stamped_at and oldest.startswith("20") and oldest > "2026-03-01"


def test_counts_of_an_empty_store(store):
    assert store.counts() == {"queued": 0, "sent": 0, "rejected": 0, "local_only": 0,
                              "remote": 0, "unstamped": 0, "unapplied": 0,
                              "oldest_queued": None}


def test_log_filters(store):
    store.append([ev("A", "feature_created"), ev("B", "feature_created"),
                  ev("A", "feature_updated", payload={"x": [1, "two"]}),
                  ev("W1", "wp_created", "work_package")])
    store.stamp(NeverSync())
    store.receive([remote(1, 20, aid="A")], cursor=1)
    everything = events(store)
    assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
    assert set(everything[0]) >= set(FIELDS) | {"status", "seq"}
    assert len(events(store, aggregate_type="feature")) == 4
    assert len(events(store, aggregate_type="feature", aggregate_id="A")) == 3
    assert [e["event_type"] for e in events(store, event_type="wp_created")] == ["wp_created"]
    assert len(events(store, status="remote")) == 1
    assert events(store, event_type="feature_updated", status="queued")[0]["payload"] == {
        "x": [1, "two"]}
    assert [e["seq"] for e in events(store, after=everything[2]["seq"])] == [
        e["seq"] for e in everything[3:]]
    assert [e["seq"] for e in events(store, limit=2)] == [e["seq"] for e in everything[:2]]
    assert events(store, aggregate_type="nothing") == []


def test_record_outcome_tracks_failures_since_last_success(store):
    assert store.meta("last_success") is None
    store.record_outcome(False, "server unreachable")
    store.record_outcome(False)
    assert store.meta("failures_since") == "2"
    assert store.meta("last_error") == "unknown error"
    first_failure = store.meta("last_failure")
    assert check_timestamp(first_failure)
    store.record_outcome(True)
    assert store.meta("failures_since") == "0"
    assert check_timestamp(store.meta("last_success"))
    store.record_outcome(False, "401")
    assert store.meta("failures_since") == "1"
    assert store.meta("last_error") == "401"


def test_set_meta_and_defaults(store):
    assert store.meta("nothing", "dflt") == "dflt"
    store.set_meta(a=1, b="two")
    store.set_meta(a=3)
    assert (store.meta("a"), store.meta("b")) == ("3", "two")
