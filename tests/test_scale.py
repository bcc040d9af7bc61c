"""Several `sk server` processes on ONE PostgreSQL database, behind a round-robin
TCP balancer (tools/balancer.py), as a team that outgrew one host runs them.

Nothing that must hold across requests may live in one server's memory: these
tests send the parts of one conversation to different servers and check that the
database alone decides — the team's sequence stays dense with concurrent pushers
and pullers, a request or a WebSocket token used on one server is refused on
another, a revocation or a run of failed authentications is seen by every server
at once, an event pushed through one server reaches a watcher on another within
milliseconds (LISTEN/NOTIFY), and `sk-admin migrate` moves a SQLite server to
PostgreSQL without breaking any device's key or cursor.

Every server, watcher and balancer is stopped by its own handle in a fixture or a
finally; every wait is bounded."""

import json
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import websocket
from websocket import ABNF

from conftest import (BACKENDS, ROOT, ServerProcess, member_push, new_server_db, opened_log,
                      push_request, query, results, run, fake_grant, wait_until)
from sk import PROTOCOL_VERSION, crypto, wire
from sk.client import Client
from sk.crypto import C2S, S2C
from sk.errors import AuthError, Unreachable
from conftest import Watcher

sys.path.insert(0, str(ROOT / "tools"))
from balancer import Balancer  # noqa: E402

pytestmark = [
    pytest.mark.slow,   # real servers, real PostgreSQL
    pytest.mark.skipif("postgresql" not in BACKENDS, reason="several servers share one PostgreSQL"
                       " database; SK_TEST_BACKENDS leaves postgresql out")]

TIMEOUT = 10  # seconds: every socket operation is bounded by this


# -- helpers -------------------------------------------------------------------------
class Cluster:
    """n `sk server` processes on one PostgreSQL database, behind a Balancer."""

    def __init__(self, request, base, n):
        base.mkdir(parents=True, exist_ok=True)
        self.db, self.extra_env = new_server_db(request, "postgresql", base)
        self.servers, self.lb = [], None
        try:
            # the first one creates the schema and the server secret; the others start together
            self.servers.append(self._server(base, 0).start())
            rest = [self._server(base, i) for i in range(1, n)]
            self.servers += rest
            with ThreadPoolExecutor(len(rest) or 1) as pool:
                list(pool.map(lambda s: s.start(), rest))
            self.lb = Balancer([("127.0.0.1", s.port) for s in self.servers]).start()
            self.url = self.lb.url
        except BaseException:
            self.stop()
            raise

    def _server(self, base, i):
        return ServerProcess(self.db, env=self.extra_env, log=base / f"server{i}.log")

    def stop(self):
        if self.lb is not None:
            self.lb.stop()
        for s in self.servers:
            s.stop()

    def register(self, name, team):
        return self.servers[0].register(name, team)

    def device(self, tmp_path, name, team, server=None):
        """A device registered on the shared database and set up against `server`
        (default: the balancer): (its SK_HOME, its API key)."""
        home = tmp_path / f"dev-{name}"
        key = self.register(name, team)
        run("sk", "sync", "setup", "--server", server or self.url, "--key", key, home=home)
        return home, key


@pytest.fixture(scope="module")
def cluster3(request, tmp_path_factory):
    """Three servers on one PostgreSQL database, shared by the module's tests (each
    test uses its own team and device names)."""
    c = Cluster(request, tmp_path_factory.mktemp("cluster3"), 3)
    yield c
    c.stop()


@pytest.fixture
def cluster2(request, tmp_path):
    """Two servers on a PostgreSQL database of the test's own."""
    c = Cluster(request, tmp_path / "cluster2", 2)
    yield c
    c.stop()


def tag():
    return uuid.uuid4().hex[:8]


def new_event(node, i):
    return {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
            "aggregate_type": "feature", "aggregate_id": f"F-{i}", "lamport_clock": 1 + i,
            "node_id": node, "payload": {"i": i}, "timestamp": "2026-01-31T12:00:00Z"}


