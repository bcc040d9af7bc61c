"""Conflicts, blame and time travel (issue 14) at the library level: three devices
write concurrently and sequentially, exchange events in any order, and must list
the same conflicts and the same blame; a sequential edit is never a conflict."""

import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sk import history
from sk.event import Event, NeverSync, check_new
from sk.resolve import Folder, load_state, resolve
from sk.store import LocalStore


def write(store, aid, payload, delete=False, actor=None, fold=True):
    """Append and stamp one write; fold it now, or (fold False) leave it for the
    next delivery's resolve, as an sk-append before sk sync does."""
    etype = "task_deleted" if delete else "task_updated"
    store.append([check_new({"event_type": etype, "aggregate_type": "task", "aggregate_id": aid,
                             "payload": {} if delete else payload})], actor=actor)
    store.stamp(NeverSync())
    if fold:
        resolve(store)


def held(store):
    """{event_id: (Event, extra)} of every event in the store's log."""
    return {r[0]: (Event(*r[:8]), r[8]) for r in store.db.execute(
        "SELECT event_id, event_type, aggregate_type, aggregate_id, lamport_clock, node_id,"
        " payload, timestamp, extra FROM events")}


def deliver(dst, items, rnd=None, chunk=None):
    """Give dst these (Event, extra), in this order, resolving between chunks as
    sk-pull then sk-resolve do; or (half the time, given rnd) as sk sync does:
    each chunk folded as it is stored (sk.resolve.Folder, one for the whole pull),
    now and then with an event dst holds already in it (that chunk is left to
    sk-resolve), then resolved once at the end."""
    items = list(items)
    step = chunk or max(1, len(items))
    folder = Folder(dst) if rnd is not None and rnd.random() < 0.5 else None
    for i in range(0, len(items), step):
        part = items[i:i + step]
        if folder is None:
            dst.receive([e for e, _ in part], 0, extras=[x for _, x in part])
            resolve(dst)
            continue
        have = list(held(dst).values())
        if have and rnd.random() < 0.2:
            part = part + [rnd.choice(have)]
        events = [e for e, _ in part]
        dst.receive(events, 0, extras=[x for _, x in part], fold=lambda db: folder(
            db, events, [json.loads(e.payload) for e in events],
            [json.loads(x) if x else None for _, x in part]))
    if folder is not None:
        resolve(dst)


def exchange(src, dst, rnd):
    have = held(dst)
    new = [v for k, v in held(src).items() if k not in have]
    rnd.shuffle(new)
    deliver(dst, new, rnd, chunk=rnd.randint(1, 4))


def open_conflicts(store):
    return sorted((c["aggregate_id"], c["field"], c["winner"]["event_id"],
                   tuple(sorted(w["event_id"] for w in c["lost"])))
                  for c in history.conflicts(store))


def all_conflicts(store):
    return sorted((c["aggregate_id"], c["field"], c["winner"]["event_id"],
                   tuple(sorted(w["event_id"] for w in c["lost"])),
                   tuple(sorted(w["event_id"] for w in c["closed"])))
                  for c in history.conflicts(store, include_closed=True))


def exact(store):
    """Every aggregate looked at directly (no flags): what the flags must find."""
    out = []
    for (aid,) in store.db.execute("SELECT DISTINCT aggregate_id FROM events"):
        for c in history.aggregate_conflicts(store, "task", aid):
            out.append((aid, c["field"], c["winner"]["event_id"],
                        tuple(sorted(w["event_id"] for w in c["lost"])),
                        tuple(sorted(w["event_id"] for w in c["closed"]))))
    return sorted(out)


def blames(store):
    aids = sorted({r[0] for r in store.db.execute("SELECT aggregate_id FROM events")})
    return {aid: history.blame(store, "task", aid) for aid in aids}


class Devices:
    def __init__(self, root, n=3):
        self.stores = [LocalStore(Path(root) / f"d{i}" / "sk.db") for i in range(n)]

    def close(self):
        for s in self.stores:
            s.close()


step = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.sampled_from(["t1", "t2"]),
              st.dictionaries(st.sampled_from("ab"), st.integers(0, 9), min_size=1, max_size=2),
              st.integers(0, 9)),
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=16), seed=st.integers(0, 2 ** 32))
def test_three_devices_any_order_list_the_same_conflicts_and_blame(steps, seed):
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as root:
        devs = Devices(root)
        try:
            for s in steps:
                if s[0] == "write":
                    _, d, aid, payload, roll = s
                    write(devs.stores[d], aid, payload, delete=roll == 0, fold=roll % 3 != 1)
                elif s[1] != s[2]:
                    exchange(devs.stores[s[1]], devs.stores[s[2]], rnd)
            everything = {}
            for store in devs.stores:
                everything.update(held(store))
            for store in devs.stores:          # the rest, in any order, in any chunks
                have = held(store)
                missing = [v for k, v in everything.items() if k not in have]
                rnd.shuffle(missing)
                deliver(store, missing, rnd, chunk=rnd.randint(1, 5))
                resolve(store)                 # (its own writes, if nothing came)
            first = devs.stores[0]
            event(f"open conflicts: {min(len(open_conflicts(first)), 3)}")
            for store in devs.stores:
                assert all_conflicts(store) == exact(store)   # the flags missed nothing
                assert history.open_count(store) == sum(len(c[3]) for c in exact(store))
                assert open_conflicts(store) == open_conflicts(first)
                assert all_conflicts(store) == all_conflicts(first)
                assert blames(store) == blames(first)
                assert load_state(store) == load_state(first)
            # blame names the event behind each visible value
            for aid, keys in blames(first).items():
                for key, w in keys.items():
                    obj = load_state(first, "task", aid, True).get("task", {}).get(aid, {})
                    if not obj.get("_deleted"):
                        assert obj[key] == w["value"]
        finally:
            devs.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["t1", "t2"]),
                                 st.dictionaries(st.sampled_from("abc"), st.integers(0, 9),
                                                 min_size=1, max_size=3)),
                       min_size=1, max_size=12),
       seed=st.integers(0, 2 ** 32))
