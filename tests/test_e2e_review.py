"""Regression tests for the review findings: each proves a fix from the outside, with
the installed commands as subprocesses against a real `sk server` (or, for
server-only items, the Flask test client)."""

import concurrent.futures
import json
import os
import shutil
import socket
import stat
import struct
import time
import uuid

import pytest

from conftest import ServerProcess, free_port
from conftest import (append, member_push, check_server_log, ev, log, results, run, server_rows,
                      state, status, sync)

pytestmark = pytest.mark.one_backend   # device-side: see conftest

FAKE_KEY = "sk1.0123456789abcdef." + "A" * 43


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def one_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"wanted one line on stderr, got:\n{p.stderr}"
    return lines[0]


def dead_env(**extra):
    """Environment pointing at a port nobody listens on, with a well-formed key."""
    env = dict(os.environ, SK_SERVER=f"http://127.0.0.1:{free_port()}", SK_API_KEY=FAKE_KEY)
    env.update(extra)
    return env


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _children(pid):
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
        except OSError:
            pass
    return out


# -- 1. SIGPIPE ----------------------------------------------------------------------
def _hang_up(port, i):
    req = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if i % 2:   # reset instead of FIN for half of them
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(req * (1 + i % 8))   # pipelined: the server keeps writing after we left


def test_server_survives_clients_that_hang_up(server, device):
    a, b = device("a"), device("b")
    workers = _children(server.proc.pid)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for f in [pool.submit(_hang_up, server.port, i) for i in range(300)]:
            f.result(timeout=10)
    time.sleep(1.0)   # let the worker write its answers into the closed sockets
    assert time.monotonic() - t0 < 15
    assert server.proc.poll() is None, "sk server died"
    text = server.log.read_text(errors="replace")
    assert "SIGPIPE" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    if workers:
        assert _children(server.proc.pid) == workers, "a worker was replaced"
    append(a, [ev("feature_created", "feature:F-1", {"t": "after"})])
    sync(a)
    sync(b)
    assert state(b) == {"feature": {"F-1": {"t": "after"}}}
    assert "SIGPIPE" not in server.log.read_text(errors="replace")


# -- 2. bad local configuration: exit 2, one line ---------------------------------------
def test_sk_home_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    for args, inp in ((("sk-log",), None), (("sk-append",), json.dumps(ev("x", "a:b")) + "\n"),
                      (("sk", "sync", "status"), None)):
        p = run(*args, home=f, input=inp, code=2)
        assert str(f) in one_line(p), (args, p.stderr)
        assert p.stdout == ""
    assert f.read_text() == "x"


def test_setup_into_a_home_that_is_a_file_is_refused(server, tmp_path):
    f = tmp_path / "home-file"
    f.write_text("x")
    key = server.register("filehome")
    p = run("sk", "sync", "setup", "--server", server.url, "--key", key, home=f, code=2)
    assert str(f) in one_line(p)
    assert f.read_text() == "x"


def test_env_file_with_invalid_utf8_is_a_clear_error(tmp_path):
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    (home / ".env").write_bytes(b"SK_SERVER=http://127.0.0.1:1\nSK_API_KEY=\xff\xfe\x80bad\n")
    p = run("sk", "sync", "status", home=home, code=2)
    assert ".env" in one_line(p)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_sk_timeout_is_a_usage_error(value):
    p = run("sk", "sync", env=dead_env(SK_TIMEOUT=value), code=2)
    assert "SK_TIMEOUT" in one_line(p)


def test_bad_never_sync_rule_is_a_usage_error():
    home = os.environ["SK_HOME"]
    append(home, [ev("feature_created", "feature:F-1")])
    env = dead_env(SK_NEVER_SYNC="garbage")
    p = run("sk-stamp", env=env, code=2)
    assert "garbage" in one_line(p)
    p = run("sk", "sync", env=env, code=2)
    assert "garbage" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert log(home) == []          # nothing was stamped under a bad rule


