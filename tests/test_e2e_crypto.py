"""End-to-end encryption against real servers: what the server (its files, its
secret, its traffic) can and cannot see, how the team key reaches a device, what
revocation and rotation do, approval, a server that alters, moves or replays
what it stores, and the upgrade from sk 0.3.0 (protocol 1)."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import (ROOT, ServerProcess, TcpProxy, append, ev, is_pg, log, query, run, state, status,
                      sync, wait_until)
from sk import crypto

SECRETS = ["TOPSECRET-TITLE-9f3", "aggregate-Zx81", "secret_thing_made"]


def secret_events():
    return [ev("secret_thing_made", "widget:aggregate-Zx81", {"title": "TOPSECRET-TITLE-9f3"}),
            ev("secret_thing_made", "widget:other-Zx82", {"note": "TOPSECRET-TITLE-9f3 again"})]


def server_bytes(server):
    """Every byte the server keeps: its database (files, or every row) and secret."""
    if is_pg(server.db):
        tables = [r[0] for r in query(server.db, "SELECT tablename FROM pg_tables WHERE"
                                                 " schemaname = current_schema()")]
        data = b"".join(bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode()
                        for t in tables for r in query(server.db, f"SELECT * FROM {t}") for v in r)
        secret = server.extra_env.get("SK_SERVER_SECRET_FILE")
        return data + (open(secret, "rb").read() if secret else b"")
    base = server.db.parent
    return b"".join(p.read_bytes() for p in base.iterdir()
                    if p.name.startswith(server.db.stem) and p.is_file())


class RecordingProxy(TcpProxy):
    """A TCP proxy that keeps every byte both ways."""

    def __init__(self, upstream):
        self.seen, self.lock = bytearray(), threading.Lock()
        super().__init__(upstream)

    def passing(self, data, upward, conn):
        with self.lock:
            self.seen += data
        return data


def point_at(home, url):
    env = home / ".env"
    text = env.read_text()
    start = text.index("SK_SERVER=")
    end = text.index("\n", start)
    env.write_text(text[:start] + f"SK_SERVER='{url}'" + text[end:])


# -- what the server can see --------------------------------------------------------------
def test_the_server_keeps_nothing_readable_nor_does_its_traffic_carry_any(server, device,
                                                                           watch):
    a, b = device("a"), device("b")
    px = RecordingProxy(server.port)
    try:
        for home in (a, b):
            point_at(home, px.url)
        append(a, secret_events())
        sync(a)
        sync(b)
        w = watch(b)
        wait_until(lambda: w.connects() >= 1, 30, "the watcher")
        append(a, [ev("secret_thing_made", "widget:aggregate-Zx81", {"title": "TOPSECRET-TITLE-9f3 live"})])
        sync(a)
        wait_until(lambda: len(log(b)) == 3, 30, "the live event")
    finally:
        px.stop()
    assert state(b, "widget:aggregate-Zx81")["title"] == "TOPSECRET-TITLE-9f3 live"
    stamped = [e["timestamp"] for e in log(a)]   # the display times, to the millisecond
    server.stop()   # every file flushed
    kept = server_bytes(server)
    assert len(kept) > (2_000 if is_pg(server.db) else 10_000)   # rows, or files
    for needle in SECRETS + ["widget"] + stamped:
        assert needle.encode() not in kept, f"{needle!r} is readable on the server"
        assert needle.encode() not in bytes(px.seen), f"{needle!r} crossed the wire readable"
    # the ids, nodes and clocks are what it keeps, and it says so (README)
    assert log(a)[0]["event_id"].encode() in kept
    server.start()


# -- how the team key reaches a device -----------------------------------------------------
@pytest.mark.one_backend
def test_a_device_waits_for_a_member_then_reads_the_whole_history(server, device, tmp_path):
    a = device("a")
    append(a, secret_events())
    sync(a)
    key = server.register("late")
    late = tmp_path / "late"
    run("sk", "sync", "setup", "--server", server.url, "--key", key, home=late)
    p = sync(late, code=1)
    line = p.stderr.strip()   # one line, with the time as a cron run's errors have it
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ sk sync: waiting for a member of"
                        r" team 'default' to share the team key; run 'sk sync' on any device"
                        r" that has it", line), line
    sync(a)   # a member's next sync seals the key, every epoch of it, to the new device
    sync(late)
    assert state(late) == state(a)
    # a fresh home with the same URL and key (a CI runner) reads everything at once
    runner = tmp_path / "runner"
    run("sk", "sync", "setup", "--server", server.url, "--key", key, home=runner)
    sync(runner)
    assert state(runner) == state(a)


@pytest.mark.one_backend
def test_a_running_watcher_shares_the_key_with_a_new_device(server, device, tmp_path, watch,
                                                            monkeypatch):
    a = device("a")
    sync(a)
    monkeypatch.setenv("SK_WATCH_SHARE_INTERVAL", "1")   # (30 s by default)
    w = watch(a)
    wait_until(lambda: w.connects() >= 1, 30, "the watcher")
    key = server.register("newcomer")
    home = tmp_path / "newcomer"
    run("sk", "sync", "setup", "--server", server.url, "--key", key, home=home)
    wait_until(lambda: sync(home, code=None).returncode == 0, 30, "the watcher's grant")
    assert w.proc.poll() is None


# -- revocation and rotation ---------------------------------------------------------------
@pytest.mark.one_backend
def test_revocation_starts_an_epoch_the_revoked_device_cannot_read(server, device, tmp_path):
    a, b, c = device("a"), device("b"), device("c")
    append(a, [ev("note_added", "note:before", {"v": 1})])
    for home in (a, b, c):
        sync(home)
    c_key = [line.split("=", 1)[1].strip("'") for line in (c / ".env").read_text().splitlines()
             if line.startswith("SK_API_KEY")][0]
    run("sk-register", "--revoke", "c", "--db", server.db, env=server.env())
    append(b, [ev("note_added", "note:after", {"secret": "written after the revocation"})])
    sync(b)   # b begins epoch 2 before anything more is written, sealed to a and b only
    sync(a)
    assert state(a, "note:after") == {"secret": "written after the revocation"}
    epochs = query(server.db, "SELECT epoch FROM epochs ORDER BY epoch")
    assert [e for (e,) in epochs] == [1, 2]
    batch_epochs = {e for (e,) in query(server.db, "SELECT epoch FROM batches WHERE batch ="
                                                   " (SELECT max(batch) FROM batches)")}
    assert batch_epochs == {2}
    # with the revoked key's material, the database and the secret: no epoch-2 key
    c_private = crypto.identity_secret(c_key)
    for team, epoch, device_, sealed_, granter in query(
            server.db, "SELECT team, epoch, device, sealed, granter FROM grants WHERE epoch = 2"):
        assert device_ != "c"
        with pytest.raises(crypto.CryptoError):
            crypto.open_grant(team, epoch, bytes(sealed_), c_private, bytes(granter))
    sync(c, code=4)   # and the revoked device itself is refused
    # old epochs stay readable to members: a device registered now reads everything
    d = device("d")
    sync(d)
    assert state(d) == state(a)


@pytest.mark.one_backend
def test_rotating_a_key_loses_nothing(server, device, tmp_path):
    a, b = device("a"), device("b")
    append(a, [ev("note_added", "note:1", {"v": 1})])
    sync(a)
    sync(b)
    new_key = run("sk-register", "--rotate", "b", "--db", server.db, env=server.env()).stdout.strip()
    run("sk", "sync", "setup", "--server", server.url, "--key", new_key, "--yes", home=b)
    append(b, [ev("note_added", "note:2", {"v": 2})])
    sync(b)   # b holds the old epochs; the rotation asks for a new one, which b begins
    sync(a)
    assert state(a) == state(b) and set(state(a, "note")) == {"1", "2"}
    fresh = tmp_path / "fresh-b"
    run("sk", "sync", "setup", "--server", server.url, "--key", new_key, home=fresh)
    sync(fresh)
    assert state(fresh) == state(a)


# -- approval ------------------------------------------------------------------------------
@pytest.mark.one_backend
def test_where_the_team_requires_approval_only_an_approved_device_gets_the_key(server, device,
                                                                               tmp_path):
    a = device("a")
    append(a, secret_events())
    sync(a)
    run("sk", "team", "require-approval", home=a)
    key = server.register("d")
    d = tmp_path / "d"
    run("sk", "sync", "setup", "--server", server.url, "--key", key, home=d)
    sync(d, code=1)
    sync(a)   # a member does not grant a device no one approved
    p = sync(d, code=1)
    assert "sk team approve d" in p.stderr
    members = run("sk", "team", "members", home=a).stdout
    assert "d " in members and "no key" in members
    p = run("sk", "team", "approve", "d", "--yes", home=a)
    d_fp = crypto.fingerprint(crypto.identity_public(crypto.identity_secret(key)))
    assert d_fp in p.stderr
    sync(d)
    assert state(d) == state(a)
    # a server that turns approval off again is not believed
    query_db = server.db
    if is_pg(query_db):
        import psycopg
        with psycopg.connect(query_db, autocommit=True) as c:
            c.execute("UPDATE teams SET approval = 0")
    else:
        with sqlite3.connect(query_db) as c:
            c.execute("UPDATE teams SET approval = 0")
    p = sync(a, code=5)
    assert "requires approval" in p.stderr


def test_where_the_team_requires_approval_a_grant_from_a_device_of_the_servers_is_not_taken(
        server, device):
    """A server can register a device of its own (it then knows its key) and make it
    begin an epoch, grants and all, by writing its own database. A member of a team
    that requires approval takes a new epoch's key only from itself or an approved
    member, so it never writes under a key the server knows."""
    a = device("a")
    append(a, secret_events())
    sync(a)
    run("sk", "team", "require-approval", home=a)
    key = server.register("rogue")
    rogue = crypto.identity_secret(key)
    (ident,) = query(server.db, "SELECT identity FROM devices WHERE name = 'a'")[0]
    (head,) = query(server.db, "SELECT head FROM teams WHERE team = 'default'")[0]
    known = os.urandom(32)
    write_server(server,
                 ("UPDATE teams SET epoch = 2 WHERE team = 'default'", ()),
                 ("INSERT INTO epochs(team, epoch, created_by, start_seq, created) VALUES"
                  " ('default', 2, 'rogue', ?, '2026-12-01T00:00:00Z')", (head,)),
                 ("INSERT INTO grants(team, epoch, device, recipient, sealed, granted_by, granter,"
                  " created) VALUES ('default', 2, 'a', ?, ?, 'rogue', ?, '2026-12-01T00:00:00Z')",
                  (bytes(ident), crypto.seal_grant("default", 2, known, rogue, bytes(ident)),
                   crypto.identity_public(rogue))))
    append(a, [ev("note_added", "note:after", {"text": "must not be sealed under rogue's key"})])
    p = sync(a, code=1)
    assert "waiting for a member of team 'default' to share the team key (epoch 2)" in p.stderr
    assert query(a / "sk.db", "SELECT epoch FROM team_keys") == [(1,)]
    assert status(a)["queued"] == 1


@pytest.mark.one_backend
def test_where_the_team_requires_approval_a_rotated_member_is_approved_again(server, device):
    """Rotating a key drops the device's approval (its identity is new). If that device
    begins the next epoch, the others say whose key they wait for; approving it lets
    them take it, and nothing is lost."""
    a, b = device("a"), device("b")
    append(a, [ev("note_added", "note:1", {"v": 1})])
    sync(a)
    sync(b)
    run("sk", "team", "require-approval", home=a)
    new_key = run("sk-register", "--rotate", "b", "--db", server.db, env=server.env()).stdout.strip()
    run("sk", "sync", "setup", "--server", server.url, "--key", new_key, "--yes", home=b)
    append(b, [ev("note_added", "note:2", {"v": 2})])
    sync(b)   # b held epoch 1, so it begins epoch 2 and pushes under it
    p = sync(a, code=1)
    assert "its key came from 'b', which no member has approved" in p.stderr, p.stderr
    assert "sk team approve b" in p.stderr
    run("sk", "team", "approve", "b", "--yes", home=a)
    sync(a)
    assert state(a) == state(b) and set(state(a, "note")) == {"1", "2"}


# -- a server that alters, moves or replays what it stores ---------------------------------
def write_server(server, *statements):
    if is_pg(server.db):
        import psycopg
        with psycopg.connect(server.db, autocommit=True) as c:
            for sql, args in statements:
                c.execute(sql.replace("?", "%s"), args)
    else:
        with sqlite3.connect(server.db) as c:
            for sql, args in statements:
                c.execute(sql, args)


@pytest.mark.parametrize("attack", ["flip-a-byte", "swap-bodies", "other-id", "drop-an-event",
                                    "other-team", "sealed-as-text", "manifest-as-text",
                                    "chain-as-text", "epoch-as-text", "batch-missing",
                                    "epoch-past-the-team's"])
def test_a_device_refuses_what_the_server_altered_at_rest(server, device, attack):
    if attack.endswith("-as-text") and is_pg(server.db):
        pytest.skip("a PostgreSQL column keeps its type: only SQLite stores text in a BLOB")
    a, b = device("a"), device("b")
    append(a, [ev("note_added", f"note:{i}", {"v": i}) for i in range(3)])
    sync(a)
    append(a, [ev("note_added", f"note:{i}", {"v": i}) for i in range(3, 6)])
    sync(a)
    before = status(b)
    if attack == "flip-a-byte":
        (blob,) = query(server.db, "SELECT sealed FROM batches WHERE batch = 1")[0]
        blob = bytearray(blob)
        blob[len(blob) // 2] ^= 0x01
        write_server(server, ("UPDATE batches SET sealed = ? WHERE batch = 1", (bytes(blob),)))
    elif attack == "swap-bodies":     # the events of two batches trade places
        write_server(server, ("UPDATE events SET batch = 3 - batch", ()))
    elif attack == "other-id":        # a body served under another event id
        write_server(server, ("UPDATE events SET idx = 2 - idx WHERE batch = 1", ()))
    elif attack == "drop-an-event":   # an event taken out of the middle of the log
        write_server(server, ("DELETE FROM events WHERE seq = 2", ()),
                     ("UPDATE events SET seq = -seq WHERE seq > 2", ()),
                     ("UPDATE events SET seq = -seq - 1 WHERE seq < 0", ()),
                     ("UPDATE teams SET head = head - 1", ()))
    elif attack == "epoch-past-the-team's":   # not a member's: no such epoch yet
        write_server(server, ("UPDATE batches SET epoch = 99 WHERE batch = 1", ()))
    elif attack == "batch-missing":   # an event names a batch the server does not hold
        write_server(server, ("UPDATE events SET batch = 99 WHERE seq = 2", ()))
    elif attack.endswith("-as-text"):   # a cell's type changed at rest (SQLite keeps any)
        table, column = {"sealed": ("batches", "sealed"), "manifest": ("batches", "manifest"),
                         "chain": ("events", "chain"), "epoch": ("batches", "epoch")}[
            attack.split("-")[0]]
        value = "'not a number'" if column == "epoch" else f"CAST({column} AS TEXT)"
        write_server(server, (f"UPDATE {table} SET {column} = {value}", ()))
    else:                             # a body from another team's log
        other = device("x", team="other")
        append(other, [ev("note_added", "note:x", {"v": 99})])
        sync(other)
        (blob, man) = query(server.db, "SELECT sealed, manifest FROM batches WHERE team = 'other'")[0]
        write_server(server, ("UPDATE batches SET sealed = ? WHERE team = 'default' AND batch = 1",
                              (bytes(blob),)))
    p = sync(b, code=5)
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "seq" in line and "event" in line, line   # it names the event and its seq
    after = status(b)
    assert after["cursor"] == before["cursor"] == 0      # the cursor did not move past it
    assert log(b) == []                                   # and nothing was applied
    assert state(b) == {}


@pytest.mark.parametrize("cell", ["grant-as-text", "identity-word", "epoch-word",
                                  "snapshot-seq-word", "team-row-gone", "head-lowered",
                                  "node-device-bytes"])
def test_key_state_or_a_snapshot_altered_at_rest_stops_with_the_reason(server, device, cell):
    """What every sync reads first (the team key's state) and what a pull's last page
    asks (whether a snapshot is due), stored as another type: the device says why
    (exit 5, one line) or, for the snapshot's mere advice, syncs on; never an internal
    error or a traceback."""
    if is_pg(server.db):
        pytest.skip("a PostgreSQL column keeps its type: only SQLite stores text in a BLOB")
    a = device("a")
    append(a, [ev("note_added", "note:1", {"v": 1})])
    sync(a)
    sql = {"grant-as-text": "UPDATE grants SET sealed = CAST(sealed AS TEXT)",
           "identity-word": "UPDATE devices SET identity = 'x' WHERE name = 'a'",
           "epoch-word": "UPDATE teams SET epoch = 'x'",
           "snapshot-seq-word": "INSERT INTO snapshots (team, seq, chain, epoch, sealed, size,"
                                " device, created) VALUES ('default', 'x', x'00', 1, x'00', 1,"
                                " 'a', '2026-12-01T00:00:00Z')",
           "team-row-gone": "DELETE FROM teams",
           "head-lowered": "UPDATE teams SET head = 0",
           "node-device-bytes": "UPDATE nodes SET device = x'ff'"}[cell]
    write_server(server, (sql, ()))
    append(a, [ev("note_added", "note:2", {"v": 2})])
    if cell == "snapshot-seq-word":
        sync(a)
        assert status(a)["queued"] == 0
        return
    p = sync(a, code=5)
    line = p.stderr.strip()
    assert "Traceback" not in line, line
    if cell == "head-lowered":   # it looks restored: the device heals it, then is told
        line = line.splitlines()[-1]
    assert len(line.splitlines()) == 1, line
    assert "cannot be read as it was written (altered at rest?)" in line, line
    assert status(a)["queued"] >= 1


def test_a_malformed_key_state_is_refused_not_a_crash():
    """Whatever the server seals as the team key's state, a device checks its shape
    before it reads it (IntegrityError, exit 5)."""
    from sk.errors import IntegrityError
    from sk.keyring import check_state
    good = {"team": "t", "device": "d", "epoch": 1, "identity": "ab", "holds": [1],
            "epochs": [{"epoch": 1, "start_seq": 0}], "grants": [
                {"epoch": 1, "sealed": "00", "granter": "ab", "granted_by": "e"}],
            "members": [{"device": "e", "identity": "ab", "approval": None, "granted": [1],
                         "revoked": None}]}
    assert check_state(dict(good)) == good
    for bad in ({"epoch": "x"}, {"epoch": -1}, {"team": 5}, {"holds": 3}, {"holds": ["1"]},
                {"identity": "abc"}, {"grants": [{"epoch": 1}]}, {"grants": {"a": 1}},
                {"epochs": "e"}, {"members": [{"device": "e", "identity": "zz", "granted": []}]},
                {"members": [{"device": "e", "granted": "1"}]}, {"members": 7}):
        with pytest.raises(IntegrityError, match="malformed key state"):
            check_state({**good, **bad})
    with pytest.raises(IntegrityError):
        check_state(["not", "a", "dict"])


@pytest.mark.one_backend
def test_a_push_onto_a_head_altered_at_rest_stops_with_the_reason(server, device, watch):
    """A team's head whose chain was stored as text: the server says, sealed, that it
    cannot read it; the push stops there (exit 5) and the event stays queued; a
    watcher says so and stays up."""
    if is_pg(server.db):
        pytest.skip("a PostgreSQL column keeps its type: only SQLite stores text in a BLOB")
    a = device("a")
    append(a, [ev("note_added", "note:1", {"v": 1})])
    sync(a)
    write_server(server, ("UPDATE teams SET chain = CAST(chain AS TEXT)", ()))
    append(a, [ev("note_added", "note:2", {"v": 2})])
    p = sync(a, code=5)
    assert "cannot be read as it was written (altered at rest?)" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert status(a)["queued"] == 1
    w = watch(a)
    wait_until(lambda: "cannot be read as it was written" in w.text(), 30, w.text())
    assert w.proc.poll() is None


@pytest.mark.one_backend
def test_an_epoch_the_server_makes_up_ends_nothing(server, device):
    """A server that lists an epoch 2 (begun at seq 1) that no member began and the
    team is not at: a device pins no start for it, and reads the epoch-1 events
    written after it; even one that pinned it (a build before) reads them, as it was
    never given that epoch's key."""
    a, b = device("a"), device("b")
    append(a, [ev("note_added", "note:1", {"v": 1})])
    sync(a)
    sync(b)
    write_server(server, ("INSERT INTO epochs(team, epoch, created_by, start_seq, created)"
                          " VALUES ('default', 2, 'a', 1, '2026-12-01T00:00:00Z')", ()))
    # even said to be the team's current epoch, one this device was never given pins nothing
    write_server(server, ("UPDATE teams SET epoch = 2", ()))
    sync(b, code=1)   # waiting for epoch 2's key
    write_server(server, ("UPDATE teams SET epoch = 1", ()))
    append(a, [ev("note_added", "note:2", {"v": 2}), ev("note_added", "note:3", {"v": 3})])
    sync(a)
    sync(b)
    assert set(state(b, "note")) == {"1", "2", "3"}
    assert "2" not in json.loads(query(b / "sk.db", "SELECT value FROM meta WHERE key ="
                                                    " 'epoch_starts'")[0][0])
    with sqlite3.connect(b / "sk.db") as c:   # pinned by a build before this one
        c.execute("UPDATE meta SET value = '{\"1\": 0, \"2\": 1}' WHERE key = 'epoch_starts'")
    append(a, [ev("note_added", "note:4", {"v": 4})])
    sync(a)
    sync(b)
    assert set(state(b, "note")) == {"1", "2", "3", "4"}


@pytest.mark.one_backend
def test_an_old_epoch_replayed_after_revocation_is_refused(server, device):
    """A server (holding the revoked device's old key) writes an event sealed under
    the old epoch after the new one began: members refuse it."""
    from sk.event import check_stamped
    from sk.sealed import canonical, seal_batch
    a, b, c = device("a"), device("b"), device("c")
    sync(a)
    for home in (b, c):
        sync(home)
    old_key = bytes(query(a / "sk.db", "SELECT key FROM team_keys WHERE epoch = 1")[0][0])
    run("sk-register", "--revoke", "c", "--db", server.db, env=server.env())
    append(a, [ev("note_added", "note:new", {"v": 1})])
    sync(a)                                               # epoch 2 begins
    head, chain = query(server.db, "SELECT head, chain FROM teams WHERE team = 'default'")[0]
    forged = check_stamped({"event_id": str(uuid.uuid4()), "event_type": "note_added",
                            "aggregate_type": "note", "aggregate_id": "new", "lamport_clock": 99,
                            "node_id": "c-node", "payload": {"v": 666},
                            "timestamp": "2026-01-31T12:00:00Z"}, new=False)
    manifest, writer, blob = seal_batch("default", 1, old_key, [forged], (head, bytes(chain).hex()))
    import hashlib
    new_chain = hashlib.sha256(bytes(chain) + forged.event_id.encode()).digest()
    text = canonical([tuple(m) for m in manifest], writer)
    write_server(server,
                 ("INSERT INTO batches (team, batch, epoch, manifest, sealed, size, device, received)"
                  " VALUES ('default', 99, 1, ?, ?, 10, 'c', 'x')", (text, blob)),
                 ("INSERT INTO events (team, seq, event_id, node_id, lamport_clock, batch, idx,"
                  " chain, device, received) VALUES ('default', ?, ?, 'c-node', 99, 99, 0, ?, 'c',"
                  " 'x')", (head + 1, forged.event_id, new_chain)),
                 ("UPDATE teams SET head = ?, chain = ? WHERE team = 'default'",
                  (head + 1, new_chain)))
    p = sync(b, code=5)
    assert "epoch 1" in p.stderr and forged.event_id in p.stderr, p.stderr
    assert "note" not in state(b)   # nothing of that page was applied


# -- the upgrade from sk 0.3.0 ---------------------------------------------------------------
RELEASE_0_3_0 = "f66df98"   # the last commit of sk 0.3.0 (protocol 1, plaintext on the server)


@pytest.fixture
def sk030(tmp_path):
    """sk 0.3.0's own code, from this repository's history, run with this venv's
    dependencies: a command runner."""
    root = tmp_path / "sk-0.3.0"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE_0_3_0, "lib", "server",
                              "bin"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)

    def run030(*args, home=None, code=0, env=None):
        e = dict(env or os.environ)
        if home is not None:
            e["SK_HOME"] = str(home)
        p = subprocess.run([sys.executable, str(root / "bin" / args[0]), *map(str, args[1:])],
                           env=e, capture_output=True, text=True, timeout=120)
        assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
        return p
    run030.root = root
    return run030