def append(home, n, prefix):
    """sk-append n events (NDJSON on stdin) with ids chosen here; return the ids."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    lines = "".join(json.dumps({"event_id": eid, "event_type": "feature_created",
                                "aggregate_type": "feature", "aggregate_id": f"{prefix}-{i % 50}",
                                "payload": {"by": prefix, "i": i}}) + "\n"
                    for i, eid in enumerate(ids))
    run("sk-append", home=home, input=lines)
    return ids


def server_log(db, team):
    """The team's event ids on the server, in sequence order; no duplicate, no gap."""
    rows = query(db, "SELECT seq, event_id FROM events WHERE team = ? ORDER BY seq", (team,))
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)), f"team {team}: an event is stored twice on the server"
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), f"team {team}: sequence not dense"
    return ids


def log_ids(home):
    """The event ids of a device's local log, read with sk-log; no duplicate."""
    ids = [json.loads(line)["event_id"] for line in run("sk-log", home=home).stdout.splitlines()]
    assert len(ids) == len(set(ids)), f"{home.name}: an event is twice in the local log"
    return ids


def local_log(home):
    """How many events a device's local log holds."""
    return query(home / "sk.db", "SELECT count(*) FROM events")[0][0]


def begin_epoch(client, api_key):
    """Begin the team's first key epoch as its first member would (keys endpoint),
    so that a test may push batches sealed under conftest.team_key: the server
    never checks what they are sealed with, only that a member granted the epoch to
    the device that writes under it (the grant here is the test's)."""
    identity = crypto.identity_public(crypto.identity_secret(api_key)).hex()
    device = client.call("hello", {})["device"]
    grant = {"epoch": 1, "device": device, "recipient": identity,
             "sealed": fake_grant(device).hex()}
    state = client.call("keys", {"identity": identity, "epoch": 1, "grants": [grant]})
    assert "refused" not in state and state["epoch"] == 1 and not state["rekey"], state


def rest_push(client, team, events):
    """A REST push of `events`, sealed as a member seals them: the server's answer."""
    return client.call("push", *push_request(team, events))


def raw_post(url, endpoint, key_id, blob):
    return requests.post(f"{url}/api/{endpoint}", data=blob, timeout=TIMEOUT, headers={
        wire.PROTOCOL_HEADER: str(PROTOCOL_VERSION), wire.KEY_HEADER: key_id,
        "Content-Type": wire.CONTENT_TYPE})


def error_code(r, client):
    """The error code of an answer: sealed for `client`'s request once it
    authenticated (opened with the request's nonce), plain JSON before."""
    try:
        if r.headers.get("Content-Type", "").split(";")[0] == wire.CONTENT_TYPE:
            endpoint = r.request.path_url.rsplit("/", 1)[1]
            return wire.open_response(client.master, client.key_id, endpoint,
                                      crypto.peek(r.request.body)[1], r.content)["error"]["code"]
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def check(home, server, code):
    """`sk sync status --check` of device `home` against `server` exits `code`."""
    return run("sk", "sync", "status", "--check", "--server", server, home=home, code=code)


def ws_session(url, client, token, hello=True):
    """Open /api/ws on server `url` with `token`: ("live", cursor) if a session
    opened and answered the sealed hello, else ("closed", close code, reason)."""
    sid = wire.token_hash(token)
    ws = websocket.create_connection(url.replace("http", "ws", 1) + wire.WS_PATH + "?token=" + token,
                                     timeout=TIMEOUT)
    try:
        if hello:
            try:
                ws.send_binary(wire.seal_frame(client.master, client.key_id, C2S, sid,
                                               {"t": "hello", "cursor": 0, "n": 1}))
            except (OSError, websocket.WebSocketException):
                pass  # refused and closed already: the close frame is read below
        for _ in range(100):
            try:
                frame = ws.recv_frame()
            except (OSError, websocket.WebSocketException) as e:
                return ("closed", None, str(e))
            if frame.opcode == ABNF.OPCODE_CLOSE:
                code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                return ("closed", code, frame.data[2:].decode("utf-8", "replace"))
            if frame.opcode in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT):
                msg = wire.open_frame(client.master, client.key_id, S2C, sid, frame.data)
                if msg["t"] == "live":
                    return ("live", msg["cursor"])
        raise AssertionError("neither a 'live' frame nor a close in 100 frames")
    finally:
        try:
            ws.shutdown()
        except Exception:  # noqa: BLE001 - already closed
            pass


