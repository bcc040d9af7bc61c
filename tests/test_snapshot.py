"""Snapshots and shallow devices (issue 13), driven through the installed commands
against a real server: the server asks, a device seals one, a fresh device
begins at it; tampered and misplaced snapshots are refused."""

import json

import pytest

from conftest import (ServerProcess, alter, append, ev, log, run, server_rows, share_key, sk,
                      state, status, sync)

pytestmark = pytest.mark.slow


@pytest.fixture
def snap_server(server_db):
    srv = ServerProcess(server_db, extra=["--snapshot-every", "40"]).start()
    yield srv
    srv.stop()


def make_device(tmp_path, srv, name, team="default"):
    home = tmp_path / f"dev-{name}"
    key = srv.register(name, team)
    sk("sk", "sync", "setup", "--server", srv.url, "--key", key, home=home, check=0)
    share_key(srv, team)
    srv.homes.append(home)
    srv.teams[home] = team
    return home


def history(n_aggs, n_events, seed=0):
    """Writes and deletes over n_aggs aggregates, with a secret marker in every value."""
    import random
    rnd = random.Random(seed)
    out = []
    for i in range(n_events):
        agg = f"task:t{rnd.randrange(n_aggs)}"
        if rnd.random() < 0.1:
            out.append(ev("task_deleted", agg))
        else:
            out.append(ev("task_updated", agg, {rnd.choice("abc"): f"secret-{i}"}))
    return out


def snapshots(srv):
    return server_rows(srv, "SELECT seq, epoch, device, sealed FROM snapshots ORDER BY seq")


def test_asked_built_sealed_and_a_fresh_device_begins_at_it(tmp_path, snap_server):
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(12, 90))
    first = json.loads(sync(a, "--json").stdout)
    assert first["snapshot_offered"] == 90
    rows = snapshots(snap_server)
    assert [(r[0], r[2]) for r in rows] == [(90, "alice")]
    assert b"secret-" not in bytes(rows[0][3]) and b"task_updated" not in bytes(rows[0][3])
    append(a, history(12, 15, seed=1))
    sync(a)

    ci = make_device(tmp_path, snap_server, "ci")
    out = sync(ci, "--shallow", "--json")
    summary = json.loads(out.stdout)
    assert summary["began_at"]["seq"] == 90 and summary["began_at"]["device"] == "alice"
    assert "unshallow" not in summary
    assert state(ci) == state(a)
    assert len(log(ci)) == 15                       # only the tail is held
    st = status(ci)
    assert st["shallow"] == {"seq": 90, "device": "alice"}
    err = run("sk-log", home=ci).stderr
    assert "shallow history: it begins after seq 90" in err
    text = run("sk", "sync", "status", home=ci).stdout
    assert "shallow: begins after seq 90" in text
    # history answers as far as it reaches, and says so
    early = run("sk-state", "--at", "1", home=ci, code=1)
    assert "shallow" in early.stderr and "unshallow" in early.stderr
    assert json.loads(run("sk-state", "--at", "999999", home=ci).stdout) == state(ci)
    assert "shallow history" in run("sk", "conflicts", home=ci).stderr
    held = {e["event_id"] for e in log(ci)}
    marks = set()
    for t in range(12):
        got = run("sk", "blame", f"task:t{t}", "--json", home=ci, code=None)
        for key, w in (json.loads(got.stdout) if got.returncode == 0 else {}).items():
            if key != "_deleted":
                assert bool(w.get("from_snapshot")) == (w["event_id"] not in held), (t, key)
                marks.add(bool(w.get("from_snapshot")))
    assert marks == {True, False}     # some values come from the snapshot, some after it

    # it appends and syncs like any other device
    append(ci, [ev("task_updated", "task:t1", {"a": "from-ci"})])
    sync(ci)
    sync(a)
    assert state(ci) == state(a)

    # --unshallow fetches the rest, checked, and the state does not change
    before = state(ci)
    got = json.loads(run("sk-pull", "--unshallow", "--json", home=ci).stdout)
    assert got["received"] == 90 and got["before_seq"] == 90
    assert state(ci) == before
    assert status(ci)["shallow"] is None
    assert sorted(e["event_id"] for e in log(ci)) == sorted(e["event_id"] for e in log(a))
    # and a rebuild from the whole history lands on the same state
    run("sk-resolve", "--rebuild", home=ci)
    assert state(ci) == before


@pytest.mark.one_backend
def test_a_shallow_rebuild_folds_its_events_onto_the_snapshot(tmp_path, snap_server):
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(8, 60))
    sync(a)
    append(a, history(8, 20, seed=2))
    sync(a)
    ci = make_device(tmp_path, snap_server, "ci")
    env = {"SK_SHALLOW": "1"}
    sync(ci, env=env)
    assert status(ci)["shallow"]["seq"] == 60
    run("sk-resolve", "--rebuild", home=ci)
    assert state(ci) == state(a)


