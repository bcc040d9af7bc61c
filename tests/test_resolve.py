"""sk.resolve: the merge rule (per-field LWW by (lamport, node), deletions as of their
stamp), path remapping of the state (never the log), incremental vs --rebuild, and the
property that any permutation and duplication of an event set folds to one state."""

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sk import resolve as resolve_mod
from sk.config import parse_path_map
from sk.event import Event, NeverSync, check_new
from sk.resolve import fold, load_state, remap, resolve, view
from sk.store import LocalStore


def E(lamport, node, payload=None, etype="feature_updated", atype="feature", aid="F"):
    return (etype, atype, aid, lamport, node, payload or {})


def state(events, include_deleted=False):
    return view(*fold(events), include_deleted=include_deleted)


def row(n, etype, atype, aid, lamport, node, payload):
    """A stored Event for LocalStore.receive."""
    return Event(str(uuid.UUID(int=n + 1)), etype, atype, aid, lamport, node,
                 json.dumps(payload), "2026-01-01T00:00:00Z")


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "sk.db")
    yield s
    s.close()


# -- the merge rule (pure) ---------------------------------------------------------------
def test_last_writer_wins_per_field_by_lamport():
    s = state([E(2, "a", {"title": "new", "x": 1}), E(1, "b", {"title": "old", "y": 2})])
    assert s == {"feature": {"F": {"title": "new", "x": 1, "y": 2}}}


def test_equal_lamport_is_decided_by_node_id():
    s = state([E(5, "node-b", {"t": "from b"}), E(5, "node-a", {"t": "from a"})])
    assert s["feature"]["F"]["t"] == "from b"
    s = state([E(5, "node-a", {"t": "from a"}), E(5, "node-b", {"t": "from b"})])
    assert s["feature"]["F"]["t"] == "from b"


def test_forged_tie_is_decided_by_value_the_same_way_in_any_order():
    a, b = E(3, "n", {"t": "aaa"}), E(3, "n", {"t": "bbb"})
    assert state([a, b]) == state([b, a]) == {"feature": {"F": {"t": "bbb"}}}


def test_wall_clock_is_not_used():
    # lamport 2 wins over lamport 1 whatever the (absent) timestamps say
    assert state([E(2, "a", {"v": 2}), E(1, "z", {"v": 1})])["feature"]["F"]["v"] == 2


def test_values_of_any_json_type():
    payload = {"n": None, "b": False, "l": [1, {"x": "y"}], "o": {"k": [True]}, "f": 1.5}
    assert state([E(1, "a", payload)])["feature"]["F"] == payload


def test_empty_payload_creates_an_empty_aggregate():
    assert state([E(1, "a", {})]) == {"feature": {"F": {}}}


def test_deletion_hides_the_aggregate():
    events = [E(1, "a", {"t": 1}, "feature_created"), E(2, "a", etype="feature_deleted")]
    assert state(events) == {}
    assert state(events, include_deleted=True) == {"feature": {"F": {"_deleted": True, "t": 1}}}


def test_later_event_brings_it_back_with_only_later_fields():
    events = [E(1, "a", {"t": 1, "keep": "no"}, "feature_created"),
              E(2, "b", etype="feature_deleted"),
              E(3, "a", {"t": 3})]
    assert state(events) == {"feature": {"F": {"t": 3}}}


def test_earlier_stamped_event_arriving_late_does_not_revive():
    events = [E(5, "a", etype="feature_deleted"), E(4, "b", {"t": "late"})]
    assert state(events) == {}
    assert state(list(reversed(events))) == {}


def test_deletion_stamped_before_the_last_write_does_not_hide():
    events = [E(3, "a", {"t": 3}), E(2, "b", etype="feature_deleted")]
    assert state(events) == {"feature": {"F": {"t": 3}}}


def test_deletion_tie_on_lamport_uses_node_id():
    assert state([E(4, "b", {"t": 1}), E(4, "a", etype="x_deleted")]) == {
        "feature": {"F": {"t": 1}}}
    assert state([E(4, "a", {"t": 1}), E(4, "b", etype="x_deleted")]) == {}