def test_concurrent_pushers_and_pullers_through_three_servers(cluster3, tmp_path):
    """4 devices push batches (sk-push-batch --all --max 40, or sk sync) while 2 others
    pull again and again, every command through the balancer: the team's sequence is
    dense and holds each event once, and every device ends with every event once —
    so no pull cursor ever passed an event that another server committed late."""
    t = tag()
    team = f"conc-{t}"
    pushers = [cluster3.device(tmp_path, f"push{i}-{t}", team)[0] for i in range(4)]
    pullers = [cluster3.device(tmp_path, f"pull{i}-{t}", team)[0] for i in range(2)]
    before = list(cluster3.lb.connections)
    rounds, per = 3, 120
    pushing = threading.Event()
    pushing.set()

    def push_work(k, home):
        ids = []
        for r in range(rounds):
            ids += append(home, per, f"p{k}r{r}")
            if (k + r) % 2:
                run("sk-stamp", "-q", home=home)
                run("sk-push-batch", "--all", "--max", "40", "-q", home=home)
            else:
                run("sk", "sync", "-q", home=home)
        return ids

    def pull_work(home):
        pulls = 0
        while pushing.is_set() and pulls < 200:
            run("sk-pull", "-q", home=home)
            pulls += 1
        return pulls

    with ThreadPoolExecutor(len(pushers) + len(pullers)) as pool:
        pulls = [pool.submit(pull_work, h) for h in pullers]
        pushes = [pool.submit(push_work, k, h) for k, h in enumerate(pushers)]
        try:
            pushed = [eid for f in pushes for eid in f.result(timeout=120)]
        finally:
            pushing.clear()
        pull_counts = [f.result(timeout=60) for f in pulls]
    assert len(pushed) == len(set(pushed)) == len(pushers) * rounds * per
    assert all(n >= 2 for n in pull_counts), f"the pullers did not overlap the pushes: {pull_counts}"

    on_server = server_log(cluster3.db, team)
    assert set(on_server) == set(pushed) and len(on_server) == len(pushed)
    for home in pullers:
        run("sk-pull", "-q", home=home)
    for home in pushers:
        run("sk", "sync", "-q", home=home)
    for home in pullers + pushers:
        assert sorted(log_ids(home)) == sorted(on_server), home.name
    spread = [now - then for now, then in zip(cluster3.lb.connections, before)]
    assert all(n > 0 for n in spread), f"the balancer did not use every server: {spread}"
    print(f"\n{len(on_server)} events; {sum(pull_counts)} concurrent pulls;"
          f" connections per server {spread}")


# -- 2. a replay to another server -----------------------------------------------------
def test_request_replayed_to_another_server_is_refused(cluster3):
    """A sealed push accepted by one server, sent again byte for byte to each other
    server, is refused there (400 replay) and stores nothing; the same fresh request
    sent to all three at once is accepted by exactly one; the same events in three
    different requests at once are stored once (accepted once, duplicate twice)."""
    t = tag()
    team = f"replay-{t}"
    key = cluster3.register(f"r-{t}", team)
    client = Client(cluster3.url, key)
    begin_epoch(client, key)
    a, *others = [s.url for s in cluster3.servers]

    ev = new_event(f"node-{t}", 0)
    blob, _ = wire.seal_request(client.master, client.key_id, "push", *push_request(team, [ev]))
    r = raw_post(a, "push", client.key_id, blob)
    assert r.status_code == 200, r.text
    for url in others:
        r = raw_post(url, "push", client.key_id, blob)
        assert (r.status_code, error_code(r, client)) == (400, "replay"), (url, r.status_code, r.text)
    hello, _ = wire.seal_request(client.master, client.key_id, "hello", {})
    assert raw_post(others[0], "hello", client.key_id, hello).status_code == 200
    for url in (a, others[1]):
        r = raw_post(url, "hello", client.key_id, hello)
        assert (r.status_code, error_code(r, client)) == (400, "replay"), (url, r.status_code, r.text)
    assert server_log(cluster3.db, team) == [ev["event_id"]]

    # the same request to every server at the same moment: one wins
    urls = [s.url for s in cluster3.servers]
    for i in range(1, 6):
        ev = new_event(f"node-{t}", i)
        blob, _ = wire.seal_request(client.master, client.key_id, "push",
                                    *push_request(team, [ev]))
        gate = threading.Barrier(len(urls))

        def send(url, blob=blob, gate=gate):
            gate.wait(TIMEOUT)
            r = raw_post(url, "push", client.key_id, blob)
            return r.status_code, error_code(r, client)
        with ThreadPoolExecutor(len(urls)) as pool:
            answers = sorted(pool.map(send, urls), key=str)
        assert answers == sorted([(200, None)] + [(400, "replay")] * (len(urls) - 1), key=str), answers
    assert len(server_log(cluster3.db, team)) == 6

    # the same events in three different requests, one to each server at once (a
    # watcher and a cron `sk sync` of one device): each is stored once
    for i in range(3):
        evs = [new_event(f"node-{t}", 10 + 10 * i + j) for j in range(10)]
        gate = threading.Barrier(len(urls))

        def push(url, evs=evs, gate=gate):
            gate.wait(TIMEOUT)
            return [r["status"] for r in results(rest_push(Client(url, key), team, evs))]
        with ThreadPoolExecutor(len(urls)) as pool:
            answers = list(pool.map(push, urls))
        for j in range(len(evs)):
            assert sorted(a[j] for a in answers) == ["accepted", "duplicate", "duplicate"], answers
    assert len(server_log(cluster3.db, team)) == 6 + 30
    client.close()


