"""A server's "duplicate" answers are claims a device checks against the log
(sk.store claims, sk.sync.confirm_claims): a server that lies with them, fakes
pages while it is checked, or a team switch, must not drop an event, store one
unchecked, or cost a read of the whole log for nothing; a member's odd extra stops
no one. (Written by a reviewer as probes of the first version, which failed them.)"""
import pytest

from conftest import append, ev, is_pg, run, server_rows, state, sync, wait_until
from test_hardening import _Answers, _in_process


class _Pages:
    """A client whose pull(after, ...) answers come from fake(after, real_pull, args) when
    it returns non-None."""

    def __init__(self, real, fake):
        self.real, self.fake = real, fake

    def pull(self, after, *args):
        got = self.fake(after, self.real, args)
        return self.real.pull(after, *args) if got is None else got

    def __getattr__(self, name):
        return getattr(self.real, name)


def _liar(client, team):
    return _Answers(client, lambda body, _: {"statuses": "d" * len(body["events"]), "team": team})


def _chain(ids):
    from sk.sealed import GENESIS, chain_next
    c = GENESIS
    for i in ids:
        c = chain_next(c, i)
    return c


def _lied_to(device, keys, with_b=True):
    """Device a (and b) synced with x:x; then a's events x:<key> for each of `keys`,
    stamped and pushed to a server that answers "duplicate" for all of them and stores
    none: (a, b or None, store, client, ring) of a, in process."""
    from sk import sync as sk_sync
    a, b = device("a"), device("b") if with_b else None
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    if b is not None:
        sync(b)
    append(a, [ev("x_set", f"x:{k}", {"v": i + 2}) for i, k in enumerate(keys)])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    sk_sync.push(store, _liar(client, ring.team), ring)
    return a, b, store, client, ring


def _status(home):
    import json
    return json.loads(run("sk", "sync", "status", "--json", home=home, code=None).stdout)


def _ids_on_server(server):
    """The event ids and aggregate ids of what the server holds."""
    return {x for r in server_rows(server) for x in r[1:]}


