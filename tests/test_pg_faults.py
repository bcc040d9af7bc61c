"""PostgreSQL going away under a running `sk server`: devices get a clear
"unavailable" (exit 3) with their queue kept, the server does not need a restart,
and the next sync after the database is back moves everything exactly once."""

import json

import pytest

from conftest import ServerProcess, query, run, wait_until

pytestmark = pytest.mark.slow   # real servers, real PostgreSQL


def probe(srv, path):
    """(status, JSON) of an unauthenticated GET, as a load balancer's health check."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def append(home, tag, n):
    run("sk-append", home=home, input="".join(
        json.dumps({"event_type": "note_created", "aggregate_type": "note",
                    "aggregate_id": f"{tag}-{i}"}) + "\n" for i in range(n)))


def test_database_down_then_back(own_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SK_SERVER_SECRET_FILE", str(tmp_path / "server.secret"))
    db = own_cluster.create_database("sk")
    srv = ServerProcess(db, log=tmp_path / "server.log").start()
    try:
        homes = []
        for name in ("a", "b"):
            home = tmp_path / name
            run("sk", "sync", "setup", "--server", srv.url, "--key", srv.register(name), home=home)
            homes.append(home)
        a, b = homes
        append(a, "before", 10)
        run("sk", "sync", home=a)
        assert probe(srv, "/readyz") == (200, {"ok": True, "database": "ok"})
        own_cluster.stop()                        # the database goes away
        # alive, but not ready: a load balancer sends its traffic elsewhere
        assert probe(srv, "/healthz")[0] == 200
        assert probe(srv, "/readyz") == (503, {"ok": False, "database": "unavailable"})
        append(a, "during", 5)
        p = run("sk", "sync", home=a, code=3)
        assert "database is unavailable" in p.stderr and "Traceback" not in p.stderr
        assert json.loads(run("sk", "sync", "status", "--json", home=a,
                                 code=1).stdout)["queued"] == 5
        run("sk", "sync", "status", "--check", home=b, code=3)
        own_cluster.start()                       # back, same data, same port
        wait_until(lambda: probe(srv, "/readyz")[0] == 200, 20, "readiness after the outage")
        run("sk", "sync", home=a)                 # the same server process serves again
        run("sk", "sync", home=b)
        ids = [r[0] for r in query(db, "SELECT event_id FROM events ORDER BY seq")]
        assert len(ids) == len(set(ids)) == 15
        assert [r[0] for r in query(db, "SELECT seq FROM events ORDER BY seq")] == list(range(1, 16))
        for home in (a, b):
            logged = {json.loads(x)["event_id"] for x in run("sk-log", home=home).stdout.splitlines()}
            assert logged == set(ids)
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.stop()