@pytest.mark.parametrize("server_db", ["sqlite"], indirect=True)
def test_a_0_3_0_server_upgrades_with_nothing_lost_and_no_plaintext_left(server_db, tmp_path,
                                                                         sk030):
    old = ServerProcess(server_db, log=tmp_path / "old.log")
    old.proc = subprocess.Popen([sys.executable, str(sk030.root / "bin" / "sk"), "server",
                                 "--port", str(old.port), "--db", server_db,
                                 "--no-control-socket"], stdout=open(old.log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    old._log = open(old.log, "ab")
    wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", old.port)) == 0, 20, "0.3.0")
    homes, keys = {}, {}
    for name in ("a", "b"):
        keys[name] = sk030("sk-register", "--name", name, "--db", server_db).stdout.strip()
        homes[name] = tmp_path / name
        sk030("sk", "sync", "setup", "--server", old.url, "--key", keys[name], home=homes[name])
    for i in range(30):
        sk030("sk-append", "--type", "secret_thing_made", "--aggregate", f"widget:aggregate-Zx{i}",
              "--set", "title=TOPSECRET-TITLE-9f3", home=homes["a" if i % 2 else "b"])
    for name in ("a", "b", "a"):
        sk030("sk", "sync", home=homes[name])
    old.stop()
    assert b"TOPSECRET-TITLE-9f3" in (tmp_path / "server.db").read_bytes()
    seqs_before = query(server_db, "SELECT seq, event_id, chain FROM events ORDER BY seq")

    new = ServerProcess(server_db, port=old.port, log=tmp_path / "new.log").start()
    try:
        # an old client is told what to upgrade
        p = sk030("sk", "sync", home=homes["b"], code=5)
        assert "upgrade sk on this device" in p.stderr, p.stderr
        # the upgraded devices: a's first sync begins the team key and seals the log; b
        # tells the server its identity and waits for a member to share the key with it
        run("sk", "sync", home=homes["a"])
        assert query(server_db, "SELECT count(*) FROM legacy") == [(0,)]
        p = run("sk", "sync", home=homes["b"], code=1)
        assert "waiting for a member" in p.stderr
        run("sk", "sync", home=homes["a"])
        run("sk", "sync", home=homes["b"])
        assert [r[:2] for r in query(server_db, "SELECT seq, event_id, chain FROM events"
                                                " ORDER BY seq")] == [r[:2] for r in seqs_before]
        assert [bytes(r[2]) for r in query(server_db, "SELECT seq, event_id, chain FROM events"
                                                      " ORDER BY seq")] == [
            bytes(r[2]) for r in seqs_before]
        assert state(homes["a"]) == state(homes["b"]) and len(state(homes["a"], "widget")) == 30
        # a device that never synced before reads it all, sealed
        key = new.register("c")
        c = tmp_path / "c"
        run("sk", "sync", "setup", "--server", new.url, "--key", key, home=c)
        run("sk", "sync", home=homes["a"])   # a shares the key with c
        run("sk", "sync", home=c)
        assert state(c) == state(homes["a"])
    finally:
        new.stop()
    kept = b"".join(p.read_bytes() for p in tmp_path.iterdir()
                    if p.name.startswith("server.db") and p.is_file())
    for needle in SECRETS[:2] + ["secret_thing_made", "widget"]:
        assert needle.encode() not in kept, needle
