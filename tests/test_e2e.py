"""End-to-end tests: the installed commands as subprocesses against a real
`sk server` process. Fault injection (exit codes, proxies) is in test_e2e_faults.py."""

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import uuid

import pytest

from conftest import (append, opened_log, check_server_log, counts_line, ev, is_pg, log, query, run,
                      server_count, server_rows, state, status, sync, unstamped_count)

KEY_RE = re.compile(r"^sk1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}$")
FIELDS = ("event_id", "event_type", "aggregate_type", "aggregate_id",
          "lamport_clock", "node_id", "payload", "timestamp")


# -- two devices ----------------------------------------------------------------
def test_two_devices_append_sync_converge_and_delete(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("project_created", "project:P-1", {"name": "Apollo"}),
               ev("feature_created", "feature:F-1", {"title": "Login", "prio": 1}),
               ev("feature_created", "feature:F-2", {"title": "Logout"})])
    run("sk-append", "--type", "wp_status_changed", "--aggregate", "work_package:WP-1",
        "--set", "status=doing", "--set", "points=3", "--payload", '{"owner": "ann"}', home=a)
    assert unstamped_count(a) == 4

    out_a = sync(a).stdout
    assert counts_line(out_a)["stamped"] == 4 and counts_line(out_a)["pushed"] == 4
    out_b = sync(b).stdout
    assert counts_line(out_b)["pulled"] == 4
    sa, sb = state(a), state(b)
    assert sa == sb
    assert sb["work_package"]["WP-1"] == {"status": "doing", "points": 3, "owner": "ann"}
    assert sb["feature"]["F-1"] == {"title": "Login", "prio": 1}
    assert server_count(server) == 4

    # concurrent edits of the same field, both offline
    append(a, [ev("feature_updated", "feature:F-1", {"title": "from A"})])
    append(b, [ev("feature_updated", "feature:F-1", {"title": "from B"})])
    for home in (a, b, a, b):
        sync(home)
    sa, sb = state(a), state(b)
    assert sa == sb
    edits = [e for e in log(a, "--type", "feature_updated")]
    assert len(edits) == 2 and {e["payload"]["title"] for e in edits} == {"from A", "from B"}
    assert sorted(e["event_id"] for e in edits) == sorted(
        e["event_id"] for e in log(b, "--type", "feature_updated"))
    winner = max(edits, key=lambda e: (e["lamport_clock"], e["node_id"]))
    assert sa["feature"]["F-1"]["title"] == winner["payload"]["title"]
    assert sa["feature"]["F-1"]["prio"] == 1
    # sk-state TYPE:ID prints just the aggregate
    assert state(b, "feature:F-1") == sb["feature"]["F-1"]

    # a *_deleted event hides the aggregate; --deleted shows it
    append(a, [ev("feature_deleted", "feature:F-2")])
    sync(a)
    sync(b)
    for home in (a, b):
        feats = state(home, "feature")
        assert "F-2" not in feats and "F-1" in feats
        shown = state(home, "feature", "--deleted")
        assert shown["F-2"].get("_deleted") is True
        p = run("sk-state", "feature:F-2", home=home, code=1)
        assert "F-2" in p.stderr
    assert state(a) == state(b)

    # a later-stamped event brings it back, on both
    append(b, [ev("feature_updated", "feature:F-2", {"title": "Logout v2"})])
    sync(b)
    sync(a)
    for home in (a, b):
        assert state(home, "feature")["F-2"]["title"] == "Logout v2"
        assert "_deleted" not in state(home, "feature")["F-2"]
    assert state(a) == state(b)
    check_server_log(server)


@pytest.mark.one_backend
def test_sync_is_idempotent(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", f"feature:F-{i}", {"n": i}) for i in range(5)])
    first = counts_line(sync(a).stdout)
    assert first["pushed"] == 5
    second = sync(a).stdout
    assert "pushed 0" in second and "pulled 0" in second, second
    assert counts_line(second)["stamped"] == 0
    assert counts_line(sync(b).stdout)["pulled"] == 5
    before = log(b)
    again = sync(b).stdout
    assert "pushed 0" in again and "pulled 0" in again, again
    assert log(b) == before
    assert server_count(server) == 5


@pytest.mark.one_backend
def test_sync_dry_run_changes_nothing(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", "feature:F-1", {"t": 1}),
               ev("feature_created", "feature:F-2", {"t": 2})])
    sync(a)
    # B has two events waiting on the server
    before_log, before_status = run("sk-log", home=b).stdout, status(b)
    out = sync(b, "-n").stdout
    assert "would" in out and "pull at most 2" in out and "nothing changed" in out, out
    assert run("sk-log", home=b).stdout == before_log
    assert status(b) == before_status
    assert state(b) == {}
    # A has three unstamped events
    append(a, [ev("feature_updated", f"feature:F-{i}", {"t": 10 + i}) for i in range(3)])
    before_log, before_status = run("sk-log", home=a).stdout, status(a)
    out = sync(a, "--dry-run").stdout
    assert "would stamp 3" in out, out
    assert run("sk-log", home=a).stdout == before_log
    assert status(a) == before_status and before_status["unstamped"] == 3
    assert server_count(server) == 2
    # `sk sync now -n` too
    sync(a, "now", "-n")
    assert status(a) == before_status


