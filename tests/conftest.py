"""Shared fixtures: a scrubbed environment with a temporary HOME/SK_HOME for every
test, the server database of a test on each backend (a SQLite file, or a fresh
database on a real PostgreSQL started for the session), and a real `sk server`
process on a free loopback port.

SK_TEST_BACKENDS=sqlite (or postgresql) runs the server tests on one backend only."""

import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent          # the venv's installed commands
SCRUB = ("SK_HOME", "SK_SERVER", "SK_API_KEY", "SK_NEVER_SYNC", "SK_PATH_MAP",
         "SK_SERVER_DB", "SK_TIMEOUT", "SK_SERVER_SECRET", "SK_SERVER_SECRET_FILE")
BACKENDS = os.environ.get("SK_TEST_BACKENDS", "sqlite,postgresql").split(",")


SLOW_FIXTURES = {"server", "module_server", "device", "pg_cluster", "watch"}


def pytest_collection_modifyitems(config, items):
    """Tests that start a real server or PostgreSQL are `slow`: `make test-fast`
    leaves them out (`-m "not slow"`); `make test` runs everything.

    A test marked `one_backend` checks what a device does (its network faults, its
    files, its commands' text) through a real server whose store paths other tests
    run on every backend (test_server_store, test_server_api, test_e2e,
    test_restore, test_faults, test_scale, ...): it runs on the first backend only,
    which keeps `make test` inside CI's 15 minutes on 2 cores."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.get_closest_marker("one_backend") and BACKENDS[1:]
                and params.get("server_db", BACKENDS[0]) != BACKENDS[0]):
            dropped.append(item)
            continue
        if SLOW_FIXTURES & set(item.fixturenames) or "postgresql" in params.values():
            item.add_marker(pytest.mark.slow)
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_configure(config):
    """A SIGTERM (a CI timeout, say) stops the run like Ctrl-C, so fixtures still
    stop every server and the session's PostgreSQL."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(autouse=True)
def scrubbed_env(tmp_path, monkeypatch):
    """Never touch the real ~: HOME and SK_HOME point into the test's temp dir."""
    for name in SCRUB:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SK_HOME", str(home / ".spec-kitty"))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    yield home


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name):
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}"
    return str(path)


