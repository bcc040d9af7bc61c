"""Shared fixtures: a scrubbed environment with a temporary HOME/SK_HOME for every
test, the server database of a test on each backend (a SQLite file, or a fresh
database on a real PostgreSQL started for the session), and a real `sk server`
process on a free loopback port.

SK_TEST_BACKENDS=sqlite (or postgresql) runs the server tests on one backend only."""

import itertools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent          # the venv's installed commands
SCRUB = ("SK_HOME", "SK_SERVER", "SK_API_KEY", "SK_NEVER_SYNC", "SK_PATH_MAP",
         "SK_SERVER_DB", "SK_TIMEOUT", "SK_SERVER_SECRET", "SK_SERVER_SECRET_FILE")
BACKENDS = os.environ.get("SK_TEST_BACKENDS", "sqlite,postgresql").split(",")


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


@pytest.fixture(scope="session")
def pg_cluster():
    """One real PostgreSQL for the session (from the pgserver wheel's binaries)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from pgcluster import PgCluster
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


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
        return home
    return make


def have(tool):
    return shutil.which(tool) is not None