# -- 3. WebSocket tokens ---------------------------------------------------------------
def test_websocket_token_is_single_use_across_servers(cluster3):
    """A token is spent wherever it is used first: obtained from C and used on A, it
    is refused on B; another, never used on A, opens a session on B once and is then
    refused on A; one sent to all three at once opens exactly one session."""
    t = tag()
    key = cluster3.register(f"ws-{t}", f"ws-{t}")
    a, b, c = [s.url for s in cluster3.servers]
    client = Client(c, key)

    tok = client.call("ws-token", {})["token"]
    assert ws_session(a, client, tok) == ("live", 0)
    closed = ws_session(b, client, tok, hello=False)
    assert closed[:2] == ("closed", 4401) and "used" in closed[2], closed

    tok = Client(a, key).call("ws-token", {})["token"]
    assert ws_session(b, client, tok) == ("live", 0)
    closed = ws_session(a, client, tok, hello=False)
    assert closed[:2] == ("closed", 4401) and "used" in closed[2], closed
    unknown = ws_session(b, client, "x" * 43, hello=False)
    assert unknown[:2] == ("closed", 4401) and "unknown" in unknown[2], unknown

    for _ in range(3):
        tok = client.call("ws-token", {})["token"]
        gate = threading.Barrier(3)

        def use(url, tok=tok, gate=gate):
            gate.wait(TIMEOUT)
            return ws_session(url, client, tok)[0]
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(use, (a, b, c)))
        assert sorted(outcomes) == ["closed", "closed", "live"], outcomes
    client.close()


# -- 4. revocation ---------------------------------------------------------------------
def test_revoked_key_is_refused_by_every_server_at_once(cluster3, tmp_path):
    """sk-register --revoke on the database: the very next request to each server
    (which all served the key a moment before) is refused — 401 revoked, exit 4 —
    without a restart, and the revoked device's push stores nothing."""
    t = tag()
    team = f"revoke-{t}"
    home, key = cluster3.device(tmp_path, f"rv-{t}", team)
    keep_home, _ = cluster3.device(tmp_path, f"keep-{t}", team)
    urls = [s.url for s in cluster3.servers]
    for h in (home, keep_home):   # both hold the team's key (epoch 1) before the revocation
        run("sk", "sync", "-q", home=h)
    for url in urls:
        check(home, url, 0)

    cluster3.servers[1].admin("sk-register", "--revoke", f"rv-{t}")
    for url in urls:
        p = check(home, url, 4)
        assert "revoked" in (p.stdout + p.stderr), p.stdout + p.stderr
        with pytest.raises(AuthError, match="revoked"):
            Client(url, key).hello()
    append(home, 3, "revoked")
    p = run("sk", "sync", home=home, code=4)
    assert "revoked" in p.stderr, p.stderr
    # the device beside it goes on, through every server
    mine = append(keep_home, 3, "kept")
    run("sk", "sync", "-q", home=keep_home)
    assert server_log(cluster3.db, team) == mine
    # its sync began the next key epoch (the revocation asked for one), not sealed to the
    # revoked device, and what it pushed is sealed under it
    assert query(cluster3.db, "SELECT epoch, rekey FROM teams WHERE team = ?", (team,)) == [(2, 0)]
    granted = query(cluster3.db, "SELECT DISTINCT device FROM grants WHERE team = ? AND epoch = 2",
                    (team,))
    assert (f"rv-{t}",) not in granted, granted
    assert query(cluster3.db, "SELECT DISTINCT b.epoch FROM events e JOIN batches b ON"
                              " b.team = e.team AND b.batch = e.batch WHERE e.team = ?",
                 (team,)) == [(2,)]
    for url in urls:
        check(keep_home, url, 0)


