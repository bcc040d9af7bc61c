"""End-to-end fault injection: the exit codes of the SPEC against a stopped server,
revoked and rotated keys, wrong URLs, and HTTP proxies that tamper with responses
or refuse large requests."""

import base64
import http.client
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import (

    HTTPServerThread,
    QuietHandler,
    append,
    check_server_log,
    counts_line,
    ev,
    free_port,
    log,
    run,
    server_count,
    server_rows,
    state,
    status,
    sync,
)

pytestmark = pytest.mark.one_backend   # device-side: see conftest

SEALED = "application/vnd.sk.sealed"


def not_sk(code):
    """An HTTP server that is not sk: answers everything with HTML and `code`."""
    class H(QuietHandler):
        def do_POST(self):
            self._body()
            self._reply(code, b"<html><body><h1>Hello</h1></body></html>", "text/html")
        do_GET = do_POST
    return HTTPServerThread(H)


def proxy(upstream_port, flip=False, max_body=None):
    """An HTTP proxy to the sk server. flip: flip one byte in the middle of every
    200 response body. max_body: answer 413 (HTML) to request bodies over it."""
    seen = []   # (request body bytes, status answered)

    class H(QuietHandler):
        def do_POST(self):
            body = self._body()
            if max_body is not None and len(body) > max_body:
                seen.append((len(body), 413))
                self._reply(413, b"<html><body><h1>413 Request Entity Too Large</h1>"
                                 b"</body></html>", "text/html")
                return
            up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length",
                                                "keep-alive")}
                up.request("POST", self.path, body, headers)
                r = up.getresponse()
                data, ctype = r.read(), r.getheader("Content-Type", "")
                if flip and r.status == 200 and data:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x5A
                    data = bytes(data)
                seen.append((len(body), r.status))
                self._reply(r.status, data, ctype)
            finally:
                up.close()

    srv = HTTPServerThread(H)
    srv.seen = seen
    return srv


def one_line(p):
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, f"wanted one line on stderr, got:\n{p.stderr}"
    return lines[0]


# -- server stopped, then back -------------------------------------------------------
def test_unreachable_keeps_queue_then_recovers(server, device):
    a = device("a")
    append(a, [ev("feature_created", "feature:F-1", {"t": 1})])
    sync(a)
    server.stop()
    append(a, [ev("feature_created", "feature:F-2", {"t": 2}),
               ev("feature_created", "feature:F-3", {"t": 3})])
    for attempt in (1, 2):
        p = sync(a, code=3)
        line = one_line(p)
        assert f"127.0.0.1:{server.port}" in line or "reach" in line, line
        info = status(a)
        assert info["failures_since"] == attempt
        assert info["last_error"] and info["last_failure"]
        assert info["last_success"]                      # the earlier success stays visible
    # the queue is kept, stamped
    assert info["queued"] == 2 and info["unstamped"] == 0
    assert {e["aggregate_id"] for e in log(a, "--status", "queued")} == {"F-2", "F-3"}
    text = run("sk", "sync", "status", home=a, code=1).stdout   # the last run failed
    assert re.search(r"failures since:\s*2\b", text), text
    assert info["last_error"] in text
    p = run("sk", "sync", "status", "--check", home=a, code=3)
    assert "Unreachable" in p.stdout
    run("sk-push-batch", home=a, code=3)
    run("sk-pull", home=a, code=3)

    server.start()
    out = sync(a).stdout
    assert counts_line(out)["pushed"] == 2
    info = status(a)
    assert info["failures_since"] == 0 and info["queued"] == 0 and info["last_error"] is None
    assert server_count(server) == 3
    assert re.search(r"failures since:\s*0",
                     run("sk", "sync", "status", home=a).stdout)


# -- keys -------------------------------------------------------------------------------
def test_revoked_and_rotated_keys(server, device):
    a, b = device("a"), device("b")
    append(a, [ev("feature_created", "feature:F-1")])
    append(b, [ev("feature_created", "feature:F-2")])
    sync(a)
    sync(b)

    run("sk-register", "--revoke", "a", "--db", server.db)
    append(a, [ev("feature_updated", "feature:F-1", {"x": 1})])
    p = sync(a, code=4)
    assert "revoked" in one_line(p)
    assert status(a)["queued"] == 1
    p = run("sk", "sync", "status", "--check", home=a, code=4)
    assert "Reachable (auth required)" in p.stdout
    run("sk-pull", home=a, code=4)

    new = run("sk-register", "--rotate", "b", "--db", server.db).stdout.strip()
    assert re.match(r"^sk1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}$", new)
    append(b, [ev("feature_updated", "feature:F-2", {"y": 2})])
    p = sync(b, code=4)
    assert "rotated" in one_line(p) or "key" in one_line(p)
    assert status(b)["queued"] == 1
    run("sk", "sync", "setup", "--server", server.url, "--key", new, "--yes",
        home=b)  # replacing the rotated key: --yes off a terminal
    out = sync(b).stdout
    assert counts_line(out)["pushed"] == 1
    assert state(b, "feature:F-2") == {"y": 2}
    # the revoked device's queued event never reached the server
    assert server_count(server) == 3
    check_server_log(server)