def test_a_sequential_edit_is_never_a_conflict(writes, seed):
    """Each writer holds every earlier write when it writes; the others then get
    the events in any order: nobody lists a conflict."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as root:
        devs = Devices(root)
        try:
            for d, aid, payload in writes:
                me = devs.stores[d]
                for other in devs.stores:
                    if other is not me:
                        exchange(other, me, rnd)
                write(me, aid, payload)
            for a in devs.stores:
                for b in devs.stores:
                    if a is not b:
                        exchange(a, b, rnd)
            for store in devs.stores:
                assert history.conflicts(store, include_closed=True) == []
                assert exact(store) == []
        finally:
            devs.close()


@pytest.fixture
def pair(tmp_path):
    devs = Devices(tmp_path, 2)
    yield devs.stores
    devs.close()


def test_a_concurrent_edit_is_one_open_conflict_until_someone_who_saw_it_writes(pair):
    a, b = pair
    write(a, "t1", {"title": "base"}, actor="alice")
    exchange(a, b, random.Random(0))
    write(a, "t1", {"title": "from a"}, actor="alice")
    write(b, "t1", {"title": "from b"}, actor="bob (agent-model-7)")
    rnd = random.Random(1)
    exchange(a, b, rnd)
    exchange(b, a, rnd)
    for store in (a, b):
        found = history.conflicts(store)
        assert len(found) == 1 and history.open_count(store) == 1
        c = found[0]
        assert (c["aggregate_id"], c["field"]) == ("t1", "title")
        values = {c["winner"]["value"], c["lost"][0]["value"]}
        assert values == {"from a", "from b"}
        assert load_state(store, "task", "t1")["task"]["t1"]["title"] == c["winner"]["value"]
        loser = c["lost"][0]
        assert loser["actor"] == ("alice" if loser["value"] == "from a" else "bob (agent-model-7)")
        assert history.conflicts(store, "task", "t1") == found     # one aggregate, directly
        assert history.conflicts(store, "task", "t2") == []
    # b has seen the conflict; its next write of the key closes it everywhere
    write(b, "t1", {"title": "merged"})
    exchange(b, a, rnd)
    for store in (a, b):
        assert history.conflicts(store) == []
        closed = history.conflicts(store, include_closed=True)
        assert len(closed) == 1 and len(closed[0]["closed"]) == 1
        assert closed[0]["winner"]["value"] == "merged"
    # another key of the same aggregate written concurrently is not a conflict of title
    write(a, "t1", {"owner": "a"})
    write(b, "t1", {"due": "b"})
    exchange(a, b, rnd)
    exchange(b, a, rnd)
    assert history.conflicts(a) == history.conflicts(b) == []


def test_blame_names_the_writer_and_state_at_goes_back(pair):
    a, _ = pair
    write(a, "t1", {"title": "one", "n": 1}, actor="alice")
    write(a, "t1", {"title": "two"}, actor="ci-bot (model-x)")
    b = history.blame(a, "task", "t1")
    assert b["title"]["value"] == "two" and b["title"]["actor"] == "ci-bot (model-x)"
    assert b["n"]["value"] == 1 and b["n"]["actor"] == "alice"
    assert b["title"]["lamport_clock"] == 2 and b["title"]["event_type"] == "task_updated"
    assert history.state_at(a, ("lamport", 1), "task", "t1") == {"task": {"t1": {"title": "one",
                                                                              "n": 1}}}
    assert history.state_at(a, ("lamport", 0)) == {}
    t1 = a.db.execute("SELECT timestamp FROM events ORDER BY lamport_clock").fetchone()[0]
    assert history.state_at(a, history.parse_when(t1))["task"]["t1"]["title"] == "one"
    write(a, "t1", {}, delete=True)
    assert history.state_at(a, ("lamport", 3)) == {}
    assert history.state_at(a, ("lamport", 3), include_deleted=True) == {
        "task": {"t1": {"_deleted": True, "title": "two", "n": 1}}}   # as sk-state --deleted
    assert history.state_at(a, ("lamport", 2)) == {"task": {"t1": {"title": "two", "n": 1}}}


@pytest.mark.parametrize("text, key", [
    ("2026-12-01T09:30:00Z", "2026-12-01T09:30:00.000000000"),
    ("2026-12-01T10:30:00.5+01:00", "2026-12-01T09:30:00.500000000"),
    ("2026-12-01T00:10:00-00:30", "2026-12-01T00:40:00.000000000"),
    ("2026-12-01 09:30:00.123456789Z", "2026-12-01T09:30:00.123456789"),
])
def test_at_times_are_read_with_their_offsets(text, key):
    assert history.parse_when(text) == ("time", key)
    assert history.time_key(key[:19] + "Z") <= key


@pytest.mark.parametrize("bad", ["yesterday", "2026-12-01", "2026-12-01T09:30:00",
                                 "2026-13-01T00:00:00Z", "-5", "1.5"])
def test_at_refuses_what_is_neither_a_clock_nor_a_time(bad):
    with pytest.raises(ValueError):
        history.parse_when(bad)


def test_time_key_orders_as_the_times_do():
    stamps = ["2026-12-01T09:30:00Z", "2026-12-01T09:30:00.1Z", "2026-12-01T09:30:00.123Z",
              "2026-12-01T09:30:00.9+00:00", "2026-12-01T09:30:01Z"]
    assert sorted(stamps, key=history.time_key) == stamps