# -- 5. real time across servers -------------------------------------------------------
def test_watcher_on_one_server_gets_events_pushed_through_another_at_once(cluster3, tmp_path):
    """A watcher on server 1 gets every event pushed through server 2 (how soon is
    printed: a figure, not an assertion, on a shared machine; what wakes it is
    test_server_store's test_a_push_wakes_the_listeners_of_every_server_on_the_database)."""
    t = tag()
    team = f"live-{t}"
    s1, s2 = cluster3.servers[0], cluster3.servers[1]
    home, _ = cluster3.device(tmp_path, f"w-{t}", team, server=s1.url)
    pusher, _ = cluster3.device(tmp_path, f"pusher-{t}", team, server=s2.url)
    run("sk", "sync", "-q", home=home)     # the team's key: begun, and sealed to the pusher
    db = str(home / "sk.db")
    w = Watcher(home, tmp_path)
    try:
        w.wait_connected()
        latencies = []
        for i in range(20):
            ev = new_event(f"node-{t}", i)
            t0 = time.monotonic()
            assert member_push(pusher, [ev])["statuses"] == "a"
            wait_until(lambda: query(db, "SELECT 1 FROM events WHERE event_id = ?",
                                     (ev["event_id"],)), 5, f"event {i} at the watcher",
                       interval=0.003)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05 + 0.037 * (i % 7))   # spread the pushes over the 1 s poll phase
        assert w.proc.poll() is None, w.text()
    finally:
        w.kill()
    med = statistics.median(latencies)
    print(f"\nwatcher on server 1, pushes through server 2: median {med * 1000:.0f} ms,"
          f" max {max(latencies) * 1000:.0f} ms over {len(latencies)} events")


# -- 6. failed authentication counted across servers --------------------------------------
def test_failed_authentications_are_counted_across_servers(cluster2, tmp_path):
    """20 forged requests, alternating between the two servers, make the 21st forged
    request from that address answer 429 on either server; the right key is still
    served, on both (a request that authenticates is never refused for others'
    failures)."""
    home, key = cluster2.device(tmp_path, "good", "auth")
    urls = [s.url for s in cluster2.servers]
    for url in urls:
        check(home, url, 0)
    key_id = Client(urls[0], key).key_id
    forged = f"sk1.{key_id}." + "A" * 43
    for i in range(20):
        with pytest.raises(AuthError):
            Client(urls[i % 2], forged).hello()
    assert query(cluster2.db, "SELECT count FROM auth_failures") == [(20,)]
    for url in urls:
        with pytest.raises(Unreachable, match="429"):
            Client(url, forged).hello()
        assert Client(url, key).hello()["device"].startswith("good")
        check(home, url, 0)
    check(home, cluster2.url, 0)


