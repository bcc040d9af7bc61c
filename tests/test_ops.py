"""Operations (issue 15) and the server host's rough edges (issue 16): Prometheus
metrics from a real `sk server --metrics` during a sync, parsed with
prometheus_client's own parser; sk-admin status giving the same figures;
sk-admin verify catching an altered row; readiness and sk_database_up when
PostgreSQL stops; JSON request lines; sk-register and sk server refusing to
make databases by mistake; the Grafana dashboard; the benchmarks' plots."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import (ROOT, ServerProcess, alter, append, begin_epoch, command, ev, free_port,
                      is_pg, run, sealed_batch, share_key, sync, wait_until)

SK = "sk-admin"


def scrape(port):
    """{(name, frozenset(labels)): value} of every sample at /metrics, and the
    families' names, parsed as Prometheus parses them."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
        text = r.read().decode()
    samples, families = {}, set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def setup_device(srv, home, name, team="default"):
    key = srv.register(name, team)
    run("sk", "sync", "setup", "--server", srv.url, "--key", key, home=home)
    srv.homes.append(home)
    srv.teams[home] = team
    share_key(srv, team)
    return key


def notes(tag, n):
    return [ev("note_created", f"note:{tag}-{i}", {"i": i}) for i in range(n)]


@pytest.mark.slow
def test_metrics_status_and_request_lines_during_a_sync(server_db, tmp_path):
    mport = free_port()
    srv = ServerProcess(server_db, extra=["--metrics", f"127.0.0.1:{mport}", "--log-format",
                                          "json"]).start()
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        keys = [setup_device(srv, a, "a"), setup_device(srv, b, "b")]
        before, _ = scrape(mport)
        append(a, notes("one", 5))
        sync(a)
        sync(b)
        t = time.perf_counter()
        mid, families = scrape(mport)
        took = time.perf_counter() - t
        # counters move by exactly the events synced: 5 pushed by a, 5 pulled by b (a's
        # own come back to it as ids only)
        for name in ("sk_events_pushed_total", "sk_events_pulled_total"):
            assert value(mid, name, team="default") - value(before, name, team="default") == 5
        assert value(mid, "sk_team_head_seq", team="default") == 5
        append(a, notes("two", 3))
        sync(a)
        append(a, notes("three", 2))
        run("sk-stamp", "-q", home=a)
        run("sk-pull", "-q", home=a)          # says it holds 2 queued
        after, families = scrape(mport)
        assert value(after, "sk_events_pushed_total", team="default") - \
            value(before, "sk_events_pushed_total", team="default") == 8
        assert value(after, "sk_team_head_seq", team="default") == 8
        assert value(after, "sk_device_lag_events", team="default", device="b") == 3
        assert value(after, "sk_device_lag_events", team="default", device="a") == 0
        assert value(after, "sk_device_queue_events", team="default", device="a") == 2
        assert value(after, "sk_device_queue_events", team="default", device="b") == 0
        assert value(after, "sk_database_up") == 1
        assert value(after, "sk_snapshots", team="default") == 0
        # request durations by route name, never by path
        assert value(after, "sk_request_duration_seconds_count", endpoint="api.push",
                     status="200") == 2   # the two syncs of a that had events
        endpoints = {dict(k[1]).get("endpoint") for k in after if "endpoint" in dict(k[1])}
        assert endpoints and all(re.fullmatch(r"[a-z_]+\.[a-z_]+", e) for e in endpoints), endpoints
        # every family exported is one the docs and the dashboard may name, and back
        from sk_server import ops
        assert families == set(ops.EXPORTED) - {"sk_auth_failures", "sk_ws_sessions",
                                                 "sk_events_rejected"}, families

        # sk-admin status --json: the same figures, from the same function
        status = json.loads(srv.admin(SK, "status", "--json").stdout)
        assert [t["head"] for t in status["teams"]] == [8]
        assert status["teams"][0]["events"] == 8
        for d in status["devices"]:
            labels = {"team": d["team"], "device": d["device"]}
            assert d["lag"] == value(after, "sk_device_lag_events", **labels)
            assert d["queued"] == value(after, "sk_device_queue_events", **labels)
            seen = value(after, "sk_device_last_seen_timestamp_seconds", **labels)
            from datetime import datetime
            assert datetime.fromisoformat(d["last_seen"].replace("Z", "+00:00")).timestamp() == seen
        text = srv.admin(SK, "status").stdout
        assert re.search(r"^b\s+default\s+\S+\s+3\s+0\s+-$", text, re.M), text

        # a key the server does not know: failed authentications, by reason
        from sk import crypto
        stray = crypto.new_api_key()[1]
        run("sk-pull", home=tmp_path / "c", env={**os.environ, "SK_SERVER": srv.url,
                                                 "SK_API_KEY": stray}, code=4)
        late, families = scrape(mport)
        assert value(late, "sk_auth_failures_total", reason="unknown_key") >= 1
        assert "sk_auth_failures" in families

        # a watcher on a: a session counted on its team; it pushes a's 2 queued events
        # and says so (the queue gauge falls to 0); SIGTERM closes it at once
        w = subprocess.Popen([command("sk"), "sync", "watch"], env={**os.environ, "SK_HOME": str(a)},
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            wait_until(lambda: value(scrape(mport)[0], "sk_ws_sessions", team="default") == 1,
                       30, "the watcher's session in the metrics")
            # (the queue is kept in the push's transaction, the counter moved just after
            # it: a scrape between the two sees one without the other)
            pushed = lambda m: value(m, "sk_events_pushed_total", team="default") - \
                value(before, "sk_events_pushed_total", team="default")  # noqa: E731
            live = wait_until(lambda: (lambda m: m if value(
                m, "sk_device_queue_events", team="default", device="a") == 0
                and pushed(m) >= 10 else None)(scrape(mport)[0]), 30,
                "a's queue to drain through the watcher")
            assert pushed(live) == 10
            assert value(live, "sk_device_lag_events", team="default", device="b") == 5
            assert get(srv.port, "/metrics")[0] == 404      # never on the API's port
            # a wrong URL: one sk line, naming the root
            p = run("sk-pull", home=a, env={**os.environ, "SK_SERVER": srv.url + "/api"}, code=5)
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
            assert "no sk server at" in p.stderr and "HTTP 404" in p.stderr
            assert "requested URL" not in p.stderr
            t0 = time.monotonic()
            srv.stop()
            stopped = time.monotonic() - t0
        finally:
            w.kill()
            w.wait(10)
        print(f"\nscrape {took * 1000:.1f} ms; stop with a watcher {stopped:.2f} s")
        # measured 0.2-0.5 s (it was ~6 s: gunicorn's graceful timeout, then more)
        assert stopped < 2.0, f"sk server took {stopped:.2f} s to stop with a watcher"

        # one JSON line per request, with no key, token or body in it
        lines = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        assert len(lines) > 10
        fields = {"time", "request_id", "method", "endpoint", "path", "status", "duration_ms",
                  "team", "device", "remote"}
        assert all(set(x) == fields for x in lines)
        pushes = [x for x in lines if x["endpoint"] == "api.push"]
        assert pushes and all(x["device"] == "a" and x["team"] == "default" for x in pushes)
        assert len({x["request_id"] for x in lines}) == len(lines)
        ws = [x for x in lines if x["endpoint"] == "ws.session"]
        assert ws and all("token" not in x["path"] for x in ws)
        log_text = srv.log.read_text()
        for secret in keys + [stray]:
            assert secret not in log_text and secret.split(".")[-1] not in log_text
        assert "note_created" not in log_text and "three-" not in log_text
    finally:
        srv.stop()


@pytest.mark.slow
def test_readiness_and_database_up_follow_postgresql(own_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SK_SERVER_SECRET_FILE", str(tmp_path / "server.secret"))
    db = own_cluster.create_database("sk")
    mport = free_port()
    srv = ServerProcess(db, extra=["--metrics", f"127.0.0.1:{mport}"],
                        log=tmp_path / "server.log").start()
    try:
        assert get(srv.port, "/readyz")[0] == 200
        assert value(scrape(mport)[0], "sk_database_up") == 1
        own_cluster.stop()
        t0 = time.monotonic()
        status, body = get(srv.port, "/readyz")
        assert (status, json.loads(body)) == (503, {"ok": False, "database": "unavailable"})
        assert get(srv.port, "/healthz")[0] == 200
        assert value(scrape(mport)[0], "sk_database_up") == 0     # the scrape still answers
        took = time.monotonic() - t0    # both, soon: not after the pool's 10 s wait (or a
        print(f"readiness and a scrape with PostgreSQL down: {took:.1f} s")  # check's timeout)
        assert took < 8, took
        own_cluster.start()
        wait_until(lambda: get(srv.port, "/readyz")[0] == 200, 90, "readiness after the outage")   # the pool reconnects
        assert value(scrape(mport)[0], "sk_database_up") == 1
    finally:
        srv.stop()


def test_a_database_file_moved_away_is_not_made_again_empty(tmp_path):
    """The SQLite file moved away under a running server: no thread makes a new empty
    database in its place (a server then answering from nothing); readiness says
    503 or 200 (a thread still holding the moved file), never an internal error."""
    db = tmp_path / "server.db"
    srv = ServerProcess(str(db), log=tmp_path / "server.log").start()
    try:
        assert get(srv.port, "/readyz")[0] == 200
        gone = tmp_path / "moved"
        gone.mkdir()
        for f in tmp_path.glob("server.db*"):
            f.rename(gone / f.name)
        codes = {get(srv.port, "/readyz")[0] for _ in range(40)}
        assert codes <= {200, 503}, codes
        assert not db.exists(), "a new, empty server.db was made"
    finally:
        srv.stop()


# -- sk-admin verify and status, on the store (no server) -------------------------------
def fill(store, team, device, n, per=500):
    """A device of a new team, its key epoch begun, and n events it pushed."""
    from sk.event import check_stamped
    from sk_server.devices import register
    register(store, device, team)
    begin_epoch(store, team, device)
    for start in range(0, n, per):
        events = [check_stamped({
            "event_id": str(uuid.uuid4()), "event_type": "note_created", "aggregate_type": "note",
            "aggregate_id": f"n{i}", "lamport_clock": i + 1, "node_id": f"node-{device}",
            "payload": {}, "timestamp": "2026-01-01T00:00:00Z"}) for i in range(start, min(n, start + per))]
        stored = store.push(team, device, sealed_batch(team, events))
        assert {s for s, _ in stored.results} == {"accepted"}


def test_verify_catches_an_altered_row_and_a_missing_one(server_db, tmp_path):
    from sk_server.store import open_store
    run(SK, "--db", server_db, "init")
    store = open_store(server_db)
    fill(store, "red", "r1", 1200)
    fill(store, "blue", "b1", 40)
    store.close()
    t = time.perf_counter()
    p = run(SK, "--db", server_db, "verify", "--json")
    took = time.perf_counter() - t
    assert [(x["team"], x["head"], x["checked"], x["seq"]) for x in map(json.loads, p.stdout.splitlines())] \
        == [("blue", 40, 40, None), ("red", 1200, 1200, None)]
    print(f"\nverify: 1240 events in {took:.2f} s (the command, start to end)")
    # a hand-edited row: its event id replaced
    alter(server_db, "UPDATE events SET event_id = ? WHERE team = 'red' AND seq = 1034",
          (str(uuid.uuid4()),))
    p = run(SK, "--db", server_db, "verify", code=5)
    assert "team 'red'" in p.stderr and "seq 1034" in p.stderr, p.stderr
    assert "blue" not in p.stderr
    # a restore that lost a row
    alter(server_db, "DELETE FROM events WHERE team = 'blue' AND seq = 7")
    p = run(SK, "--db", server_db, "verify", "--json", code=5)
    bad = {x["team"]: x["seq"] for x in map(json.loads, p.stdout.splitlines())}
    assert bad == {"blue": 7, "red": 1034}
    assert "team 'blue'" in p.stderr.splitlines()[-1] and "seq 7" in p.stderr.splitlines()[-1]


@pytest.mark.parametrize("attack", ["moved-body", "manifest-as-text", "chain-as-text",
                                    "idx-as-text", "id-as-blob", "team-chain"])
def test_verify_catches_a_body_moved_or_a_cell_altered_at_rest(server_db, attack):
    """What the chain does not cover: a sealed body served for another event (rows
    pointing at each other's manifest entries), and cells no longer of their type
    (SQLite keeps any): named with their seq, never a traceback."""
    from sk_server.store import open_store
    if attack not in ("moved-body", "team-chain") and is_pg(server_db):
        pytest.skip("a PostgreSQL column keeps its type: only SQLite stores text in a BLOB")
    run(SK, "--db", server_db, "init")
    store = open_store(server_db)
    fill(store, "red", "r1", 30, per=10)
    store.close()
    sql = {"moved-body": "UPDATE events SET idx = 9 - idx WHERE team = 'red' AND batch = 2",
           "manifest-as-text": "UPDATE batches SET manifest = 'sk/2 manifest' WHERE team = 'red'"
                               " AND batch = 3",
           "chain-as-text": "UPDATE events SET chain = CAST(chain AS TEXT) WHERE team = 'red'"
                            " AND seq = 12",
           "idx-as-text": "UPDATE events SET idx = 'x' WHERE team = 'red' AND seq = 25",
           "id-as-blob": "UPDATE events SET event_id = CAST(event_id AS BLOB) WHERE team = 'red'"
                         " AND seq = 17",
           # not mended quietly when the store is opened: named
           "team-chain": "UPDATE teams SET chain = ? WHERE team = 'red'"}[attack]
    alter(server_db, sql, *([(bytes(32),)] if "?" in sql else []))
    p = run(SK, "--db", server_db, "verify", "--json", code=5)
    (got,) = map(json.loads, p.stdout.splitlines())
    assert got["seq"] == {"moved-body": 11, "manifest-as-text": 21, "chain-as-text": 12,
                          "idx-as-text": 25, "id-as-blob": 17, "team-chain": 30}[attack], got
    assert "Traceback" not in p.stderr and "team 'red'" in p.stderr, p.stderr


def test_verify_walks_in_bounded_chunks(server_db):
    from sk_server.store import open_store
    store = open_store(server_db)
    fill(store, "t", "d", 120, per=60)
    assert [x["seq"] for x in store.verify(chunk=7)] == [None]
    alter(server_db, "UPDATE events SET chain = ? WHERE team = 't' AND seq = 120", (bytes(32),))
    assert [(x["seq"], x["checked"]) for x in store.verify(chunk=7)] == [(120, 119)]
    store.close()


def test_status_figures_come_from_what_devices_report(server_db):
    from sk_server.store import open_store
    store = open_store(server_db)
    fill(store, "t", "d", 10)
    from sk_server.devices import register
    register(store, "e", "t")
    store.note_device("d", pulled=10, queued=4)
    store.note_device("e", pulled=6)
    store.note_device("e", pulled=3, end=False)    # a page of old history: no step back
    s = store.status()
    assert s["teams"] == [{"team": "t", "head": 10, "events": 10, "snapshots": 0, "epoch": 1}]
    assert [(d["device"], d["pulled"], d["lag"], d["queued"]) for d in s["devices"]] == \
        [("d", 10, 0, 4), ("e", 6, 4, None)]
    store.note_device("e", pulled=2)                  # the end of a pull (sk-pull --since 2)
    assert store.status(events=False)["devices"][1]["lag"] == 8
    assert "events" not in store.status(events=False)["teams"][0]
    store.close()


def test_an_older_database_gets_the_new_columns(tmp_path):
    import sqlite3

    from sk_server.store import open_store
    db = tmp_path / "old.db"
    open_store(db).close()
    c = sqlite3.connect(db)
    # the devices table as sk 0.3.0 made it: no pulled, no queued
    c.executescript("CREATE TABLE d0 AS SELECT name, team, created, last_seen, revoked, identity,"
                    " approval FROM devices; DROP TABLE devices; ALTER TABLE d0 RENAME TO devices;")
    assert "queued" not in {r[1] for r in c.execute("PRAGMA table_info(devices)")}
    c.close()
    store = open_store(db)
    fill(store, "t", "d", 3)
    store.note_device("d", pulled=3, queued=1)
    assert [(d["lag"], d["queued"]) for d in store.status()["devices"]] == [(0, 1)]
    store.close()


# -- databases made only on purpose (issue 16) --------------------------------------------
def one_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_register_never_creates_a_database(tmp_path):
    typo = tmp_path / "typo" / "server.db"
    line = one_line(run("sk-register", "--name", "x", "--db", typo, code=2))
    assert str(typo) in line and "sk-admin init" in line and "sk server --db" in line
    assert not typo.parent.exists()
    missing = tmp_path / "missing.db"
    run("sk-register", "--name", "x", "--db", missing, code=2)
    assert not list(tmp_path.glob("missing*"))
    # on a device, without --db or SK_SERVER_DB: nothing in $SK_HOME
    home = Path(os.environ["SK_HOME"])
    run("sk-register", "--name", "x", code=2)
    assert not (home / "server.db").exists() and not (home / "server.secret").exists()
    # sk-admin init makes the database and its secret; then sk-register works
    db = tmp_path / "srv.db"
    p = run(SK, "--db", db, "init")
    assert db.exists() and (tmp_path / "srv.secret").exists() and "created" in p.stderr
    assert run("sk-register", "--name", "x", "--db", db).stdout.startswith("sk1.")
    assert "exists already" in run(SK, "--db", db, "init").stderr


def test_a_db_path_that_is_not_a_database_is_named_for_what_it_is(tmp_path):
    adir = tmp_path / "adir"
    adir.mkdir()
    for cmd in (["sk-register", "--list", "--db"], [SK, "stats", "--db"],
                [SK, "status", "--db"], ["sk", "server", "--port", str(free_port()), "--db"]):
        line = one_line(run(*cmd, adir, code=2))
        assert "is a directory" in line and "secret" not in line, line
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    line = one_line(run("sk-register", "--list", "--db", text, code=2))
    assert "not a server database" in line and "secret" not in line
    other = tmp_path / "other.db"
    import sqlite3
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE mine (x)")
    line = one_line(run(SK, "--db", other, "status", code=2))
    assert "not an sk server's" in line
    assert not list(tmp_path.glob("*.secret"))


def test_server_on_a_busy_port_leaves_nothing_behind(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for extra in ([], ["--metrics", f"127.0.0.1:{free_port()}"]):
            line = one_line(run("sk", "server", "--port", port, "--db", tmp_path / "new.db",
                                *extra, code=2, timeout=20))
            assert f"127.0.0.1:{port}" in line
        line = one_line(run("sk", "server", "--port", free_port(), "--db", tmp_path / "new.db",
                            "--metrics", f"127.0.0.1:{port}", code=2, timeout=20))
        assert f"127.0.0.1:{port}" in line
    assert not list(tmp_path.glob("new*"))


@pytest.mark.slow
def test_port_0_is_printed_and_the_control_socket_is_beside_the_database(tmp_path):
    db = tmp_path / "srv.db"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([command("sk"), "server", "--port", "0", "--db", str(db)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def port():
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)",
                          (tmp_path / "server.log").read_text())
            return m and int(m.group(1))
        p = wait_until(port, 20, "the port in the server's output")
        wait_until(lambda: get(p, "/healthz")[0] == 200 if _open(p) else False, 20, "healthz")
        wait_until(lambda: (tmp_path / "srv.ctl").exists(), 10, "the control socket")
        assert not (Path(os.environ["HOME"]) / ".gunicorn").exists()
        status, body = get(p, "/no/such/path")
        assert status == 404 and json.loads(body)["error"] == {
            "code": "not_found", "message": "no sk endpoint at '/no/such/path'"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log.close()


def _open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- the dashboard and the plots ------------------------------------------------------------
def test_grafana_dashboard_uses_only_exported_metrics():
    from sk_server import ops
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    used = set()
    for e in exprs:
        used |= set(re.findall(r"\bsk_[a-z_]+", e))
    known = set()
    for name in ops.EXPORTED:
        known |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert used and used <= known, used - known
    # every metric the server exports is on the dashboard
    assert {n for n in ops.EXPORTED if not any(u.startswith(n) for u in used)} == set()


def test_bench_plots_are_written_from_a_table(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import plots
    png = plots.scale([{"label": "sqlite", "servers": 1, "push": 9000.0, "pull": 15000.0},
                       {"label": "pg", "servers": 2, "push": 12000.0, "pull": 21000.0}],
                      tmp_path)
    assert png and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = plots.watch([{"label": "2", "median": 3.5, "p99": 9.0, "max": 12.0}], tmp_path / "w")
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if not installed
    assert plots.scale([{"label": "x", "servers": 1, "push": 1, "pull": 1}], tmp_path / "n") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
