"""A server put back to an older copy of its database loses nothing: every device
notices at its next sync (its last known point is not on the server's log any
more), gives the server back the events it holds, and still receives everything
pushed after the restore, even when others pushed more than the rollback took
away (so the server's head is past every device's cursor again)."""

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import is_pg, query, run


def make(device_home, tag, n):
    lines = "".join(json.dumps({"event_type": "note_created", "aggregate_type": "note",
                                "aggregate_id": f"{tag}-{i}", "payload": {"n": i}}) + "\n"
                    for i in range(n))
    run("sk-append", home=device_home, input=lines)
    run("sk-stamp", home=device_home)


def log_ids(home):
    return sorted(json.loads(line)["event_id"] for line in
                  run("sk-log", home=home).stdout.splitlines())


def server_ids(server):
    rows = query(server.db, "SELECT event_id FROM events")
    assert len(rows) == len(set(rows)), "an event is stored twice"
    return sorted(r[0] for r in rows)


class Snapshot:
    """An older copy of the server's database, put back while the server is stopped,
    the way the README tells an admin: `sk-admin backup` and a file copy for
    SQLite, `pg_dump` and `pg_restore` for PostgreSQL."""

    def __init__(self, server, request, tmp_path):
        self.server, self.tmp = server, tmp_path
        if is_pg(server.db):
            self.bin = request.getfixturevalue("pg_cluster").bin_dir

    def take(self):
        if is_pg(self.server.db):
            subprocess.run([self.bin / "pg_dump", "-Fc", "-f", self.tmp / "old.dump",
                            self.server.db], check=True, timeout=60)
        else:
            run("sk-admin", "--db", self.server.db, "backup", "--to", self.tmp / "old.db")

    def put_back(self):
        self.server.stop()
        if is_pg(self.server.db):
            subprocess.run([self.bin / "pg_restore", "--clean", "--if-exists", "-d",
                            self.server.db, self.tmp / "old.dump"], check=True, timeout=60)
        else:
            for suffix in ("-wal", "-shm"):
                self.server.db.with_name(self.server.db.name + suffix).unlink(missing_ok=True)
            shutil.copyfile(self.tmp / "old.db", self.server.db)
        self.server.start()


@pytest.fixture
def snapshot(server, request, tmp_path):
    return Snapshot(server, request, tmp_path)


def test_restored_server_is_healed_by_the_devices(server, device, snapshot):
    a, b, c = device("a"), device("b"), device("c")
    make(a, "a0", 40)
    for home in (a, b, c):
        run("sk", "sync", home=home)
    snapshot.take()                             # the backup: 40 events
    make(a, "a1", 30)
    run("sk", "sync", home=a)
    run("sk", "sync", home=c)                   # c saw a's 30 as well
    make(b, "b1", 10)                           # b only pushes (a cron of plumbing)
    run("sk-push-batch", "--all", home=b)
    lost = server_ids(server)
    assert len(lost) == 80

    snapshot.put_back()                         # back to 40: 40 events lost
    assert len(server_ids(server)) == 40
    d = device("d")                             # a new device pushes more than was lost
    make(d, "d0", 100)
    run("sk", "sync", home=d)
    assert len(server_ids(server)) == 140

    p = run("sk", "sync", home=a)               # a notices, and gives back what it holds
    heal = [line for line in p.stderr.splitlines() if "healed it" in line]
    assert len(heal) == 1, p.stderr
    assert "restored from an older copy" in heal[0] and "30 of them new to it" in heal[0]
    p = run("sk", "sync", home=b)               # b's 10 were never pulled by anyone
    assert "healed it" in p.stderr and "10 of them new to it" in p.stderr
    p = run("sk", "sync", home=c)               # c held a's 30: nothing new to give
    assert "healed it" in p.stderr and "0 of them new to it" in p.stderr
    for home in (a, b, c, d):
        run("sk", "sync", home=home)
    everything = server_ids(server)
    assert len(everything) == 180 and set(lost) <= set(everything)
    for home in (a, b, c, d):
        assert log_ids(home) == everything, home
    states = {run("sk-state", home=home).stdout for home in (a, b, c, d)}
    assert len(states) == 1
    # healed: the next syncs say nothing about it
    for home in (a, b, c, d):
        assert "healed" not in run("sk", "sync", home=home).stderr


def test_plumbing_pull_notices_and_push_gives_back(server, device, snapshot):
    a, b = device("a"), device("b")
    make(a, "a0", 5)
    run("sk", "sync", home=a)
    snapshot.take()
    make(a, "a1", 7)
    run("sk", "sync", home=a)
    run("sk", "sync", home=b)
    snapshot.put_back()
    make(b, "b0", 20)
    run("sk", "sync", home=b)                     # b noticed and healed: 7 back
    assert len(server_ids(server)) == 32
    p = run("sk-pull", home=a, code=0)            # a's point is on the healed log again
    assert "restored" not in p.stderr
    snapshot_ids = server_ids(server)
    assert log_ids(a) == snapshot_ids


