"""Shared fixtures: a scrubbed environment with a temporary HOME/SK_HOME for every
test, and a real `sk server` process on a free loopback port."""

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
         "SK_SERVER_DB", "SK_TIMEOUT")


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


def query(path, sql, args=()):
    """The rows of `sql` on a SQLite file opened read-only."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


class ServerProcess:
    """`sk server` as a real process; stopped by its own PID."""

    def __init__(self, db, port=None, extra=()):
        self.db = Path(db)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.db.with_suffix(".log")
        self.extra = list(extra)
        self.proc = None

    def start(self, timeout=20):
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [command("sk"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--db", str(self.db), "--no-control-socket", *self.extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def register(self, name, team="default"):
        return sk("sk-register", "--name", name, "--team", team, "--db", self.db,
                  check=0).stdout.strip()


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "server.db").start()
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