@pytest.mark.one_backend
def test_a_claim_made_while_the_log_is_read_is_kept(server, device):
    from sk import sync as sk_sync
    from sk.errors import IntegrityError
    from sk.store import LocalStore
    a = device("a")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    append(a, [ev("x_set", "x:z", {"v": 2}), ev("x_set", "x:w", {"v": 3})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    sk_sync.push(store, _liar(client, ring.team), ring)
    z, w = [e["event_id"] for e in store.log(status="sent")][1:]
    store.db.execute("DELETE FROM claims WHERE event_id = ?", (w,))   # w's claim is made by
    # "the watcher" during the read of the log
    other = LocalStore(store.path)

    def during(after, real, args):
        if after == 0:
            with other.write() as db:
                db.execute("INSERT INTO claims VALUES (?)", (w,))
        return None
    with pytest.raises(IntegrityError, match="for 1 events"):
        sk_sync.pull(store, _Pages(client, during), ring)
    assert w not in _ids_on_server(server)
    assert store.claims() == [w], "the watcher's claim was wiped: w is lost silently"


@pytest.mark.one_backend
def test_a_watcher_settles_a_claim_its_live_stream_never_bore_out(server, device, watch,
                                                                 monkeypatch):
    """A device that only runs `sk sync watch` checks a claim still unsettled an
    interval later against the log, says so, and pushes the event again: a lying
    "duplicate" loses nothing there either."""
    a, b, store, client, ring = _lied_to(device, "z")
    (z,) = store.claims()
    assert z not in _ids_on_server(server)
    store.close()
    client.close()
    assert _status(a)["unconfirmed"] == 1
    assert "unconfirmed:    1 (the server answered 'duplicate'" in run("sk", "sync", "status",
                                                                      home=a).stdout
    monkeypatch.setenv("SK_WATCH_SHARE_INTERVAL", "0.5")
    w = watch(a)
    w.wait_connected()
    wait_until(lambda: z in _ids_on_server(server), 30, f"the watcher to push {z} again\n{w.text()}")
    assert "answered 'duplicate' for 1 events its log does not hold" in w.text()
    assert "answered 'duplicate'" in _status(a)["last_error"]   # and status exits 1 for it
    wait_until(lambda: _status(a)["unconfirmed"] == 0, 10, "the claim settled")
    sync(b)
    assert set(state(b, "x")) == {"x", "z"}
    assert w.proc.poll() is None, w.text()


@pytest.mark.one_backend
def test_a_page_made_up_while_the_log_is_read_settles_nothing(server, device):
    from sk import sync as sk_sync
    a = device("a")
    append(a, [ev("x_set", "x:x", {"v": 1}), ev("x_set", "x:y", {"v": 1})])
    sync(a)
    append(a, [ev("x_set", "x:z", {"v": 2})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    sk_sync.push(store, _liar(client, ring.team), ring)       # claim z: triggers a walk
    store.close()
    append(a, [ev("x_set", "x:victim", {"v": 3})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    x = [e["event_id"] for e in store.log(status="queued")][0]   # the server saw it in a push

    def fake(after, real, args):
        if after == 0:    # the walk: a made-up first page, then the connection "drops"
            return {"team": ring.team, "rows": [[1, None, x]], "batches": [], "attachments": [],
                    "next": 1, "more": True, "chain": _chain([x]).hex()}
        if after == 1 and store.cursor() > 1:
            raise OSError("connection reset")
        return None
    with pytest.raises(OSError):
        sk_sync.pull(store, _Pages(client, fake), ring)
    assert list(store.db.execute("SELECT event_id FROM seen_queued")) == []
    counts = sk_sync.push(store, _liar(client, ring.team), ring)   # 'd' for x, never stored
    assert counts["duplicate"] == 1 and x in store.claims()
    store.close()
    client.close()
    sync(a, code=5)        # z and x are found missing and queued again
    sync(a)
    assert {x, "victim"} <= _ids_on_server(server) and "victim" in state(a, "x")


@pytest.mark.one_backend
def test_reading_the_log_stores_nothing_a_server_withheld(server, device):
    from sk import sync as sk_sync
    from sk.errors import IntegrityError
    a, b = device("a"), device("b")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    append(b, [ev("x_set", "x:e", {"v": 9})])     # b's first push: writer point (0, "")
    sync(b)
    append(a, [ev("x_set", "x:z", {"v": 2})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    sk_sync.push(store, _liar(client, ring.team), ring)
    c1 = store.cursor_chain()
    assert store.cursor() == 1

    def fake(after, real, args):
        if after == 1:      # withhold b's event (seq 2) at the head
            return {"team": ring.team, "rows": [], "batches": [], "attachments": [],
                    "next": 1, "more": False, "chain": c1.hex()}
        if after == 0:      # the walk: b's authentic batch replayed at seq 1
            page = real.pull(1, 10, *args[1:])
            row = page["rows"][0]
            eid = [r for r in page["batches"][row[1]]["manifest"].split("\n")[2:] if r][row[2]]
            eid = eid.split("\t")[0]
            return {**page, "rows": [[1, row[1], row[2]]], "next": 1, "more": False,
                    "chain": _chain([eid]).hex()}
        return None
    with pytest.raises(IntegrityError):
        sk_sync.pull(store, _Pages(client, fake), ring)
    store.close()
    client.close()
    sync(a, code=5)     # z is found missing (rightly) and queued again
    sync(a)
    assert "e" in state(b, "x")
    assert "e" in state(a, "x"), "b's event is in a's log, marked applied, never folded"


@pytest.mark.one_backend
def test_a_claim_left_at_a_team_switch_moves_nothing_to_the_new_team(server, device):
    from sk import sync as sk_sync
    a = device("a", "red")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    append(a, [ev("x_set", "x:secret", {"v": 2})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    real = []

    def lose(body, attachments):   # a push whose answer is lost, pushed again: "d", rightly
        real.append(client.call("push", body, attachments))
        raise OSError("lost")
    with pytest.raises(OSError):
        sk_sync.push(store, _Answers(client, lose), ring)
    sk_sync.push(store, client, ring)        # "d", no pull between: a claim, legitimately
    assert len(store.claims()) == 1
    store.close()
    client.close()
    blue = server.register("a-blue", "blue")
    run("sk", "sync", "setup", "--server", server.url, "--key", blue, "--yes", home=a)
    sync(a)
    sync(a)
    from conftest import query
    teams = dict(query(server.db, "SELECT team, count(*) FROM events GROUP BY team"))
    assert teams == {"red": 2}, teams


@pytest.mark.one_backend
def test_a_heal_found_by_the_pull_reads_the_log_once(server, device, monkeypatch):
    from sk import sync as sk_sync
    a, b = device("a"), device("b")
    append(b, [ev("x_set", f"x:b{i}", {"v": i}) for i in range(3)])
    sync(b)
    append(a, [ev("x_set", "x:a", {"v": 1})])
    sync(a)
    store, client, ring = _in_process(a)
    walks = []
    real = sk_sync._ids_on_log
    monkeypatch.setattr(sk_sync, "_ids_on_log", lambda *x: walks.append(1) or real(*x))
    assert store.heal() == 4                 # as healing() does when the pull diverges
    sk_sync.pull(store, client, ring)        # from 0: shows all four
    counts = sk_sync.push(store, client, ring)   # run(): push back what it lost
    assert counts["duplicate"] == 4
    sk_sync.pull(store, client, ring)
    assert walks == [], f"{len(walks)} extra full read(s) of the log after a heal"


@pytest.mark.one_backend
def test_two_pushers_on_one_device_cost_no_read_of_the_log(server, device, monkeypatch):
    from sk import sync as sk_sync
    from sk.protocol import batches, known_out, push_body, settle_push
    a = device("a")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    append(a, [ev("x_set", "x:y", {"v": 2})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    batch = next(batches(store.queued(10)))          # the watcher cut its batch ...
    body = push_body(batch, ring, known_out(store))
    sk_sync.push(store, client, ring)                # ... a sync pushed the same: "a"
    assert store.cursor() == 2                       # the answer moved the cursor over it
    settle_push(store, batch, client.call("push", *body), {"duplicate": 0})   # the watcher: "d"
    assert store.claims() == []    # it was sent already: no claim
    walks = []
    real = sk_sync._ids_on_log
    monkeypatch.setattr(sk_sync, "_ids_on_log", lambda *x: walks.append(1) or real(*x))
    sk_sync.pull(store, client, ring)
    assert walks == [], "a full read of the log for a duplicate of an event already sent"


@pytest.mark.one_backend
@pytest.mark.parametrize("extra", ['{"actor":1e999}', '{"actor":"\\ud800"}',
                                   '{"seen":[1e999,"n"]}', '{"actor": "\\ud800"}'])
def test_a_members_odd_extra_stops_no_one(server, device, extra):
    from sk.config import Config
    from sk.event import check_stamped
    from sk.keyring import Keyring
    from sk.protocol import known_out, push_body
    from sk.store import open_store
    from sk.sync import open_client
    a, b = device("a"), device("b")
    sync(a)
    cfg = Config(a)
    store, client = open_store(cfg), open_client(cfg)
    ring = Keyring(store, cfg.api_key)
    ring.ensure(client)
    e = check_stamped({"event_id": "01890000-0000-7000-8000-000000000001", "node_id": "n1",
                       "lamport_clock": 5, "event_type": "x_set", "aggregate_type": "x",
                       "aggregate_id": "odd", "payload": {"v": 1},
                       "timestamp": "2026-01-01T00:00:00Z"}, new=False)
    body, att = push_body([(0, e, False, extra)], ring, known_out(store))
    assert client.call("push", body, att)["statuses"] == "a"
    client.close()
    store.close()
    sync(b)    # the batch authenticates: skipped (with a warning under -v), exit 0
    assert "odd" not in state(b, "x")


@pytest.mark.one_backend
def test_an_event_stamped_after_the_pushs_last_look_is_the_next_runs(server, device):
    """`sk sync` exits 1 when events it read stay queued (held); one stamped after its
    last look at the queue (a loop of sk-stamp beside it) is the next run's, not a
    reason to fail this one."""
    from sk import sync as sk_sync
    a = device("a")
    append(a, [ev("x_set", "x:1", {"v": 1})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    real, empty = store.queued, []

    def queued(limit, after=0):
        rows = real(limit, after)
        if not rows:
            empty.append(after)
            if len(empty) == 2:   # its last look: now one more is stamped
                append(a, [ev("x_set", "x:2", {"v": 2})])
                run("sk-stamp", home=a)
        return rows
    store.queued = queued
    counts = sk_sync.push(store, client, ring, all_batches=True)
    assert len(empty) == 2 and counts["accepted"] == 1 and counts["queued"] == 0, counts
    assert store.counts(totals=False)["queued"] == 1
    store.close()
    client.close()
    sync(a)
    assert _status(a)["queued"] == 0


@pytest.mark.one_backend
def test_a_watcher_behind_the_head_leaves_a_claim_for_later(server, device):
    """The watcher settles an old claim only once it has read the log up to the
    server's head: behind it (a burst the live stream has not shown yet), the
    claimed event may be there, and nothing is called a lie or queued again."""
    from sk.config import Config
    from sk.watch import Watch
    a, _, store, client, ring = _lied_to(device, "z", with_b=False)
    (z,) = store.claims()

    class Ahead:   # the server's head one past this device's cursor
        def __init__(self, real, ahead):
            self.real, self.ahead = real, ahead

        def hello(self):
            return {**self.real.hello(), "head": store.cursor() + self.ahead}

        def __getattr__(self, name):
            return getattr(self.real, name)
    w = Watch(Config(a), store=store)
    w.ring, w.client = ring, Ahead(client, 1)
    assert w._claims({z}) == {z} and store.claims() == [z]
    assert store.counts(totals=False)["queued"] == 0          # nothing queued again
    w.client = Ahead(client, 0)
    assert w._claims(set()) == {z} and store.claims() == [z]   # a fresh claim waits too
    assert w._claims({z}) == set() and store.claims() == []    # caught up and old: settled
    assert store.counts(totals=False)["queued"] == 1
    store.close()
    client.close()


@pytest.mark.one_backend
def test_a_stored_id_altered_at_rest_is_not_taken_for_a_copied_home(server, device):
    """A stored event's id turned into bytes at rest: the same event pushed again is
    not "another home stamping with this node id" (exit 2, which tells the user to
    take a new node id) but the server saying it cannot read what it stored."""
    if is_pg(server.db):
        pytest.skip("a PostgreSQL column keeps its type")
    import sqlite3

    from sk.errors import IntegrityError
    from sk.event import check_stamped
    from sk.protocol import known_out, push_body
    a = device("a")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    store, client, ring = _in_process(a)
    e = next(iter(store.log(status="sent")))
    event = check_stamped({k: e[k] for k in ("event_id", "node_id", "lamport_clock",
                                             "event_type", "aggregate_type", "aggregate_id",
                                             "payload", "timestamp")}, new=False)
    with sqlite3.connect(server.db) as c:
        c.execute("UPDATE events SET event_id = CAST(event_id AS BLOB)")
    with pytest.raises(IntegrityError, match="cannot be read as it was written"):
        client.call("push", *push_body([(0, event, False, None)], ring, known_out(store)))
    store.close()
    client.close()


@pytest.mark.one_backend
def test_a_server_cannot_drop_claimed_events_by_moving_the_device_out_and_back(server, device):
    """A server that answers "duplicate" for events it never stored, then says the
    device's key belongs to another team (and later back): the device refuses to move
    (a key never changes team; exit 5), keeps its claims, and the next honest sync
    finds and pushes the events. Only `sk sync setup` with another key moves a device."""
    from sk import sync as sk_sync
    from sk.errors import IntegrityError
    a, b, store, client, ring = _lied_to(device, ("z", "w"))
    claimed = sorted(store.claims())
    assert len(claimed) == 2
    team = store.meta("team")
    append(a, [ev("x_set", "x:v", {"v": 4})])
    run("sk-stamp", home=a)
    with pytest.raises(IntegrityError, match="a key never changes team"):
        sk_sync.push(store, _Answers(client, lambda body, _: {"statuses": "", "team": "other"}),
                     ring)
    assert store.meta("team") == team and sorted(store.claims()) == claimed
    store.close()
    client.close()
    p = sync(a, code=5)   # the honest server: its log lacks them; they are queued again
    assert "answered 'duplicate' for 2 events its log does not hold" in p.stderr, p.stderr
    sync(a)
    sync(b)
    assert set(state(b, "x")) == {"x", "z", "w", "v"}


@pytest.mark.one_backend
def test_a_writer_point_off_the_log_is_refused_at_the_push(server, device):
    """A member that seals a batch saying it had seen seq 10^9 (or a chain the log
    does not have at its seq) is refused by the server (a sealed 400, exit 5 there):
    stored, that batch would stop every reader of the team for good."""
    from sk.errors import IntegrityError
    from sk.event import check_stamped
    from sk.protocol import push_body
    a, b = device("a"), device("b")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    store, client, ring = _in_process(a)
    for n, (seq, chain) in enumerate(((10 ** 9, "ab" * 32), (1, "cd" * 32))):
        e = check_stamped({"event_id": f"01890000-0000-7000-8000-00000000000{n}",
                           "node_id": store.node_id(), "lamport_clock": 50 + n,
                           "event_type": "x_set", "aggregate_type": "x", "aggregate_id": "bad",
                           "payload": {"v": 1}, "timestamp": "2026-01-01T00:00:00Z"}, new=False)
        body, att = push_body([(0, e, False, None)], ring, {"seq": seq, "chain": chain})
        del body["known"]   # (a known point off the log is a restore: healed, not refused)
        with pytest.raises(IntegrityError, match="writer point .* is not a point of this"):
            client.call("push", body, att)
    store.close()
    client.close()
    sync(b)
    assert set(state(b, "x")) == {"x"}


@pytest.mark.one_backend
def test_a_server_cannot_drop_accepted_events_by_moving_the_device_out_and_back(server, device):
    """No claim needed: a server that says the device's key moved to a team of its
    making, "accepts" a push there, then says it is back would leave those events out of
    every heal. A registered key never changes team, so the device refuses the move."""
    from sk import sync as sk_sync
    from sk.errors import IntegrityError
    a, b = device("a"), device("b")
    append(a, [ev("x_set", "x:x", {"v": 1})])
    sync(a)
    append(a, [ev("x_set", "x:z", {"v": 2})])
    run("sk-stamp", home=a)
    store, client, ring = _in_process(a)
    with pytest.raises(IntegrityError, match="a key never changes team"):
        sk_sync.push(store, _Answers(client, lambda body, _: {"statuses": "", "team": "phantom"}),
                     ring)
    assert store.meta("team") == "default" and store.counts(totals=False)["queued"] == 1
    store.close()
    client.close()
    sync(a)
    sync(b)
    assert set(state(b, "x")) == {"x", "z"}