def test_plumbing_pull_on_a_restored_server_exits_1_until_pushed(server, device, snapshot):
    a = device("a")
    make(a, "a0", 5)
    run("sk", "sync", home=a)
    snapshot.take()
    make(a, "a1", 7)
    run("sk", "sync", home=a)
    snapshot.put_back()
    p = run("sk-pull", home=a, code=1)
    assert "restored from an older copy" in p.stderr and "sk-push-batch --all" in p.stderr
    assert len(server_ids(server)) == 5
    run("sk-push-batch", "--all", home=a)
    assert len(server_ids(server)) == 12
    run("sk-pull", home=a, code=0)
    assert log_ids(a) == server_ids(server)


def test_a_watcher_heals_a_restored_server_by_itself(server, device, snapshot, tmp_path):
    from conftest import Watcher, wait_until
    a, b = device("a"), device("b")
    make(a, "a0", 5)
    run("sk", "sync", home=a)
    snapshot.take()
    w = Watcher(a, tmp_path)
    try:
        w.wait_connected()
        make(a, "a1", 6)                           # pushed over the WebSocket
        wait_until(lambda: len(server_ids(server)) == 11, 20, "the watcher's push")
        snapshot.put_back()                        # the watcher drops, and comes back
        wait_until(lambda: "restored from an older copy" in w.text(), 60,
                   f"the watcher to notice:\n{w.text()}")
        wait_until(lambda: len(server_ids(server)) == 11, 30,
                   f"the watcher to give back the 6 lost events:\n{w.text()}")
        run("sk", "sync", home=b)
        assert log_ids(b) == server_ids(server)
        make(a, "a2", 2)                           # and it goes on as before
        wait_until(lambda: len(server_ids(server)) == 13, 20, "a push after healing")
    finally:
        w.kill()


def rollback(db, team, seq):
    """What putting the database back to an older copy does to a team's log, done
    under a running server: events after `seq` gone, the head back at `seq`."""
    sql = ["DELETE FROM events WHERE team = ? AND seq > ?",
           "UPDATE teams SET head = ?, chain = (SELECT chain FROM events WHERE team = ?"
           " AND seq = ?) WHERE team = ?"]
    args = [(team, seq), (seq, team, seq, team)]
    if is_pg(db):
        import psycopg
        with psycopg.connect(db, autocommit=True) as c, c.transaction():
            for q, a in zip(sql, args):
                c.execute(q.replace("?", "%s"), a)
    else:
        import sqlite3
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as c, c:
            for q, a in zip(sql, args):
                c.execute(q, a)


def test_a_live_watcher_notices_a_log_put_back_under_it(server, device, tmp_path):
    """The session stays connected while the log is put back and others push past
    the device's cursor: the session's own last point gives it away."""
    from conftest import Watcher, wait_until
    a, b = device("a"), device("b")
    make(b, "b0", 5)
    run("sk", "sync", home=b)
    w = Watcher(a, tmp_path)
    try:
        w.wait_connected()
        wait_until(lambda: len(log_ids(a)) == 5, 20, "the catch-up")
        make(a, "a1", 5)
        wait_until(lambda: len(server_ids(server)) == 10, 20, "the watcher's push")
        rollback(server.db, "default", 5)         # a's five are gone from the server
        make(b, "b1", 8)                          # and others push past a's cursor
        run("sk", "sync", home=b)
        wait_until(lambda: "restored from an older copy" in w.text(), 30,
                   f"the watcher to notice:\n{w.text()}")
        wait_until(lambda: len(server_ids(server)) == 18, 30,
                   f"the watcher to give back a's five:\n{w.text()}")
        wait_until(lambda: log_ids(a) == server_ids(server), 30, "a to hold everything")
    finally:
        w.kill()


@pytest.mark.parametrize("how", ["setup", "environment"])
def test_a_device_moved_to_another_team_does_not_carry_its_old_log_over(server, device, how):
    """Its key now names another team's log: the device reads that log from the
    start, and never 'heals' it with the old team's events."""
    a = device("a", "red")
    make(a, "red", 4)
    run("sk", "sync", home=a)
    blue = server.register("a-blue", "blue")
    env = None
    if how == "setup":
        run("sk", "sync", "setup", "--server", server.url, "--key", blue, "--yes", home=a)
    else:
        env = {**os.environ, "SK_API_KEY": blue}
    p = run("sk", "sync", home=a, env=env)
    assert "healed" not in p.stderr
    assert dict(query(server.db, "SELECT team, count(*) FROM events GROUP BY team")) == {"red": 4}
    make(a, "blue", 2)                            # what it stamps now goes to blue
    run("sk", "sync", home=a, env=env)
    assert dict(query(server.db, "SELECT team, count(*) FROM events GROUP BY team")) == \
        {"red": 4, "blue": 2}


def test_diverging_again_after_healing_is_one_clear_error(tmp_path):
    """Two servers on different databases behind one URL: the second attempt
    diverges too. That is an integrity failure (exit 5), not a traceback."""
    from sk.config import Config
    from sk.errors import IntegrityError
    from sk.store import open_store
    from sk.protocol import ServerRestored, healing
    store = open_store(Config(tmp_path / "home"))

    def attempt(first):
        raise ServerRestored("event 3 of the server's log is not the one this device saw", "t")
    with pytest.raises(IntegrityError, match="again after starting over") as e:
        healing(store, attempt)
    assert e.value.exit_code == 5