def test_admin_backup_to_a_bad_target_is_refused(tmp_path):
    db = tmp_path / "srv.db"
    run("sk-admin", "--db", db, "init")
    run("sk-register", "--name", "x", "--db", db)
    p = run("sk-admin", "--db", db, "backup", "--to", "/nonexistent/dir/b.db", code=2)
    assert "/nonexistent/dir" in one_line(p)
    existing = tmp_path / "exists.db"
    existing.write_bytes(b"keep me")
    p = run("sk-admin", "--db", db, "backup", "--to", existing, code=2)
    assert "exist" in one_line(p)
    assert existing.read_bytes() == b"keep me"


# -- 3. own events skipped by node, not by device ----------------------------------------
def test_same_key_in_two_homes_each_sees_the_other(server, tmp_path):
    key = server.register("shared")
    h1, h2 = tmp_path / "one", tmp_path / "two"
    for h in (h1, h2):
        run("sk", "sync", "setup", "--server", server.url, "--key", key, home=h)
    assert status(h1)["node_id"] != status(h2)["node_id"]
    append(h1, [ev("feature_created", "feature:F-1", {"from": "one"})])
    sync(h1)
    sync(h2)
    assert state(h2) == {"feature": {"F-1": {"from": "one"}}}
    append(h2, [ev("feature_updated", "feature:F-1", {"by": "two"})])
    sync(h2)
    sync(h1)
    assert state(h1) == state(h2) == {"feature": {"F-1": {"from": "one", "by": "two"}}}


def _snapshot(home, dest):
    dest.mkdir()
    for name in ("sk.db", "sk.db-wal"):
        if (home / name).exists():
            shutil.copy2(home / name, dest / name)


def _restore(home, snap):
    for name in ("sk.db", "sk.db-wal", "sk.db-shm"):
        (home / name).unlink(missing_ok=True)
    for f in snap.iterdir():
        shutil.copy2(f, home / f.name)


def test_home_restored_from_an_older_copy_gets_its_lost_events_back(server, device, tmp_path):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", "feature:F-1", {"v": 1})])
    sync(a)
    append(b, [ev("feature_created", "feature:B-1", {"v": "b"})])
    sync(b)
    sync(a)
    snap = tmp_path / "snap"
    _snapshot(a, snap)
    append(a, [ev("feature_created", "feature:F-2", {"v": 2}),
               ev("feature_updated", "feature:F-1", {"v": 11})])
    sync(a)
    lost = {e["event_id"]: e for e in log(a) if e["aggregate_id"] == "F-2" or
            e["event_type"] == "feature_updated"}
    assert len(lost) == 2
    want = state(a)
    _restore(a, snap)
    assert not set(lost) & {e["event_id"] for e in log(a)}      # really older
    sync(a)
    now = {e["event_id"]: e for e in log(a)}
    assert set(lost) <= set(now), "the events this device lost did not come back"
    for eid, e in lost.items():
        assert now[eid]["lamport_clock"] == e["lamport_clock"]
        assert now[eid]["payload"] == e["payload"]
    sync(b)
    assert state(a) == want == state(b)
    assert state(a, "feature:F-2") == {"v": 2} and state(a, "feature:F-1") == {"v": 11}
    # the clock moved past what came back: a new event is stamped above all of them
    run("sk-append", "--type", "feature_updated", "--aggregate", "feature:F-2",
        "--set", "v=3", home=a)
    run("sk-stamp", home=a)
    entries = log(a)
    newest = entries[-1]
    assert newest["payload"] == {"v": 3}
    assert newest["lamport_clock"] > max(e["lamport_clock"] for e in entries[:-1])
    sync(a)
    sync(b)
    assert state(a) == state(b) and state(b, "feature:F-2") == {"v": 3}
    check_server_log(server)