@pytest.mark.one_backend
def test_a_fresh_full_sync_begins_at_the_snapshot_and_ends_with_the_whole_log(
        tmp_path, snap_server):
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(10, 70))
    sync(a)
    append(a, history(10, 9, seed=3))
    sync(a)
    b = make_device(tmp_path, snap_server, "bob")
    summary = json.loads(sync(b, "--json").stdout)
    assert summary["began_at"]["seq"] == 70 and summary["unshallow"] == 70
    assert state(b) == state(a)
    assert len(log(b)) == 79 and status(b)["shallow"] is None
    run("sk-resolve", "--rebuild", home=b)
    assert state(b) == state(a)


@pytest.mark.one_backend
def test_own_events_before_the_first_sync_are_kept_on_a_shallow_start(tmp_path, snap_server):
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(5, 50))
    sync(a)
    ci = make_device(tmp_path, snap_server, "ci")
    append(ci, [ev("task_updated", "task:ci", {"a": "ci-first"}),
                ev("task_updated", "task:t0", {"a": "ci-concurrent"})])
    sync(ci, "--shallow")
    assert state(ci, "task:ci")["a"] == "ci-first"
    sync(a)
    assert state(a) == state(ci)


@pytest.mark.one_backend
@pytest.mark.parametrize("attack", ["flip", "move", "swap_team_point"])
def test_a_tampered_or_misplaced_snapshot_is_refused(tmp_path, snap_server, attack):
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(6, 50))
    sync(a)
    append(a, history(6, 10, seed=4))
    sync(a)
    db = snap_server.db
    (seq, _, _, blob), = [r for r in snapshots(snap_server)]
    if attack == "flip":
        blob = bytearray(bytes(blob))
        blob[len(blob) // 2] ^= 1
        alter(db, "UPDATE snapshots SET sealed = ?", (bytes(blob),))
    elif attack == "move":   # the same sealed blob, said to be at another point of the log
        chain = server_rows(snap_server, f"SELECT chain FROM events WHERE seq = {seq + 5}")[0][0]
        alter(db, "UPDATE snapshots SET seq = ?, chain = ?", (seq + 5, chain))
    else:                    # a point that is on no log
        alter(db, "UPDATE snapshots SET chain = ?", (bytes(32),))
    ci = make_device(tmp_path, snap_server, "ci")
    out = sync(ci, "--shallow", code=5)
    assert "snapshot" in out.stderr
    # nothing of it was applied: the device is still fresh, and syncs in full
    assert state(ci) == {}
    assert status(ci)["shallow"] is None and status(ci)["cursor"] == 0
    alter(db, "DELETE FROM snapshots")
    sync(ci)
    assert state(ci) == state(a)


@pytest.mark.one_backend
def test_a_shallow_device_heals_with_a_restored_server_as_a_full_one_does(
        tmp_path, snap_server, request):
    from test_restore import Snapshot as Backup
    backup = Backup(snap_server, request, tmp_path)
    a = make_device(tmp_path, snap_server, "alice")
    append(a, history(8, 30))
    sync(a)
    ci = make_device(tmp_path, snap_server, "ci")   # known to the backup, not synced yet
    late = make_device(tmp_path, snap_server, "late")
    backup.take()                                   # seq 30, no snapshot yet
    append(a, history(8, 60, seed=4))
    sync(a)
    assert [r[0] for r in snapshots(snap_server)] == [90]
    sync(ci, "--shallow")
    assert status(ci)["shallow"]["seq"] == 90
    append(ci, [ev("task_updated", "task:t1", {"b": "ci-after-snapshot"})])
    sync(ci)
    backup.put_back()                               # the server forgets seq 31.. and the snapshot
    assert snapshots(snap_server) == []
    healed_a = sync(a)
    assert "restored" in healed_a.stderr.lower() or "older copy" in healed_a.stderr.lower()
    healed_ci = sync(ci)
    assert healed_ci.returncode == 0
    sync(a)
    assert state(ci) == state(a)
    assert state(ci, "task:t1")["b"] == "ci-after-snapshot"
    # and whatever is written next reaches both
    append(a, [ev("task_updated", "task:t2", {"c": "after the restore"})])
    sync(a)
    sync(ci)
    assert state(ci) == state(a)
    # a device joining now begins at a snapshot of the healed log, or streams it
    sync(late, "--shallow")
    assert state(late) == state(a)
    run("sk-resolve", "--rebuild", home=ci)
    assert state(ci) == state(a)
