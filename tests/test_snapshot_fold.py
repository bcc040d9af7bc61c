"""A snapshot plus the events after it folds to the state the whole log folds to,
for any cut point and any arrival order, deletes included (issue 13), at the
library level: sk.snapshot.build on one device, sk.snapshot.load on a fresh one,
the tail delivered in any order; a rebuild of the shallow device agrees too."""

import random
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sk import history, snapshot
from sk.event import Event, dumps, loads
from sk.resolve import load_state, resolve
from sk.store import LocalStore

NODES = [str(uuid.UUID(int=n + 1)) for n in range(3)]
CHAIN = bytes(range(32))

write = st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 2), st.booleans(),
                  st.dictionaries(st.sampled_from("abc"), st.one_of(st.integers(0, 9), st.text(
                      max_size=3)), max_size=3))


def events_of(writes, rnd):
    """Event rows with distinct stamps in any order of the log (a write after the
    cut may carry an older clock: an offline device), some of them deletions."""
    out = []
    clocks = list(range(1, len(writes) + 1))
    rnd.shuffle(clocks)
    for i, (aid, node, delete, payload) in enumerate(writes):
        out.append(Event(str(uuid.UUID(int=(1 << 100) + i)), "task_deleted" if delete else
                         "task_updated", "task", aid, clocks[i], NODES[node],
                         "{}" if delete else dumps(payload),
                         f"2026-12-01T09:{i // 60:02d}:{i % 60:02d}.000Z"))
    return out


def deliver(store, rows, rnd, upto=None):
    rows = list(rows)
    rnd.shuffle(rows)
    step = rnd.randint(1, 6)
    for i in range(0, len(rows), step):
        part = rows[i:i + step]
        last = i + step >= len(rows)
        if last and upto is not None:
            store.receive(part, upto, point=(upto, CHAIN.hex()), chain=CHAIN)
        else:
            store.receive(part, 0)
        resolve(store)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(write, min_size=1, max_size=24), data=st.data(), seed=st.integers(0, 2 ** 32))
def test_snapshot_plus_tail_is_the_whole_log(writes, data, seed):
    rnd = random.Random(seed)
    rows = events_of(writes, rnd)
    cut = data.draw(st.integers(1, len(rows)), label="cut")
    with tempfile.TemporaryDirectory() as root:
        full, src, shallow = (LocalStore(Path(root) / n / "sk.db") for n in ("full", "src",
                                                                             "shallow"))
        try:
            deliver(full, rows, rnd)
            deliver(src, rows[:cut], rnd, upto=cut)
            seq, chain, text = snapshot.build(src)
            assert seq == cut and chain == CHAIN.hex()
            snapshot.load(shallow, loads(text), seq, chain)
            deliver(shallow, rows[cut:], rnd)
            want = load_state(full, include_deleted=True)
            assert load_state(shallow, include_deleted=True) == want
            assert load_state(shallow) == load_state(full)
            for aid in {r.aggregate_id for r in rows}:
                assert {k: (w.get("value"), w["lamport_clock"], w["node_id"])
                        for k, w in history.blame(shallow, "task", aid).items()} \
                    == {k: (w.get("value"), w["lamport_clock"], w["node_id"])
                        for k, w in history.blame(full, "task", aid).items()}
            resolve(shallow, rebuild=True)
            assert load_state(shallow, include_deleted=True) == want
            # the tail may come again (a watcher and a sync overlap): nothing changes
            deliver(shallow, rows[cut:], rnd)
            assert load_state(shallow, include_deleted=True) == want
        finally:
            for s in (full, src, shallow):
                s.close()