# -- 4. a rejected event is set aside ------------------------------------------------------
def test_rejected_event_is_set_aside_and_the_rest_flows(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", "feature:F-1", {"title": "real"}),
               ev("feature_created", "feature:F-2", {"title": "other"})])
    sync(a)
    sync(b)
    real = next(e for e in log(a) if e["aggregate_id"] == "F-1")
    c = device("c")
    append(c, [ev("feature_created", "feature:F-1", {"title": "impostor"},
                  event_id=real["event_id"])])
    p = sync(c, code=1)
    assert "rejected" in p.stderr
    rejected = log(c, "--rejected")
    assert len(rejected) == 1, rejected
    r = rejected[0]
    assert r["event_id"] == real["event_id"] and r["payload"] == {"title": "impostor"}
    assert r["status"] == "rejected" and r["reason"]
    # the server's real event arrived and the impostor shapes nothing
    in_log = [e for e in log(c) if e["event_id"] == real["event_id"]]
    assert len(in_log) == 1 and in_log[0]["payload"] == {"title": "real"}
    assert state(c) == state(b) == state(a)
    assert state(c, "feature:F-1") == {"title": "real"}
    info = status(c)
    assert info["rejected"] == 1 and info["queued"] == 0
    # retrying does not bring it back while its id is taken
    run("sk-push-batch", "--retry-rejected", "--all", home=c)
    in_log = [e for e in log(c) if e["event_id"] == real["event_id"]]
    assert len(in_log) == 1 and in_log[0]["payload"] == {"title": "real"}
    assert in_log[0]["status"] == "remote"
    assert log(c, "--status", "queued") == []
    run("sk-resolve", home=c)
    assert state(c) == state(b)
    sync(c)                     # and the device keeps syncing cleanly
    assert state(c) == state(b)
    check_server_log(server)


# -- 5. offline ---------------------------------------------------------------------------
def test_offline_sync_exits_3_and_still_resolves():
    home = os.environ["SK_HOME"]
    env = dead_env()
    run("sk-append", "--type", "feature_created", "--aggregate", "feature:OFF-1",
        "--set", "title=offline", env=env)
    p = run("sk", "sync", env=env, code=3)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert state(home) == {"feature": {"OFF-1": {"title": "offline"}}}
    assert [e["status"] for e in log(home)] == ["queued"]
    assert status(home)["failures_since"] == 1


# -- 6. sk-register / sk-admin argument and file checks -----------------------------------
def test_register_refuses_empty_names_and_a_missing_database(tmp_path):
    db = tmp_path / "srv.db"
    run("sk-admin", "--db", db, "init")
    run("sk-register", "--name", "x", "--db", db)
    for flag in ("--name", "--revoke", "--rotate"):
        p = run("sk-register", flag, "", "--db", db, code=2)
        assert p.stdout == "", (flag, p.stdout)
        assert p.stderr.strip(), flag
    names = [d["name"] for d in map(json.loads, run("sk-register", "--list", "--json",
                                                    "--db", db).stdout.splitlines())]
    assert names == ["x"]
    missing = tmp_path / "missing.db"
    p = run("sk-register", "--list", "--db", missing, code=2)
    assert str(missing) in one_line(p)
    assert not missing.exists()
    p = run("sk-admin", "--db", missing, "stats", code=2)
    assert str(missing) in one_line(p)
    assert not missing.exists() and not list(tmp_path.glob("missing.db*"))
    # sk-register never makes a database (a mistyped --db would mint keys no server
    # knows): it says how to make one
    new = tmp_path / "new.db"
    p = run("sk-register", "--name", "x", "--db", new, code=2)
    assert "sk-admin init" in one_line(p) and not new.exists()


# -- 7. file modes ------------------------------------------------------------------------
def test_device_files_are_private_under_umask_022(tmp_path, umask022):
    home = tmp_path / "fresh-home"
    run("sk-append", "--type", "feature_created", "--aggregate", "feature:F-1", home=home)
    assert mode(home) == 0o700
    assert mode(home / "sk.db") == 0o600

    reg_db = tmp_path / "reg.db"
    run("sk-admin", "--db", reg_db, "init")
    run("sk-register", "--name", "m", "--db", reg_db)
    assert mode(reg_db) == 0o600

    srv = ServerProcess(tmp_path / "served.db").start()
    try:
        assert mode(srv.db) == 0o600
        key = srv.register("dev")
        dev = tmp_path / "dev-home"
        run("sk", "sync", "setup", "--server", srv.url, "--key", key, home=dev)
        assert mode(dev) == 0o700
        assert mode(dev / ".env") == 0o600
        sync(dev)
        assert mode(dev / "sk.db") == 0o600
        backup = tmp_path / "backup.db"
        run("sk-admin", "--db", srv.db, "backup", "--to", backup)
        assert mode(backup) == 0o600
    finally:
        srv.stop()