# -- wrong URLs ---------------------------------------------------------------------------
def test_nothing_listening_exits_3(server, device):
    a = device("a")
    append(a, [ev("feature_created", "feature:F-1")])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = sync(a, "--server", url, code=3)
    assert str(port) in one_line(p)
    assert status(a)["queued"] == 1
    run("sk", "sync", "status", "--check", "--server", url, home=a, code=3)
    home = a.parent / "fresh"
    p = run("sk", "sync", "setup", "--server", url, "--key", server.register("z"), home=home,
            code=3)
    one_line(p)
    assert not (home / ".env").exists()


@pytest.mark.parametrize("code", [404, 200])
def test_not_an_sk_server_exits_5(server, device, code):
    a = device("a")
    append(a, [ev("feature_created", "feature:F-1")])
    fake = not_sk(code)
    try:
        p = sync(a, "--server", fake.url, code=5)
        line = one_line(p)
        assert str(fake.port) in line and ("sk server" in line or str(code) in line), line
        assert status(a)["queued"] == 1
        home = a.parent / "fresh"
        run("sk", "sync", "setup", "--server", fake.url, "--key", server.register("z"),
            home=home, code=5)
        assert not (home / ".env").exists()
    finally:
        fake.stop()


def test_python_http_server_is_not_sk_exits_5(server, device):
    """`python -m http.server` answers POST with 501 HTML: a protocol failure (5),
    not an unreachable server (3)."""
    a = device("a")
    append(a, [ev("feature_created", "feature:F-1")])
    port = free_port()
    httpd = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=a, start_new_session=True)
    try:
        import socket
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        p = sync(a, "--server", f"http://127.0.0.1:{port}", code=None)
        line = one_line(p)
        assert status(a)["queued"] == 1
        assert p.returncode == 5, f"exit {p.returncode}: {line}"
    finally:
        httpd.terminate()
        httpd.wait(10)


# -- a proxy that tampers with responses -----------------------------------------------------
def test_byte_flipping_proxy_exits_5_and_keeps_queue(server, device):
    a, b = device("a"), device("b")
    append(b, [ev("feature_created", "feature:B-1", {"from": "b"})])
    sync(b)
    append(a, [ev("feature_created", f"feature:A-{i}", {"n": i}) for i in range(3)])
    run("sk-stamp", home=a)
    before = log(a)
    px = proxy(server.port, flip=True)
    try:
        p = sync(a, "--server", px.url, code=5)
        line = one_line(p)
        assert "authentication" in line or "altered" in line or "tamper" in line, line
        assert px.seen and all(st == 200 for _, st in px.seen)
        # nothing was marked sent on the strength of a tampered answer
        assert log(a) == before
        assert status(a)["queued"] == 3 and status(a)["failures_since"] == 1
        # pull through it: exit 5, nothing stored, cursor unmoved
        p = run("sk-pull", "--server", px.url, home=a, code=5)
        one_line(p)
        assert log(a) == before and status(a)["cursor"] == 0
        run("sk", "sync", "status", "--check", "--server", px.url, home=a, code=5)
    finally:
        px.stop()
    # straight to the server: the (already stored) events are duplicates, nothing lost
    out = sync(a).stdout
    assert "already there" in out or counts_line(out)["pushed"] == 3, out
    assert status(a)["queued"] == 0 and status(a)["failures_since"] == 0
    assert server_count(server) == 4
    sync(b)
    assert state(a) == state(b) and len(state(a)["feature"]) == 4


# -- a proxy that refuses large requests with 413 ----------------------------------------------
def test_413_proxy_splits_batches_and_keeps_an_oversize_event_queued(server, device):
    """A proxy's 413 is unsealed: the batch is split until it passes, and the one
    event too large for the proxy alone stays queued (an unauthenticated answer
    never sets anything aside), is named with its HTTP status, and blocks nothing."""
    limit = 12_000
    a, b = device("a"), device("b")

    def blob(n):
        return base64.b64encode(os.urandom(n)).decode()   # incompressible

    normal = [ev("doc_written", f"doc:D-{i}", {"text": blob(1500)}) for i in range(30)]
    huge = ev("doc_written", "doc:HUGE", {"text": blob(30_000)})
    append(a, normal[:15] + [huge] + normal[15:])
    px = proxy(server.port, max_body=limit)
    try:
        p = sync(a, "--server", px.url, code=1)
        again = sync(a, "--server", px.url, code=1)
    finally:
        px.stop()
    assert "error decoding response" not in p.stderr
    assert "HTTP 413" in p.stderr and "kept queued" in p.stderr, p.stderr
    assert "HTTP 413" in again.stderr
    statuses = [st for _, st in px.seen]
    assert 413 in statuses
    assert statuses.count(200) >= 3                     # the batch was split
    assert all(n <= limit for n, st in px.seen if st == 200)

    assert log(a, "--rejected") == []
    queued = log(a, "--status", "queued")
    assert [e["aggregate_id"] for e in queued] == ["HUGE"]
    info = status(a)
    assert info["rejected"] == 0 and info["queued"] == 1
    assert len(log(a, "--status", "sent")) == 30

    # everything else arrived
    on_server = {i for _, i, _ in server_rows(server)}
    assert on_server == {f"D-{i}" for i in range(30)}
    sync(b)
    got = {e["aggregate_id"] for e in log(b)}
    assert got == {f"D-{i}" for i in range(30)}
    assert state(b, "doc")["D-7"]["text"] == normal[7]["payload"]["text"]
    # without the proxy the held event goes through
    assert counts_line(sync(a).stdout)["pushed"] == 1
    assert counts_line(sync(b).stdout)["pulled"] == 1
    check_server_log(server)