def test_deletion_only_touches_its_own_aggregate():
    events = [E(1, "a", {"t": 1}, aid="F1"), E(1, "a", {"t": 2}, aid="F2"),
              E(1, "a", {"t": 3}, atype="project", aid="F1"),
              E(2, "a", etype="feature_deleted", aid="F1")]
    assert state(events) == {"feature": {"F2": {"t": 2}}, "project": {"F1": {"t": 3}}}


def test_deletion_of_an_unknown_aggregate_then_creation():
    assert state([E(1, "a", etype="feature_deleted")]) == {}
    assert state([E(1, "a", etype="feature_deleted"), E(2, "a", {"v": 1})]) == {
        "feature": {"F": {"v": 1}}}


def test_fold_continues_from_given_dicts():
    aggs, fields = fold([E(1, "a", {"t": 1})])
    fold([E(2, "a", {"t": 2})], aggs, fields)
    assert view(aggs, fields) == {"feature": {"F": {"t": 2}}}


# -- remap (pure) --------------------------------------------------------------------------
PAIRS = parse_path_map(["/home/alice=/Users/al", "/home/alice/proj=/work/p", "/=/mnt/root/"])


@pytest.mark.parametrize("value,expected", [
    ("/home/alice", "/Users/al"),
    ("/home/alice/", "/Users/al/"),
    ("/home/alice/notes.md", "/Users/al/notes.md"),
    ("/home/alice/proj/src/x.py", "/work/p/src/x.py"),        # longest prefix first
    ("/home/alice2/x", "/mnt/root/home/alice2/x"),            # not a path prefix of alice
    ("/etc/hosts", "/mnt/root/etc/hosts"),
    ("relative/home/alice", "relative/home/alice"),
    ("", ""),
    (5, 5), (None, None), (True, True),
    (["/home/alice/a", 1, ["/home/alice"]], ["/Users/al/a", 1, ["/Users/al"]]),
    ({"p": "/home/alice/b", "/home/alice": "key untouched"},
     {"p": "/Users/al/b", "/home/alice": "key untouched"}),
])
def test_remap(value, expected):
    assert remap(value, PAIRS) == expected


def test_remap_applies_once_not_transitively():
    pairs = parse_path_map(["/a=/a/b"])
    assert remap("/a/x", pairs) == "/a/b/x"
    assert remap(remap("/a/x", pairs), []) == "/a/b/x"


def test_parse_path_map_orders_longest_first():
    assert [p[0] for p in PAIRS] == ["/home/alice/proj", "/home/alice", "/"]


# -- resolve on a store ---------------------------------------------------------------------
def test_resolve_matches_pure_fold_and_is_incremental(store):
    rows = [row(0, "feature_created", "feature", "F1", 1, "a", {"t": "one", "n": 1}),
            row(1, "feature_updated", "feature", "F1", 3, "b", {"t": "three"}),
            row(2, "feature_created", "feature", "F2", 2, "a", {"t": "two"})]
    store.receive(rows, cursor=3)
    assert resolve(store) == 3
    assert resolve(store) == 0
    assert load_state(store) == {"feature": {"F1": {"t": "three", "n": 1}, "F2": {"t": "two"}}}
    store.receive([row(3, "feature_deleted", "feature", "F2", 4, "a", {})], cursor=4)
    assert store.counts()["unapplied"] == 1
    assert resolve(store) == 1
    assert store.counts()["unapplied"] == 0
    assert load_state(store) == {"feature": {"F1": {"t": "three", "n": 1}}}
    assert load_state(store, include_deleted=True)["feature"]["F2"] == {
        "_deleted": True, "t": "two"}


def test_local_events_and_never_sync_settings_resolve_locally(store):
    store.append([check_new({"event_type": "setting_changed", "aggregate_type": "setting",
                             "aggregate_id": "smtp_password", "payload": {"value": "hunter2"}}),
                  check_new({"event_type": "feature_created", "aggregate_type": "feature",
                             "aggregate_id": "F1", "payload": {"t": 1}})])
    store.stamp(NeverSync())
    resolve(store)
    assert load_state(store) == {"setting": {"smtp_password": {"value": "hunter2"}},
                                 "feature": {"F1": {"t": 1}}}