# -- sk-append: all or nothing --------------------------------------------------
GOOD = json.dumps(ev("feature_created", "feature:F-9", {"title": "ok"}))
BAD_CASES = {
    "malformed": ([GOOD, GOOD, '{"event_type": "feature_created", "aggregate_type":'], 3),
    "missing_field": ([GOOD, json.dumps({"event_type": "feature_created",
                                         "aggregate_type": "feature"}), GOOD], 2),
    "wrong_type": ([GOOD, GOOD, GOOD, json.dumps({"event_type": "feature_created",
                                                  "aggregate_type": "feature",
                                                  "aggregate_id": 5})], 4),
    "payload_not_object": ([json.dumps(ev("x", "feature:F-1") | {"payload": [1, 2]})], 1),
    "oversize": ([GOOD, json.dumps(ev("feature_created", "feature:F-big",
                                      {"blob": "a" * (256 * 1024)})), GOOD], 2),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_append_bad_line_appends_nothing(case):
    home = os.environ["SK_HOME"]
    run("sk-append", "--type", "feature_created", "--aggregate", "feature:F-0", home=home)
    assert unstamped_count(home) == 1
    lines, lineno = BAD_CASES[case]
    p = run("sk-append", home=home, input="\n".join(lines) + "\n", code=2)
    assert re.search(rf"\bline {lineno}\b", p.stderr), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert unstamped_count(home) == 1
    assert log(home) == []


def test_append_bad_flags_exit_2():
    home = os.environ["SK_HOME"]
    for args in (["--type", "x", "--aggregate", "nocolon"],
                 ["--type", "x", "--aggregate", "a:b", "--payload", "[1]"],
                 ["--type", "x", "--aggregate", "a:b", "--payload", "{not json"],
                 ["--type", "Bad Type", "--aggregate", "a:b"],
                 ["--type", "x"],
                 ["--type", "x", "--aggregate", "a:b", "--event-id", "not-a-uuid"]):
        p = run("sk-append", *args, home=home, code=2)
        assert p.stderr.strip(), args
    assert unstamped_count(home) == 0


# -- the unstamped table as an interface ---------------------------------------
def test_unstamped_table_interface():
    home = os.environ["SK_HOME"]
    run("sk-stamp", home=home)                      # creates the local file
    db = os.path.join(home, "sk.db")
    given = str(uuid.uuid4())

    def insert(rows):
        c = sqlite3.connect(db, timeout=30)
        c.execute("PRAGMA busy_timeout=30000")
        with c:
            for row in rows:
                cols = ", ".join(row)
                c.execute(f"INSERT INTO unstamped({cols}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))
        c.close()

    insert([{"event_type": "feature_created", "aggregate_type": "feature",
             "aggregate_id": "F-1", "payload": '{"title": "Login"}'},
            {"event_type": "feature_created", "aggregate_type": "feature", "aggregate_id": "F-2"},
            {"event_type": "feature_updated", "aggregate_type": "feature", "aggregate_id": "F-1",
             "payload": '{"title": "Login v2"}', "event_id": given,
             "timestamp": "2026-01-31T12:00:00Z"}])
    run("sk-stamp", home=home)
    first = log(home)
    assert [e["aggregate_id"] for e in first] == ["F-1", "F-2", "F-1"]
    assert all(e["status"] == "queued" for e in first)
    clocks = [e["lamport_clock"] for e in first]
    assert clocks == sorted(clocks) and len(set(clocks)) == 3 and clocks[0] >= 1
    nodes = {e["node_id"] for e in first}
    assert len(nodes) == 1 and nodes != {""}
    assert first[2]["event_id"] == given and first[2]["timestamp"] == "2026-01-31T12:00:00Z"
    assert first[1]["payload"] == {}
    for e in first:
        assert str(uuid.UUID(e["event_id"])) == e["event_id"]
        assert set(FIELDS) <= set(e)
    assert unstamped_count(home) == 0

    # idempotent: nothing unstamped -> nothing changes
    run("sk-stamp", home=home)
    run("sk-stamp", home=home)
    assert log(home) == first

    # later rows: same node, higher clocks; a row with a known event_id is dropped
    insert([{"event_type": "feature_deleted", "aggregate_type": "feature", "aggregate_id": "F-2"},
            {"event_type": "feature_updated", "aggregate_type": "feature", "aggregate_id": "F-1",
             "payload": '{"title": "Login v2"}', "event_id": given}])
    run("sk-stamp", home=home)
    second = log(home)
    assert second[:3] == first and len(second) == 4
    assert second[3]["node_id"] in nodes
    assert second[3]["lamport_clock"] > max(clocks)
    assert unstamped_count(home) == 0
    run("sk-resolve", home=home)
    assert state(home) == {"feature": {"F-1": {"title": "Login v2"}}}

    # a row that breaks a rule stays put and is reported (exit 1)
    insert([{"event_type": "Bad Type!", "aggregate_type": "feature", "aggregate_id": "F-3"}])
    p = run("sk-stamp", home=home, code=1)
    assert "row" in p.stderr
    assert unstamped_count(home) == 1 and len(log(home)) == 4


# -- never-sync ----------------------------------------------------------------
def test_never_sync_stays_local(server, device):
    a, b = device("a"), device("b")
    secret_ids = ["smtp_password", "db.password", "x.tokens", "secrets", "github_pat"]
    env = dict(os.environ, SK_NEVER_SYNC="feature:private-*")
    append(a, [ev("setting_changed", f"setting:{i}", {"value": f"hunter2-{i}"})
               for i in secret_ids]
           + [ev("setting_changed", "setting:theme", {"value": "dark"}),
              ev("feature_created", "feature:private-1", {"title": "hidden"}),
              ev("feature_created", "feature:public-1", {"title": "shown"})])
    sync(a, env=env)
    sync(b)
    la = {(e["aggregate_type"], e["aggregate_id"]): e["status"] for e in log(a)}
    for i in secret_ids:
        assert la[("setting", i)] == "local_only", la
    assert la[("feature", "private-1")] == "local_only"
    assert la[("setting", "theme")] == "sent" and la[("feature", "public-1")] == "sent"
    assert status(a)["local_only"] == 6
    # resolved locally on A
    sa = state(a)
    assert sa["setting"]["smtp_password"] == {"value": "hunter2-smtp_password"}
    assert sa["feature"]["private-1"] == {"title": "hidden"}
    # never on the server, never on B
    on_server = {(t, i) for t, i, _ in server_rows(server)}
    assert on_server == {("setting", "theme"), ("feature", "public-1")}
    lb = {(e["aggregate_type"], e["aggregate_id"]) for e in log(b)}
    assert lb == {("setting", "theme"), ("feature", "public-1")}
    assert state(b) == {"setting": {"theme": {"value": "dark"}},
                        "feature": {"public-1": {"title": "shown"}}}
    dump = run("sk-log", home=b).stdout + json.dumps(state(b))
    assert "hunter2" not in dump and "hidden" not in dump
    # later syncs do not leak them either
    sync(a, env=env)
    sync(b)
    assert server_count(server) == 2


# -- sk-pull ---------------------------------------------------------------------
@pytest.mark.one_backend
def test_pull_print_and_paging(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", f"feature:F-{i}", {"n": i}) for i in range(50)])
    sync(a)
    ids = {e["event_id"] for e in log(a)}
    assert len(ids) == 50
    p = run("sk-pull", "--print", "--page-size", "7", home=b)
    printed = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(printed) == 50
    assert {e["event_id"] for e in printed} == ids
    for e in printed:
        assert set(FIELDS) <= set(e)
    m = re.search(r"in (\d+) page", p.stderr)
    assert m and int(m.group(1)) >= 8, p.stderr
    assert {e["event_id"] for e in log(b)} == ids
    assert all(e["status"] == "remote" for e in log(b))
    # at the end: nothing more, still exit 0
    again = run("sk-pull", "--print", "--json", home=b)
    assert again.stdout.strip() == ""
    j = json.loads(run("sk-pull", "--json", "--page-size", "7", home=b).stdout)
    assert j["new"] == 0 and j["received"] == 0
    # --since 0 re-reads everything and stores nothing new
    j = json.loads(run("sk-pull", "--json", "--since", "0", "--page-size", "7", home=b).stdout)
    assert j["received"] == 50 and j["new"] == 0 and j["pages"] >= 8
    run("sk-resolve", home=b)
    assert state(a) == state(b)
    run("sk-pull", "--page-size", "0", home=b, code=2)


# -- sk-push-batch ---------------------------------------------------------------
@pytest.mark.one_backend
def test_push_batch_max_and_all(server, device):
    a = device("a")
    append(a, [ev("feature_created", f"feature:F-{i}", {"n": i}) for i in range(25)])
    run("sk-stamp", home=a)
    one = json.loads(run("sk-push-batch", "--max", "10", "--json", home=a).stdout)
    assert one["accepted"] == 10 and one["queued"] == 15 and one["rejected"] == 0
    assert server_count(server) == 10
    assert len(log(a, "--status", "sent")) == 10 and len(log(a, "--status", "queued")) == 15
    # the ten oldest went first
    assert [e["aggregate_id"] for e in log(a, "--status", "sent")] == [f"F-{i}" for i in range(10)]
    rest = json.loads(run("sk-push-batch", "--all", "--max", "4", "--json", home=a).stdout)
    assert rest["accepted"] == 15 and rest["queued"] == 0
    assert server_count(server) == 25
    assert log(a, "--status", "queued") == []
    none = json.loads(run("sk-push-batch", "--all", "--json", home=a).stdout)
    assert none["accepted"] == 0 and none["queued"] == 0
    run("sk-push-batch", "--max", "1001", home=a, code=2)


# -- setup and status --------------------------------------------------------------
@pytest.mark.one_backend
def test_setup_status_and_check(server, tmp_path):
    home = tmp_path / "dev-setup"
    key = server.register("setup-dev", "red")
    # a well-formed key the server does not know: exit 4, nothing written
    unknown = "sk1.0123456789abcdef." + "A" * 43
    p = run("sk", "sync", "setup", "--server", server.url, "--key", unknown, home=home, code=4)
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (home / ".env").exists()
    # not a key at all: a usage/config error, nothing written
    run("sk", "sync", "setup", "--server", server.url, "--key", "nonsense", home=home, code=2)
    assert not (home / ".env").exists()
    # no terminal and no flags: a clear usage error
    run("sk", "sync", "setup", home=home, input="", code=2)
    assert not (home / ".env").exists()
    # the good key
    p = run("sk", "sync", "setup", "--server", server.url, "--key", key, home=home)
    env_file = home / ".env"
    assert env_file.exists()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text()
    assert server.url in text and key in text

    append(home, [ev("feature_created", "feature:F-1"), ev("feature_created", "feature:F-2")])
    run("sk-stamp", home=home)
    info = status(home)
    for k in ("server", "config", "node_id", "queued", "rejected", "local_only", "unstamped",
              "oldest_queued", "last_success", "failures_since", "last_error"):
        assert k in info, (k, info)
    assert info["server"] == server.url
    assert info["config"] == str(env_file)
    assert info["queued"] == 2 and info["rejected"] == 0 and info["unstamped"] == 0
    assert info["oldest_queued"] and info["last_success"] is None
    assert info["failures_since"] == 0
    node = info["node_id"]
    assert {e["node_id"] for e in log(home)} == {node}

    sync(home)
    info = status(home, "--check")
    assert info["connection"] == "Connected" and info["queued"] == 0
    assert info["last_success"] and info["failures_since"] == 0 and info["node_id"] == node
    p = run("sk", "sync", "status", "--check", home=home)
    assert "Connected" in p.stdout and "setup-dev" in p.stdout
    assert re.search(r"failures since:\s*0", p.stdout), p.stdout
    assert node in p.stdout


# -- dispatch and help ---------------------------------------------------------------
def test_dispatch_and_help():
    home = os.environ["SK_HOME"]
    append(home, [ev("feature_created", "feature:F-1", {"a": 1})])
    run("sk", "stamp", home=home)
    direct = run("sk-log", home=home).stdout
    assert direct.strip() and json.loads(direct)["aggregate_id"] == "F-1"
    assert run("sk", "log", home=home).stdout == direct
    assert run("sk", "log", "--status", "queued", home=home).stdout == direct
    assert run("sk", "state", home=home).stdout == run("sk-state", home=home).stdout
    p = run("sk", "nosuch", code=2)
    assert "nosuch" in p.stderr
    h = run("sk", "--help").stdout
    assert "porcelain" in h and "plumbing" in h
    for name in ("sync", "server", "append", "stamp", "push-batch", "pull", "resolve",
                 "state", "log", "register", "admin"):
        assert re.search(rf"^\s+{re.escape(name)}\s", h, re.M), name
    assert "usage" in run("sk", "log", "--help").stdout
    p = subprocess.run([sys.executable, "-m", "sk_server", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "usage" in p.stdout and "--port" in p.stdout and "--db" in p.stdout


# -- sk-register and teams ---------------------------------------------------------------
@pytest.mark.one_backend
def test_register_list_and_team_isolation(server, device, tmp_path):
    # the key alone on stdout
    p = run("sk-register", "--name", "solo", "--team", "green", "--db", server.db)
    assert KEY_RE.match(p.stdout.strip()) and len(p.stdout.strip().splitlines()) == 1
    assert p.stdout.strip() not in p.stderr
    # the server does not hold the key in plaintext
    raw = (repr(query(server.db, "SELECT * FROM keys")).encode() if is_pg(server.db)
           else open(server.db, "rb").read())
    assert p.stdout.strip().encode() not in raw
    run("sk-register", "--name", "solo", "--db", server.db, code=2)   # name taken

    a, b, c = device("a", "red"), device("b", "blue"), device("c", "red")
    append(a, [ev("feature_created", "feature:RED-1", {"team": "red"}),
               ev("feature_created", "feature:RED-2", {"team": "red"})])
    sync(a)
    out_b = sync(b).stdout
    assert counts_line(out_b)["pulled"] == 0
    assert log(b) == [] and state(b) == {}
    assert run("sk-pull", "--since", "0", "--print", home=b).stdout.strip() == ""
    assert counts_line(sync(c).stdout)["pulled"] == 2
    append(b, [ev("feature_created", "feature:BLUE-1", {"team": "blue"})])
    sync(b)
    sync(a)
    sync(c)
    for home in (a, c):
        assert {e["aggregate_id"] for e in log(home)} == {"RED-1", "RED-2"}
    assert {e["aggregate_id"] for e in log(b)} == {"BLUE-1"}
    teams = {e["aggregate_id"]: e["team"] for e in opened_log(server)}
    assert teams == {"RED-1": "red", "RED-2": "red", "BLUE-1": "blue"}

    run("sk-register", "--revoke", "c", "--db", server.db)
    lines = run("sk-register", "--list", "--db", server.db).stdout.splitlines()
    assert lines[0].split() == ["name", "team", "created", "last_seen", "revoked", "fingerprint"]
    rows = {r.split()[0]: r.split() for r in lines[1:]}
    assert set(rows) == {"solo", "a", "b", "c"}
    assert rows["a"][1] == "red" and rows["b"][1] == "blue" and rows["solo"][1] == "green"
    for name in ("a", "b", "c", "solo"):
        assert re.match(r"\d{4}-\d\d-\d\d", rows[name][2]), rows[name]
    assert re.match(r"\d{4}-\d\d-\d\d", rows["a"][3]), rows["a"]      # seen
    assert rows["solo"][3] == "-"                                      # never seen
    assert rows["a"][4] == "-" and re.match(r"\d{4}-\d\d-\d\d", rows["c"][4])
    js = [json.loads(x) for x in
          run("sk-register", "--list", "--json", "--db", server.db).stdout.splitlines()]
    assert {d["name"] for d in js} == {"solo", "a", "b", "c"}
    for d in js:
        assert {"name", "team", "created", "last_seen", "revoked"} <= set(d)
    check_server_log(server)


# -- sk-admin ------------------------------------------------------------------------------
def test_admin_backup(server, device, tmp_path):
    a, b = device("a"), device("b", "other")
    append(a, [ev("feature_created", f"feature:F-{i}", {"n": i}) for i in range(12)])
    append(b, [ev("feature_created", "feature:X-1")])
    sync(a)
    sync(b)
    dest = tmp_path / "backup.db"
    stats = json.loads(run("sk-admin", "--json", "--db", server.db, "stats").stdout)
    assert stats["events"] == 13
    if is_pg(server.db):
        p = run("sk-admin", "--db", server.db, "backup", "--to", dest, code=2)
        assert "pg_dump" in p.stderr and not dest.exists()
        return
    run("sk-admin", "--db", server.db, "backup", "--to", dest)
    assert dest.exists()
    c = sqlite3.connect(f"file:{dest}?mode=ro", uri=True)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n = c.execute("SELECT count(*) FROM events").fetchone()[0]
        ids = {r[0] for r in c.execute("SELECT event_id FROM events")}
    finally:
        c.close()
    assert n == server_count(server) == 13
    assert ids == {r[2] for r in server_rows(server)}
    # never overwrites
    p = run("sk-admin", "--db", server.db, "backup", "--to", dest, code=2)
    assert "exist" in p.stderr
