"""`sk sync watch` end to end: real `sk server` processes and real watchers
(subprocesses), events stamped by sk-append/sk-stamp or by INSERTs into the
documented `unstamped` table. Every wait is bounded; every watcher is killed in
the fixture's teardown."""

import json
import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ServerProcess, query, run, state, status, wait_until


# -- helpers -------------------------------------------------------------------------
def ev(agg_id, payload, etype="feature_created", event_id=None):
    out = {"event_type": etype, "aggregate_type": "feature", "aggregate_id": agg_id,
           "payload": payload}
    if event_id:
        out["event_id"] = event_id
    return out


def stamp_cli(home, events):
    """sk-append (NDJSON on stdin) + sk-stamp; returns the event ids given."""
    for e in events:
        e.setdefault("event_id", str(uuid.uuid4()))
    run("sk-append", home=home, input="".join(json.dumps(e) + "\n" for e in events))
    run("sk-stamp", home=home)
    return [e["event_id"] for e in events]


def stamp_sql(home, n, tag):
    """Another program's way: INSERT rows into `unstamped`, then run sk-stamp."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    c = sqlite3.connect(os.path.join(home, "sk.db"), timeout=60)
    try:
        with c:
            c.executemany("INSERT INTO unstamped(event_id, event_type, aggregate_type,"
                          " aggregate_id, payload) VALUES (?, 'wp_status_changed', 'work_package', ?, ?)",
                          [(eid, f"{tag}-{i % 7}", json.dumps({"status": f"{tag}-{i}", "i": i}))
                           for i, eid in enumerate(ids)])
    finally:
        c.close()
    run("sk-stamp", home=home)
    return ids


def local(home, sql="SELECT event_id, status, applied FROM events"):
    path = os.path.join(home, "sk.db")
    if not os.path.exists(path):
        return []
    return query(path, sql)


def local_ids(home):
    rows = local(home, "SELECT event_id FROM events")
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), f"{home}: an event is stored twice"
    return set(ids)


def server_ids(server, team):
    rows = query(server.db, "SELECT seq, event_id FROM events WHERE team = ? ORDER BY seq",
                 (team,))
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)), f"team {team}: an event is stored twice on the server"
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "team sequence has gaps"
    return set(ids)


def make_device(server, tmp_path, name, team):
    home = tmp_path / f"dev-{name}"
    key = server.register(name, team)
    run("sk", "sync", "setup", "--server", server.url, "--key", key, home=home)
    return home


# -- two devices, one other team -------------------------------------------------------
def test_event_stamped_on_one_watcher_reaches_the_other_not_another_team(device, server, watch):
    a, b, c = device("a", "red"), device("b", "red"), device("c", "blue")
    wa, wb, wc = watch(a), watch(b), watch(c)
    for w in (wa, wb, wc):
        w.wait_connected()

    # a: sk-append + sk-stamp; b: another program INSERTs into `unstamped` + sk-stamp
    [ea] = stamp_cli(a, [ev("F-1", {"title": "Login", "owner": "a"})])
    eb = stamp_sql(b, 3, "b")
    [ec] = stamp_cli(c, [ev("F-1", {"title": "blue secret"})])
    both = {ea, *eb}
    wait_until(lambda: local_ids(b) >= both and local_ids(a) >= both, 20,
               "a's and b's events to reach both watchers")
    # and it is resolved on arrival, without running sk-resolve
    wait_until(lambda: state(b, "feature:F-1") == {"title": "Login", "owner": "a"}, 10,
               "b's resolved state to show a's event")
    wait_until(lambda: state(a).get("work_package", {}).get("b-0") == {"status": "b-0", "i": 0},
               10, "a's resolved state to show b's events")
    assert dict((eid, st) for eid, st, _ in local(b))[ea] == "remote"
    # each pushed event left the queue on the device that stamped it
    wait_until(lambda: status(a)["queued"] == 0 and status(b)["queued"] == 0, 10, "queues to drain")
    assert server_ids(server, "red") == both
    assert server_ids(server, "blue") == {ec}

    # the other team's watcher (connected and working: its own event went up) got nothing
    time.sleep(1.5)  # more than the server's 1 s look at the store
    assert local_ids(c) == {ec}
    c_log = [json.loads(line) for line in run("sk-log", home=c).stdout.splitlines()]
    assert [(e["event_id"], e["payload"]) for e in c_log] == [(ec, {"title": "blue secret"})]
    assert state(b, "feature:F-1") == {"title": "Login", "owner": "a"}
    assert ec not in local_ids(a) | local_ids(b)
    for w in (wa, wb, wc):
        assert w.proc.poll() is None, w.text()


# -- status, signals, nothing half-applied ---------------------------------------------
@pytest.mark.one_backend
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_status_shows_watch_and_signal_stops_it_cleanly(device, watch, sig):
    a, b = device("a"), device("b")
    wa, wb = watch(a), watch(b)
    wa.wait_connected()
    wb.wait_connected()
    st = status(a)
    assert st["watch"] and st["watch"]["state"] == "connected" and st["watch"]["pid"] == wa.pid
    text = run("sk", "sync", "status", home=a).stdout
    assert re.search(rf"^watch:\s+running \(pid {wa.pid}\), connected", text, re.M), text

    # b stamps events in a stream; a is stopped while they are arriving
    ids, stop_stamping = [], threading.Event()

    def stamper():
        for r in range(40):
            if stop_stamping.is_set():
                return
            ids.extend(stamp_sql(b, 25, f"r{r}"))
    t = threading.Thread(target=stamper)
    t.start()
    try:
        wait_until(lambda: len(local_ids(a)) >= 50, 30, "a to receive some of b's events")
        rc, took = wa.signal_stop(sig, 10)
    finally:
        stop_stamping.set()
        t.join(60)
    assert rc == 0, wa.text()
    assert took < 5, f"watcher took {took:.1f} s to stop"
    assert re.search(r"watch: stopped\s*$", wa.text()), wa.text()

    st = status(a)
    assert st["watch"] is None, st["watch"]
    assert re.search(r"^watch:\s+not running", run("sk", "sync", "status", home=a).stdout, re.M)
    # nothing half-applied: every received event was folded in, a final resolve is a no-op
    got = local(a)
    assert got and all(applied == 1 for _, _, applied in got), \
        [r for r in got if r[2] != 1][:5]
    assert json.loads(run("sk-resolve", "--json", home=a).stdout)["applied"] == 0
    before = state(a)
    run("sk-resolve", "--rebuild", home=a)
    assert state(a) == before

    # restarted, it catches up with exactly what it missed
    wa2 = watch(a)
    wa2.wait_connected()
    wait_until(lambda: local_ids(a) == set(ids), 30, "the restarted watcher to catch up")
    assert local_ids(b) == set(ids) == local_ids(a)
    rc, took = wb.signal_stop(sig, 10)
    assert rc == 0 and took < 5, wb.text()


# -- the server dies while events are being stamped ------------------------------------
@pytest.mark.parametrize("how", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.one_backend)],
                         ids=["SIGKILL", "SIGTERM"])
def test_watchers_reconnect_and_drain_after_server_restart(device, server, watch, how):
    a, b = device("a"), device("b")
    wa, wb = watch(a), watch(b)
    wa.wait_connected()
    wb.wait_connected()

    ids, errors = [], []
    killed = threading.Event()

    def stamper():
        try:
            for r in range(16):
                ids.extend(stamp_sql(a, 20, f"k{r}"))
                if r == 4:
                    killed.wait(20)  # keep stamping only once the server is down
                time.sleep(0.1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=stamper)
    t.start()
    try:
        wait_until(lambda: len(ids) >= 100, 30, "the first rounds to be stamped")
        server.stop(how)                 # kills the server's whole process group
        killed.set()
        wait_until(lambda: "offline" in wa.text() and "offline" in wb.text(), 20,
                   "both watchers to notice the server is gone")
        time.sleep(1.0)                  # stamping goes on while the server is down
        queued_while_down = status(a)["queued"]
        server.start()                   # same port, same database
    finally:
        killed.set()
        t.join(60)
    assert not errors, errors
    assert len(ids) == 320
    assert queued_while_down > 0, "nothing was queued while the server was down"

    # the first retry comes after ~1 s (backoff starts at 1 s, with jitter)
    for w in (wa, wb):
        first = re.search(r"offline: .*retrying in ([0-9.]+) s", w.text())
        assert first and 0.4 <= float(first.group(1)) <= 1.6, w.text()
    # nobody touches the watchers: they reconnect and drain by themselves
    wa.wait_connected(2, timeout=25)
    wb.wait_connected(2, timeout=25)
    wait_until(lambda: len(local_ids(b)) >= len(ids), 40, "b to receive every event")
    wait_until(lambda: status(a)["queued"] == 0, 10, "a's queue to drain")
    assert server_ids(server, "default") == set(ids)        # exactly once, no gaps
    assert local_ids(b) == set(ids)
    assert {eid for eid, st, _ in local(a)} == set(ids)
    assert {st for _, st, _ in local(a)} == {"sent"}
    assert {st for _, st, _ in local(b)} == {"remote"}
    for w in (wa, wb):
        assert w.proc.poll() is None, w.text()
    assert status(a)["watch"]["state"] == "connected"


@pytest.mark.one_backend
def test_offline_watcher_keeps_the_queue_and_stops_promptly(device, server, watch):
    a = device("a")
    server.stop()
    wa = watch(a)
    wait_until(lambda: "offline" in wa.text(), 20, "the watcher to report offline")
    ids = stamp_cli(a, [ev("F-2", {"n": i}) for i in range(3)])
    time.sleep(0.5)
    st = status(a)
    assert st["queued"] == 3 and st["watch"]["state"] in ("offline", "connecting"), st
    assert st["failures_since"] >= 1
    rc, took = wa.signal_stop(signal.SIGTERM, 10)     # while it waits to retry
    assert rc == 0 and took < 5, wa.text()
    assert status(a)["queued"] == 3
    # the queue drains when a watcher next finds the server
    server.start()
    wa2 = watch(a)
    wa2.wait_connected()
    wait_until(lambda: status(a)["queued"] == 0, 15, "the queue to drain")
    assert server_ids(server, "default") == set(ids)


# -- many watchers, many events ---------------------------------------------------------
def test_twelve_watchers_two_thousand_events_none_lost_or_duplicated(tmp_path, watch):
    big = ServerProcess(tmp_path / "big.db", extra=["--threads", "64"]).start()
    try:
        with ThreadPoolExecutor(4) as pool:
            homes = list(pool.map(lambda i: make_device(big, tmp_path, f"w{i:02d}", "crowd"),
                                  range(12)))
        watchers = [watch(h) for h in homes]
        for w in watchers:
            w.wait_connected(timeout=60)

        stampers, per, rounds = homes[:4], 500, 5
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(lambda h=h, k=k: [eid for r in range(rounds)
                                                  for eid in stamp_sql(h, per // rounds, f"s{k}r{r}")])
                    for k, h in enumerate(stampers)]
            ids = [eid for f in futs for eid in f.result(timeout=120)]
        assert len(ids) == len(set(ids)) == 2000

        wait_until(lambda: len(server_ids(big, "crowd")) >= 2000, 60, "the server to hold all 2000")
        deadline = time.monotonic() + 90
        for h in homes:
            wait_until(lambda: len(local_ids(h)) >= 2000, max(1, deadline - time.monotonic()),
                       f"{h.name} to hold all 2000 ({len(local_ids(h))} so far)", interval=0.5)
        expected = set(ids)
        assert server_ids(big, "crowd") == expected
        for h in homes:
            assert local_ids(h) == expected, h.name
        for w in watchers:
            assert w.proc.poll() is None, w.text()
        for h in homes[4:]:
            assert all(st == "remote" for _, st, _ in local(h))
    finally:
        big.stop()


# -- revocation ---------------------------------------------------------------------------
@pytest.mark.one_backend
def test_revoked_watchers_are_stopped_by_the_server_exit_4(device, server, watch):
    a, b, c = device("a"), device("b"), device("c")
    wa, wb, wc = watch(a), watch(b), watch(c)
    for w in (wa, wb, wc):
        w.wait_connected()
    revoked_at = time.monotonic()
    run("sk-register", "--revoke", "a", "--db", server.db)
    run("sk-register", "--revoke", "b", "--db", server.db)

    # b pushes after being revoked: refused at once, and its event is not stored
    [eb] = stamp_cli(b, [ev("F-9", {"from": "revoked b"})])
    assert wb.wait_exit(10) == 4, wb.text()
    # a stays idle: the server's periodic key check stops it within ~25 s
    assert wa.wait_exit(max(1, revoked_at + 26 - time.monotonic())) == 4, wa.text()
    assert time.monotonic() - revoked_at < 26
    for w in (wa, wb):
        assert re.search(r"revoked|refused", w.text()), w.text()
    assert eb not in server_ids(server, "default")
    assert status(b)["queued"] == 1 and status(b)["watch"] is None
    # the device that was not revoked keeps running and still syncs
    assert wc.proc.poll() is None, wc.text()
    [ec] = stamp_cli(c, [ev("F-10", {"from": "c"})])
    wait_until(lambda: ec in server_ids(server, "default"), 10, "c's event on the server")


@pytest.mark.one_backend
def test_revoked_watcher_exits_4_at_its_next_reconnect(device, server, watch):
    a = device("a")
    wa = watch(a)
    wa.wait_connected()
    run("sk-register", "--revoke", "a", "--db", server.db)
    server.stop(signal.SIGTERM)      # force a reconnect
    server.start()
    assert wa.wait_exit(20) == 4, wa.text()
    assert status(a)["watch"] is None
    # and a new watcher with the revoked key is refused at once
    rc = watch(a).wait_exit(15)
    assert rc == 4


# -- the watcher's own events in its resolved state ------------------------------------------
@pytest.mark.one_backend
def test_watcher_folds_its_own_stamped_events_into_the_state(device, server, watch):
    """A device that only runs `sk sync watch` (no `sk sync now`) sees its own stamped
    events in sk-state once they are synced, as after `sk sync now`, whether or not
    some other device's event happens to arrive afterwards."""
    a = device("a")
    wa = watch(a)
    wa.wait_connected()
    [ea] = stamp_cli(a, [ev("F-1", {"title": "mine"})])
    wait_until(lambda: ea in server_ids(server, "default") and status(a)["queued"] == 0, 10,
               "a's event to be pushed")
    time.sleep(1.5)
    assert status(a)["unapplied"] == 0, "the watcher pushed its own event but never resolved it"
    assert state(a).get("feature", {}).get("F-1") == {"title": "mine"}