# -- 7. SQLite -> PostgreSQL -----------------------------------------------------------
def test_migrate_sqlite_server_to_two_postgresql_servers(request, tmp_path):
    """A SQLite server with 20,000 events of two synced devices is moved with
    sk-admin migrate into a database that already holds another team (refused, exit 2,
    unless --force; migrating again copies nothing); two servers on it serve the
    same keys and cursors: the first sync after the move pulls only what is new,
    nothing is twice anywhere, and each device's log is the server's."""
    half = 10_000   # four chunks of sk-admin migrate (migrate.CHUNK = 5000)
    old = ServerProcess(tmp_path / "server.db", extra=["--workers", "2"]).start()
    homes, keys = {}, {}
    try:
        for name in ("a", "b"):
            keys[name] = old.register(name, "core")
            homes[name] = tmp_path / f"dev-{name}"
            run("sk", "sync", "setup", "--server", old.url, "--key", keys[name], home=homes[name])
            append(homes[name], half, name)
        with ThreadPoolExecutor(2) as pool:   # twice each, side by side: both cursors end at the head
            for _ in range(2):
                list(pool.map(lambda h: run("sk", "sync", "-q", home=h, timeout=120), homes.values()))
        head = len(server_log(old.db, "core"))
        assert head == 2 * half
        # a request the old server accepted: its nonce moves too, so it cannot be replayed
        a_client = Client(old.url, keys["a"])
        seen, _ = wire.seal_request(a_client.master, a_client.key_id, "hello", {})
        assert raw_post(old.url, "hello", a_client.key_id, seen).status_code == 200
    finally:
        old.stop()
    for home in homes.values():
        assert local_log(home) == head

    pg_base = tmp_path / "pg"
    pg_base.mkdir()
    url, env = new_server_db(request, "postgresql", pg_base)
    env = {**os.environ, **env}

    def migrate(*extra, code=0):
        p = run("sk-admin", "migrate", "--from", old.db, "--to", url, "--json", *extra,
                env=env, code=code, timeout=120)
        return json.loads(p.stdout) if code == 0 else p
    # the target already holds another team: refused and left untouched, unless --force
    run("sk-register", "--name", "stranger", "--team", "elsewhere", "--db", url, env=env)
    p = migrate(code=2)
    assert "elsewhere" in p.stderr and "--force" in p.stderr, p.stderr
    assert query(url, "SELECT team FROM teams") == [("elsewhere",)]
    assert query(url, "SELECT count(*) FROM events") == [(0,)]
    done = migrate("--force")
    assert (done["events"], done["already"], done["devices"], done["teams"]) == (head, 0, 2, 1)
    again = migrate("--force")
    assert (again["events"], again["already"]) == (0, head)
    assert sorted(query(url, "SELECT team FROM teams")) == [("core",), ("elsewhere",)]

    servers = [ServerProcess(url, env=env, log=tmp_path / f"pg-server{i}.log") for i in range(2)]
    lb = None
    try:
        for s in servers:
            s.start()
        lb = Balancer([("127.0.0.1", s.port) for s in servers]).start()
        for name in ("a", "b"):   # the same key, now on PostgreSQL
            run("sk", "sync", "setup", "--server", lb.url, "--key", keys[name], home=homes[name])
        new = {"a": append(homes["a"], 300, "a-new"), "b": append(homes["b"], 200, "b-new")}
        summaries = [json.loads(run("sk", "sync", "--json", home=homes[name], timeout=120).stdout)
                     for name in ("a", "b", "a", "b")]
        # cursors kept: each pull fetched only what the other device pushed since
        got = [(s["push"]["accepted"], s["pull"]["received"]) for s in summaries]
        assert got == [(300, 0), (200, 300), (0, 200), (0, 0)], got
        assert all(s["pull"]["cursor"] == head + 500 for s in summaries[2:])
        assert not any("healed" in s for s in summaries), summaries   # same log, same chain
        r = raw_post(lb.url, "hello", a_client.key_id, seen)
        assert (r.status_code, error_code(r, a_client)) == (400, "replay"), r.text
        assert all(n > 0 for n in lb.connections), lb.connections
    finally:
        if lb is not None:
            lb.stop()
        for s in servers:
            s.stop()

    # what the server holds, as a member reads it: every sealed batch moved and opens
    rows = [(e["seq"], e["event_id"], e["lamport_clock"], e["node_id"], e["aggregate_id"])
            for e in opened_log(servers[0], homes.values()) if e["team"] == "core"]
    assert [r[0] for r in rows] == list(range(1, head + 501)), "sequence not dense"
    stored = {r[1:] for r in rows}
    assert len(stored) == len(rows) == len({r[1] for r in rows}), "an event is twice on the server"
    assert {r[1] for r in rows[head:]} == set(new["a"] + new["b"])
    for name, home in homes.items():   # the local log (read directly: faster than sk-log)
        mine = query(home / "sk.db", "SELECT event_id, lamport_clock, node_id, aggregate_id"
                                     " FROM events")
        assert len(mine) == len(stored) and set(mine) == stored, name