def test_load_state_filters(store):
    store.receive([row(0, "x", "feature", "F1", 1, "a", {"v": 1}),
                   row(1, "x", "feature", "F2", 1, "a", {"v": 2}),
                   row(2, "x", "project", "P1", 1, "a", {"v": 3})], cursor=3)
    resolve(store)
    assert load_state(store, "project") == {"project": {"P1": {"v": 3}}}
    assert load_state(store, "feature", "F2") == {"feature": {"F2": {"v": 2}}}
    assert load_state(store, "feature", "nope") == {}
    assert load_state(store, "nothing") == {}


def test_rebuild_gives_the_same_state(store):
    rows = [row(i, "feature_deleted" if i % 5 == 4 else "feature_updated", "feature",
                f"F{i % 3}", 1 + (i * 7) % 11, "ab"[i % 2], {"k": i, f"f{i % 4}": str(i)})
            for i in range(30)]
    store.receive(rows[:10], cursor=1)
    resolve(store)
    store.receive(rows[10:], cursor=2)
    resolve(store)
    incremental = load_state(store, include_deleted=True)
    assert resolve(store, rebuild=True) == 30
    assert load_state(store, include_deleted=True) == incremental
    assert incremental == state([r[1:6] + (json.loads(r[6]),) for r in rows],
                                include_deleted=True)


def test_path_map_applies_to_state_never_the_log(store):
    store.receive([row(0, "x", "project", "P", 1, "a",
                       {"root": "/home/alice/proj", "files": ["/home/alice/a.md"], "n": 3})],
                  cursor=1)
    log_before = list(store.log())
    raw_before = store.db.execute("SELECT payload FROM events").fetchall()
    resolve(store, path_map=[("/home/alice", "/Users/al")])
    assert load_state(store) == {"project": {"P": {
        "root": "/Users/al/proj", "files": ["/Users/al/a.md"], "n": 3}}}
    assert list(store.log()) == log_before
    assert store.db.execute("SELECT payload FROM events").fetchall() == raw_before
    assert store.db.execute("SELECT value FROM fields WHERE field = 'root'").fetchone()[0] == \
        '"/home/alice/proj"'


def test_path_map_is_remembered_changed_and_cleared(store):
    store.receive([row(0, "x", "project", "P", 1, "a", {"root": "/home/alice/p"})], cursor=1)
    resolve(store, path_map=[("/home/alice", "/Users/al")])
    # a later event is mapped with the stored map when none is given
    store.receive([row(1, "x", "project", "Q", 2, "a", {"root": "/home/alice/q"})], cursor=2)
    resolve(store)
    assert load_state(store) == {"project": {"P": {"root": "/Users/al/p"},
                                             "Q": {"root": "/Users/al/q"}}}
    # a changed map re-maps what is already resolved
    resolve(store, path_map=[("/home/alice", "/data/alice")])
    assert load_state(store) == {"project": {"P": {"root": "/data/alice/p"},
                                             "Q": {"root": "/data/alice/q"}}}
    # --rebuild keeps the stored map
    resolve(store, rebuild=True)
    assert load_state(store)["project"]["P"]["root"] == "/data/alice/p"
    # an empty map restores the values as written in the log
    resolve(store, path_map=[])
    assert load_state(store) == {"project": {"P": {"root": "/home/alice/p"},
                                             "Q": {"root": "/home/alice/q"}}}


def test_chunked_resolve_equals_single_pass(store, monkeypatch):
    rows = [row(i, "feature_updated", "feature", f"F{i % 2}", 20 - i, "n", {"v": i, "w": -i})
            for i in range(20)]
    store.receive(rows, cursor=1)
    monkeypatch.setattr(resolve_mod, "CHUNK", 3)
    progress = []
    assert resolve(store, progress=progress.append) == 20
    assert progress == [3, 3, 3, 3, 3, 3, 2]
    assert load_state(store) == {"feature": {"F0": {"v": 0, "w": 0}, "F1": {"v": 1, "w": -1}}}


# -- the property: any order, any duplication, any chunking --------------------------------
AGGS = [("feature", "F1"), ("feature", "F2"), ("project", "P1")]
NODES = ["n1", "n2", "n3"]
VALUES = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "/home/alice/x",
                                                         "/home/alice", "/tmp/y"]),
                   st.none(), st.lists(st.sampled_from(["/home/alice/z", "q"]), max_size=2))