# -- 8. timestamps and NaN ------------------------------------------------------------------
@pytest.mark.parametrize("ts", ["2026-13-45T99:00:00Z", "2026-01-31T12:00:00+02:00"])
def test_append_refuses_bad_timestamps(ts):
    home = os.environ["SK_HOME"]
    lines = [json.dumps(ev("feature_created", "feature:F-1")),
             json.dumps(ev("feature_created", "feature:F-2", timestamp=ts))]
    p = run("sk-append", home=home, input="\n".join(lines) + "\n", code=2)
    assert "line 2" in one_line(p)
    run("sk-stamp", home=home)
    assert log(home) == []


def test_append_set_nan_is_a_string():
    home = os.environ["SK_HOME"]
    run("sk-append", "--type", "feature_created", "--aggregate", "feature:F-1",
        "--set", "a=NaN", "--set", "b=Infinity", "--set", "c=2", home=home)
    run("sk-stamp", home=home)
    [e] = log(home)
    assert e["payload"] == {"a": "NaN", "b": "Infinity", "c": 2}
    raw = run("sk-log", home=home).stdout
    assert '"a":"NaN"' in raw.replace(" ", "")
    run("sk-resolve", home=home)
    assert state(home, "feature:F-1")["a"] == "NaN"


# -- 9. bad URLs and --since ----------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://[::1"])
def test_setup_refuses_bad_urls(url, tmp_path):
    home = tmp_path / "h"
    p = run("sk", "sync", "setup", "--server", url, "--key", FAKE_KEY, home=home, code=2)
    assert one_line(p)
    assert not (home / ".env").exists()


def test_pull_huge_since_is_refused_before_any_connection():
    home = os.environ["SK_HOME"]
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        lsock.setblocking(False)
        env = dict(os.environ, SK_SERVER=f"http://127.0.0.1:{lsock.getsockname()[1]}",
                   SK_API_KEY=FAKE_KEY)
        p = run("sk-pull", "--since", "99999999999999999999999", env=env, home=home,
                code=2, timeout=20)
        assert "--since" in one_line(p)
        with pytest.raises(BlockingIOError):
            lsock.accept()


# -- 10. port in use -------------------------------------------------------------------------
def test_server_on_a_port_in_use_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        p = run("sk", "server", "--host", "127.0.0.1", "--port", port, "--db",
                tmp_path / "s.db", "--no-control-socket", code=2, timeout=20)
        assert time.monotonic() - t0 < 10
        line = one_line(p)
        assert f"127.0.0.1:{port}" in line, line


# -- 11. revoked key, wrong seal ---------------------------------------------------------------
# -- 12. a Lamport clock at the limit ----------------------------------------------------------
def test_lamport_clock_at_the_limit_is_rejected(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", "feature:F-1", {"n": 1})])
    sync(a)
    evil = device("evil")
    bad = {"event_id": str(uuid.uuid4()), "event_type": "feature_updated",
           "aggregate_type": "feature", "aggregate_id": "F-1", "lamport_clock": 2 ** 63 - 1,
           "node_id": "evil-node", "payload": {"n": 666}, "timestamp": "2026-01-31T12:00:00Z"}
    answer = member_push(evil, [bad])
    [res] = results(answer, [bad])
    assert res["event_id"] == bad["event_id"] and res["status"] == "rejected", res
    assert "2^32" in res["reason"], res
    assert bad["event_id"] not in {r[2] for r in server_rows(server)}
    # everyone else carries on
    sync(b)
    append(b, [ev("feature_updated", "feature:F-1", {"n": 2})])
    sync(b)
    append(a, [ev("feature_updated", "feature:F-1", {"m": 3})])
    sync(a)
    sync(b)
    assert state(a) == state(b) == {"feature": {"F-1": {"n": 2, "m": 3}}}
    assert all(e["lamport_clock"] < 2 ** 32 for e in log(a))
    check_server_log(server)