def sk(*args, env=None, input=None, home=None, timeout=120, check=None):
    """Run an installed command (`sk-append`, or `sk` + args) as a subprocess."""
    env = dict(os.environ if env is None else env)
    if home is not None:
        env["SK_HOME"] = str(home)
    proc = subprocess.run([command(args[0]), *map(str, args[1:])], input=input, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (
            f"{args} exited {proc.returncode}, wanted {check}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}")
    return proc


def run(*args, home=None, code=0, input=None, env=None, timeout=60):
    """Run an installed command as a user would: never a traceback, never "database
    is locked"; it must exit `code` unless code is None."""
    p = sk(*args, home=home, input=input, env=env, timeout=timeout)
    for stream in (p.stderr, p.stdout):
        assert "Traceback" not in stream, f"{args}: traceback:\n{stream}"
    assert "database is locked" not in p.stderr, f"{args}: {p.stderr}"
    if code is not None:
        assert p.returncode == code, (f"{args} exited {p.returncode}, wanted {code}\n"
                                      f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def is_pg(db):
    return str(db).startswith("postgresql://")


def query(db, sql, args=()):
    """The rows of `sql` (with ? placeholders) on a server or device database: a
    SQLite file opened read-only, or a PostgreSQL URL."""
    if is_pg(db):
        import psycopg
        with psycopg.connect(str(db), autocommit=True) as c:
            return [tuple(r) for r in c.execute(sql.replace("?", "%s"), args).fetchall()]
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def alter(db, sql, args=()):
    """Change a server or device database behind its back (an attacker with the
    files): `sql` with ? placeholders, committed."""
    if is_pg(db):
        import psycopg
        with psycopg.connect(str(db), autocommit=True) as c:
            c.execute(sql.replace("?", "%s"), args)
        return
    c = sqlite3.connect(str(db), timeout=60)
    try:
        with c:
            c.execute(sql, args)
    finally:
        c.close()


@pytest.fixture(scope="session")
def pg_cluster():
    """One real PostgreSQL for the session (from the pgserver wheel's binaries)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from pgcluster import PgCluster
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster():
    """A PostgreSQL of this test's own, to stop and start (outages)."""
    if "postgresql" not in BACKENDS:
        pytest.skip("PostgreSQL not among SK_TEST_BACKENDS")
    import tempfile
    sys.path.insert(0, str(ROOT / "tools"))
    from pgcluster import PgCluster
    base = tempfile.mkdtemp(prefix="sk-pg-own-")
    os.chmod(base, 0o711)   # as root, the cluster runs as nobody, who must get in
    # durable (fsync, synchronous commit): its outages are immediate shutdowns, which
    # lose asynchronously committed work, such as a server's schema made just before
    cluster = PgCluster(base_dir=base, fsync=True).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


_databases = itertools.count()


def new_server_db(request, backend, base):
    """(database, extra environment) of a new server database: a SQLite file in
    `base`, or a fresh PostgreSQL database whose server secret is the file
    SK_SERVER_SECRET_FILE names (several servers on one database share it)."""
    if backend == "sqlite":
        return str(base / "server.db"), {}
    cluster = request.getfixturevalue("pg_cluster")
    name = f"t{next(_databases)}"
    request.addfinalizer(lambda: cluster.drop_database(name))
    return cluster.create_database(name), {"SK_SERVER_SECRET_FILE": str(base / "server.secret")}


@pytest.fixture(params=BACKENDS)
def server_db(request, tmp_path, monkeypatch):
    """The server database of a test, on each backend."""
    db, env = new_server_db(request, request.param, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return db


@pytest.fixture(scope="module", params=BACKENDS)
def module_server(request, tmp_path_factory):
    """One real `sk server` shared by a module's tests, on each backend."""
    base = tmp_path_factory.mktemp("server")
    db, env = new_server_db(request, request.param, base)
    srv = ServerProcess(db, env=env, log=base / "server.log").start()
    yield srv
    srv.stop()


class ServerProcess:
    """`sk server` as a real process; stopped by its own PID."""

    def __init__(self, db, port=None, extra=(), log=None, env=None):
        self.db = str(db) if is_pg(db) else Path(db)
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log is None:
            log = (Path(os.environ["HOME"]).parent / f"server-{self.port}.log" if is_pg(db)
                   else self.db.with_suffix(".log"))
        self.log = Path(log)
        self.extra = list(extra)
        self.proc = None
        self.homes, self.teams = [], {}

    def start(self, timeout=20):
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [command("sk"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--db", str(self.db), "--no-control-socket", *self.extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sk server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sk server did not listen within {timeout} s: {self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc:
            self._log.close()
        self.proc = None

    def env(self):
        """The environment for this server's commands (its secret file, if any)."""
        return {**os.environ, **self.extra_env}

    def admin(self, *args, code=0):
        """Run sk-register or sk-admin (args[0]) against this server's database."""
        return run(args[0], "--db", self.db, *args[1:], env=self.env(), code=code)

    def store(self):
        """This server's store, opened in the test process."""
        from sk_server.store import open_store
        with pytest.MonkeyPatch.context() as mp:
            for k, v in self.extra_env.items():
                mp.setenv(k, v)
            return open_store(self.db)

    def register(self, name, team="default"):
        return sk("sk-register", "--name", name, "--team", team, "--db", self.db,
                  check=0, env=self.env()).stdout.strip()


@pytest.fixture
def server(server_db):
    srv = ServerProcess(server_db).start()
    yield srv
    srv.stop()


@pytest.fixture
def device(tmp_path, server):
    """A factory: device(name, team) -> its SK_HOME, registered and set up."""
    def make(name, team="default"):
        home = tmp_path / f"dev-{name}"
        key = server.register(name, team)
        sk("sk", "sync", "setup", "--server", server.url, "--key", key, home=home, check=0)
        share_key(server, team)
        server.homes.append(home)   # a member's keys open what the server holds (opened_log)
        server.teams[home] = team
        return home
    return make


def share_key(server, team):
    """A member of `team` (a device made by `device`) that holds the team key shares
    it, as its next sync would: `sk team members` runs the key step alone."""
    for home in server.homes:
        if server.teams.get(home) == team and (home / "sk.db").exists() and query(
                home / "sk.db", "SELECT 1 FROM team_keys LIMIT 1"):
            sk("sk", "team", "members", "-q", home=home, check=0)
            return


def member_push(home, events, **body):
    """Push event dicts (complete and stamped) as the device of `home` would, sealed
    under its team key: the server's answer. For events sk-stamp would never make."""
    from sk.config import Config
    from sk.event import check_stamped
    from sk.keyring import Keyring
    from sk.protocol import known_out, push_body
    from sk.store import open_store
    from sk.sync import open_client
    cfg = Config(home)
    store, client = open_store(cfg), open_client(cfg)
    try:
        ring = Keyring(store, cfg.api_key)
        ring.ensure(client)
        batch = [(0, check_stamped(ev, new=False), False) for ev in events]
        request, attachments = push_body(batch, ring, known_out(store))
        return client.call("push", {**request, **body}, attachments)
    finally:
        client.close()
        store.close()


# -- sealed batches, as a member seals them (for tests below the commands) --------------
def team_key(team, epoch=1):
    """A team key for tests that speak to a store or an app directly: the server
    never sees one, so any key a test's members share will do."""
    import hashlib
    return hashlib.sha256(f"test team key|{team}|{epoch}".encode()).digest()


def sealed_batch(team, events, epoch=1, writer=None, key=None, extras=None):
    """A store Batch of event dicts (complete, stamped) or Events, sealed under the
    team's key of `epoch` as a member device would seal them."""
    from sk.event import Event, check_stamped
    from sk.sealed import seal_batch
    from sk_server.store import Batch
    evs = [e if isinstance(e, Event) else check_stamped(e, new=False) for e in events]
    manifest, point, blob = seal_batch(team, epoch, key or team_key(team, epoch), evs, writer,
                                       extras)
    return Batch(epoch, [tuple(m) for m in manifest], point, blob)


def push_request(team, events, epoch=1, writer=None, key=None, relay=(), known=None):
    """(body, attachments) of a push of event dicts, sealed as a member would."""
    b = sealed_batch(team, events, epoch, writer, key)
    body = {"epoch": b.epoch, "events": [list(m) for m in b.manifest], "relay": list(relay),
            "writer": {"seq": b.writer[0], "chain": b.writer[1]} if writer else None}
    if known is not None:
        body["known"] = known
    return body, [b.sealed]


def results(answer, events=None):
    """A push answer's statuses (one letter an event, in the batch's order) as
    [{"status", "reason"?}], with "event_id" too when given the events pushed (dicts)
    or their ids."""
    words = {"a": "accepted", "d": "duplicate", "r": "rejected"}
    reasons = answer.get("reasons", {})
    out = [{"status": words[c], **({"reason": reasons[str(i)]} if str(i) in reasons else {})}
           for i, c in enumerate(answer["statuses"])]
    if events is None:
        return out
    ids = [e if isinstance(e, str) else e["event_id"] for e in events]
    assert len(ids) == len(out), (ids, answer)
    return [{"event_id": i, **r} for i, r in zip(ids, out)]


def begin_epoch(store, team, device, epoch=1):
    """Begin the team's key epoch in a store, as its first member's sync does, and
    share it with every device of the team that has an identity (the key itself is
    the test's: team_key; the server sees only that a grant is there)."""
    why = store.put_keys(team, device, epoch=epoch,
                         grants=grants_lacking(store, team, {epoch}))
    assert why is None, why


def share_epochs(store, team, device=None):
    """`device` (by default the member given the most epochs) shares every epoch it
    was given with each device of the team that has an identity and lacks it, as its
    next sync does (e.g. after a registration)."""
    members = [m for m in store.keys(team, device or "")["members"] if not m["revoked"]]
    member = max(members, key=lambda m: len(m["granted"])) if device is None else next(
        m for m in members if m["device"] == device)
    why = store.put_keys(team, member["device"],
                         grants=grants_lacking(store, team, set(member["granted"])))
    assert why is None, why


def fake_grant(device):
    """A sealed grant's bytes for tests below the key step: the server cannot open a
    grant, only store it (81 bytes, as crypto.seal_grant makes)."""
    return (b"grant to " + device.encode()).ljust(81, b".")[:81]


def grants_lacking(store, team, epochs):
    return [(e, m["device"], m["identity"], fake_grant(m["device"]))
            for m in store.keys(team, "")["members"]
            if m["identity"] and not m["revoked"] for e in sorted(epochs)
            if e not in m["granted"]]


def open_page(page, team, keys=None):
    """The events of a pull answer or events frame, opened: [event dict + "seq"]
    (rows of the puller's own events, left out, as {"seq", "event_id", "own": True})."""
    from sk.protocol import _manifest
    from sk.sealed import open_batch
    opened = []
    for b, blob in zip(page["batches"], page.get("attachments", [])):
        key = (keys or {}).get(b["epoch"]) or team_key(team, b["epoch"])
        opened.append(open_batch(team, b["epoch"], key, *_manifest(b["manifest"]), blob))
    out = []
    for seq, where, what in page["rows"]:
        if where is None:
            out.append({"seq": seq, "event_id": what, "own": True})
        elif where == "legacy":
            keys_ = ("event_id", "node_id", "lamport_clock", "event_type", "aggregate_type",
                     "aggregate_id", "payload", "timestamp")
            out.append({**dict(zip(keys_, what)), "seq": seq, "legacy": True})
        else:
            ev, _ = opened[where][what]
            out.append({**ev.to_dict(), "seq": seq})
    return out


def have(tool):
    return shutil.which(tool) is not None


def wait_until(pred, timeout, what="the condition", interval=0.05):
    """pred()'s first true value, asked every `interval` s; AssertionError naming
    `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


# -- the installed commands, as tests drive them -------------------------------------
def ndjson(events):
    return "".join(json.dumps(e) + "\n" for e in events)


def ev(etype, agg, payload=None, **extra):
    atype, _, aid = agg.partition(":")
    out = {"event_type": etype, "aggregate_type": atype, "aggregate_id": aid,
           "payload": payload or {}}
    out.update(extra)
    return out


def append(home, events):
    return run("sk-append", home=home, input=ndjson(events))


def sync(home, *extra, code=0, env=None):
    return run("sk", "sync", *extra, home=home, code=code, env=env)


def log(home, *flags):
    return [json.loads(line) for line in run("sk-log", *flags, home=home).stdout.splitlines()]


def state(home, *args):
    return json.loads(run("sk-state", *args, home=home).stdout)


def status(home, *flags, code=None):
    """`sk sync status --json` as a dict. It exits 1 when the last run failed, else 0
    (code=None checks exactly that; give code to ask for another)."""
    p = run("sk", "sync", "status", "--json", *flags, home=home, code=code)
    info = json.loads(p.stdout)
    if code is None:
        assert p.returncode == (1 if info["failures_since"] else 0), (p.returncode, info)
    return info


def unstamped_count(home):
    db = os.path.join(home, "sk.db")
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute("SELECT count(*) FROM unstamped").fetchone()[0]


def opened_log(server, homes=None):
    """The server's log as a member reads it: every stored event, its sealed batch
    opened with the team keys the member homes hold (the server cannot), or its
    legacy plaintext. [{"team", "seq", "event_id", "event_type", ...}] by team, seq."""
    from sk.sealed import open_batch
    from sk.protocol import _manifest
    keys = {}
    for home in homes if homes is not None else getattr(server, "homes", []):
        db = Path(home) / "sk.db"
        if db.exists():
            for team, epoch, key in query(db, "SELECT team, epoch, key FROM team_keys"):
                keys[(team, epoch)] = bytes(key)
    # the events first: a batch a live server commits meanwhile is then in what follows
    rows = query(server.db, "SELECT team, seq, event_id, node_id, lamport_clock, batch, idx"
                            " FROM events ORDER BY team, seq")
    batches = {(t, b): (e, bytes(m).decode(), bytes(x)) for t, b, e, m, x in query(
        server.db, "SELECT team, batch, epoch, manifest, sealed FROM batches")}
    legacy = {(r[0], r[1]): r[2:] for r in query(
        server.db, "SELECT team, seq, event_type, aggregate_type, aggregate_id, payload,"
                   " timestamp FROM legacy")}
    opened, out = {}, []
    for team, seq, eid, node, clock, batch, idx in rows:
        row = {"team": team, "seq": seq, "event_id": eid, "node_id": node, "lamport_clock": clock}
        if batch is None:
            etype, atype, aid, payload, ts = legacy[(team, seq)]
            row.update(event_type=etype, aggregate_type=atype, aggregate_id=aid,
                       payload=json.loads(payload), timestamp=ts)
        else:
            if (team, batch) not in opened:
                epoch, text, blob = batches[(team, batch)]
                assert (team, epoch) in keys, f"no member home holds team {team}'s epoch {epoch}"
                opened[(team, batch)] = open_batch(team, epoch, keys[(team, epoch)],
                                                   *_manifest(text), blob)
            ev, extra = opened[(team, batch)][idx]
            assert ev.event_id == eid, (team, seq)
            row.update(ev.to_dict(), extra=extra)
        out.append(row)
    return out


def server_rows(server, sql=None):
    """What the server holds: rows of `sql` on its database, or (aggregate_type,
    aggregate_id, event_id) of every event, opened as a member reads it."""
    if sql is not None:
        return query(server.db, sql)
    return [(e["aggregate_type"], e["aggregate_id"], e["event_id"]) for e in opened_log(server)]


def server_count(server):
    return server_rows(server, "SELECT count(*) FROM events")[0][0]


def check_server_log(server):
    text = server.log.read_text(errors="replace") if server.log.exists() else ""
    assert "Traceback" not in text, f"server logged a traceback:\n{text}"


def counts_line(out):
    """'stamped 1, pushed 2, pulled 3, resolved 4' -> dict."""
    return {k: int(v) for v, k in
            ((m.group(2), m.group(1)) for m in re.finditer(r"(stamped|pushed|pulled|resolved) (\d+)", out))}


class Watcher:
    """`sk sync watch` as a real subprocess, its stderr in a file."""

    def __init__(self, home, logdir):
        self.home = home
        self.errpath = logdir / f"watch-{os.path.basename(home)}-{uuid.uuid4().hex[:6]}.err"
        self._err = open(self.errpath, "wb")
        env = dict(os.environ, SK_HOME=str(home))
        self.proc = subprocess.Popen([command("sk"), "sync", "watch"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err)

    @property
    def pid(self):
        return self.proc.pid

    def text(self):
        return self.errpath.read_text(errors="replace")

    def connects(self):
        return len(re.findall(r"watch: connected\b", self.text()))

    def wait_connected(self, count=1, timeout=30):
        def ok():
            if self.proc.poll() is not None:
                raise AssertionError(f"watcher exited {self.proc.returncode}:\n{self.text()}")
            return self.connects() >= count
        wait_until(ok, timeout, f"watcher {self.home} to connect ({count})\n{self.text()}")

    def signal_stop(self, sig, timeout):
        """Send `sig`; return (exit code, seconds to exit)."""
        t = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"watcher did not stop within {timeout} s of {sig!r}:\n"
                                 f"{self.text()}") from None
        return rc, time.monotonic() - t

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"watcher still running after {timeout} s:\n{self.text()}") from None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._err.close()


@pytest.fixture
def watch(tmp_path):
    """A factory: watch(home) -> a running Watcher; all are killed at teardown."""
    started = []

    def start(home):
        w = Watcher(home, tmp_path)
        started.append(w)
        return w
    yield start
    for w in started:
        w.kill()



# -- fake servers in this process ----------------------------------------------------
class QuietHandler(BaseHTTPRequestHandler):
    """An http.server handler that logs nothing, with reply and body helpers."""

    def log_message(self, *a):
        pass

    def _reply(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


class HTTPServerThread:
    """A threaded http.server on a free 127.0.0.1 port, in this process."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class TcpProxy:
    """A TCP proxy on loopback in front of port `upstream`: every byte each way goes
    through passing(data, upward, conn) (conn: a dict per connection), which returns
    what to send on. Subclasses record or alter the traffic."""

    def __init__(self, upstream, backlog=16):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def passing(self, data, upward, conn):
        return data

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            conn = {}
            threading.Thread(target=self._pipe, args=(c, u, True, conn), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False, conn), daemon=True).start()

    def _pipe(self, src, dst, upward, conn):
        try:
            while data := src.recv(65536):
                dst.sendall(bytes(self.passing(data, upward, conn)))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self.sock.close()