EVENT = st.tuples(
    st.sampled_from(["feature_updated", "feature_created", "feature_deleted"]),
    st.sampled_from(AGGS),
    st.integers(1, 6),
    st.sampled_from(NODES),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), VALUES, max_size=3),
)


@st.composite
def scenario(draw):
    specs = draw(st.lists(EVENT, min_size=1, max_size=20))
    rows = [row(i, etype, atype, aid, lamport, node, payload)
            for i, (etype, (atype, aid), lamport, node, payload) in enumerate(specs)]
    dups = draw(st.lists(st.sampled_from(rows), max_size=10))
    delivery = draw(st.permutations(rows + dups))
    cuts = sorted(draw(st.lists(st.integers(0, len(delivery)), max_size=5)))
    chunks, start = [], 0
    for c in cuts + [len(delivery)]:
        chunks.append(delivery[start:c])
        start = c
    chunk_size = draw(st.integers(1, 8))
    path_map = draw(st.sampled_from([None, [("/home/alice", "/Users/al")]]))
    return rows, chunks, chunk_size, path_map


def _expected(rows, pairs, include_deleted):
    s = view(*fold([r[1:6] + (json.loads(r[6]),) for r in rows]), include_deleted)
    return remap(s, pairs) if pairs else s


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_any_permutation_and_duplication_folds_to_one_state(sc):
    rows, chunks, chunk_size, path_map = sc
    old_chunk = resolve_mod.CHUNK
    resolve_mod.CHUNK = chunk_size
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shuffled = LocalStore(Path(tmp) / "shuffled.db")
            for cursor, chunk in enumerate(chunks, 1):
                shuffled.receive(chunk, cursor)
                resolve(shuffled, path_map=path_map)
            canonical = LocalStore(Path(tmp) / "canonical.db")
            canonical.receive(rows, 1)
            resolve(canonical, path_map=path_map)

            assert shuffled.counts()["remote"] == len(rows)
            for deleted in (False, True):
                want = _expected(rows, path_map, deleted)
                got = load_state(shuffled, include_deleted=deleted)
                assert got == want
                assert load_state(canonical, include_deleted=deleted) == want
            # the pure fold is itself order- and duplication-independent
            assert view(*fold([r[1:6] + (json.loads(r[6]),)
                               for c in reversed(chunks) for r in c])) == _expected(
                rows, None, False)
            resolve(shuffled, rebuild=True)
            for deleted in (False, True):
                assert load_state(shuffled, include_deleted=deleted) == _expected(
                    rows, path_map, deleted)
            shuffled.close()
            canonical.close()
    finally:
        resolve_mod.CHUNK = old_chunk


def test_a_page_folded_as_pulled_takes_the_path_map_in_force(tmp_path):
    """sk sync folds pulled pages as it stores them (Folder); a path map changed since
    the Folder was made (this run's early resolve stores it) applies to them too,
    as sk-pull then sk-resolve would apply it."""
    from sk.resolve import Folder

    b, a, c = (LocalStore(tmp_path / n / "sk.db") for n in "bac")
    b.append([check_new({"event_type": "doc_set", "aggregate_type": "doc", "aggregate_id": "r",
                         "payload": {"path": "/old/remote.txt"}})])
    b.stamp(NeverSync())
    rows = b.db.execute("SELECT event_id, event_type, aggregate_type, aggregate_id,"
                        " lamport_clock, node_id, payload, timestamp, extra FROM events").fetchall()
    events, extras = [Event(*r[:8]) for r in rows], [r[8] for r in rows]
    pairs = [["/old", "/new"]]
    folder = Folder(a)
    resolve(a, pairs)
    a.receive(events, 1, extras=extras, fold=lambda db: folder(
        db, events, [json.loads(e.payload) for e in events],
        [json.loads(x) if x else None for x in extras]))
    folder.commit()
    assert folder.folded == 1
    resolve(a, pairs)
    c.receive(events, 1, extras=extras)
    resolve(c, pairs)
    assert load_state(a) == load_state(c) == {"doc": {"r": {"path": "/new/remote.txt"}}}
