#!/usr/bin/env python3
"""Throwaway PostgreSQL servers for tests and benchmarks.

    with PgCluster() as pg:
        url = pg.create_database("t1")   # postgresql://USER@127.0.0.1:PORT/t1

The binaries (PostgreSQL 14+) come from the `pgserver` wheel, found with
importlib.util.find_spec, which does not run the package's import-time side
effects, or from the directory named by $SK_PG_BIN. Each cluster has its own base
dir (a fresh temp dir unless one is given), data dir and free port on 127.0.0.1;
unix sockets are off and auth is trust, so the URL needs no password.

PostgreSQL refuses to run as root, and CI runs as root. Then initdb and postgres
run as `nobody`, who must reach every file they use: the data dir is handed to
nobody, and the wheel's install tree is copied into the base dir and made
world-readable, because the venv it sits in need not be reachable by nobody. The
copy keeps the wheel's layout (pgserver/pginstall next to pgserver.libs): the
binaries find libpq through an $ORIGIN-relative rpath and their share and lib
dirs relative to themselves. $SK_PG_BIN is used in place, so as root it must be
readable by nobody; a base_dir passed in must then be traversable by nobody.
start() on a base_dir whose data dir was made before starts that cluster again,
on the same port unless another is given (stop() leaves a given base_dir alone).

`python tools/pgcluster.py` runs one with durable settings, prints its URL and
stops it on SIGINT/SIGTERM.
"""

import argparse
import atexit
import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

DB_NAME = re.compile(r"[a-z0-9_]+")


def _bin_dir():
    """(directory holding initdb and postgres, whether it is the pgserver wheel's)."""
    if os.environ.get("SK_PG_BIN"):
        return Path(os.environ["SK_PG_BIN"]), False
    spec = importlib.util.find_spec("pgserver")
    if spec is None:
        raise RuntimeError("no PostgreSQL binaries: install pgserver or set SK_PG_BIN")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin", True


def _copy_install(bin_dir, dest):
    """Copy the wheel's install tree under dest, readable by all; return the copy's bin dir."""
    pkg = bin_dir.parent.parent
    skip = shutil.ignore_patterns("include", "*.a")
    shutil.copytree(pkg / "pginstall", dest / "pgserver" / "pginstall", symlinks=True, ignore=skip)
    if (pkg.parent / "pgserver.libs").is_dir():
        shutil.copytree(pkg.parent / "pgserver.libs", dest / "pgserver.libs", symlinks=True)
    for root, _, files in os.walk(dest):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)
    return dest / "pgserver" / "pginstall" / "bin"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One throwaway PostgreSQL server on 127.0.0.1: start() and stop() it, or use `with`.

    fsync=False (tests) turns off fsync, synchronous_commit and full_page_writes;
    fsync=True (benchmarks) keeps PostgreSQL's durable defaults. port, base_dir and
    data_dir are set by start()."""

    def __init__(self, base_dir=None, port=None, fsync=False):
        self._base_arg = base_dir
        self._port_arg = port
        self.fsync = fsync
        self.port = port
        self.base_dir = self.data_dir = None
        self._proc = None
        self._made_base = False
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("nobody")
            except KeyError:
                raise RuntimeError("running as root, PostgreSQL needs a user 'nobody' to run as") from None
            self._as = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        else:
            pw = pwd.getpwuid(os.geteuid())
            self._as = {}
        self.user = pw.pw_name

    def __enter__(self):
        return self if self._proc else self.start()

    def __exit__(self, *exc):
        self.stop()

    def url(self, dbname="postgres"):
        """postgresql://USER@127.0.0.1:PORT/DBNAME (trust auth: no password)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout=30):
        """Create the cluster and start the server; return self once it accepts connections."""
        if self._proc:
            raise RuntimeError("cluster already started")
        atexit.register(self.stop)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        bin_dir, from_wheel = _bin_dir()
        if self._base_arg is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="sk-pg-"))
            self._made_base = True
        else:
            self.base_dir = Path(self._base_arg).resolve()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._as and self._made_base:
            os.chmod(self.base_dir, 0o711)  # mkdtemp's 0700 would keep nobody out
        if self._as and from_wheel:   # (a base dir started before has its copy)
            copied = self.base_dir / "pginstall" / "pgserver" / "pginstall" / "bin"
            bin_dir = copied if copied.is_dir() else _copy_install(bin_dir, self.base_dir / "pginstall")
        for tool in ("initdb", "postgres"):
            if not os.access(bin_dir / tool, os.X_OK):
                raise RuntimeError(f"no executable {tool} in {bin_dir}")
        self.bin_dir = bin_dir   # pg_dump, pg_restore, psql of the same version too

        self.data_dir = self.base_dir / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        run = dict(env=env, cwd=self.base_dir, stdin=subprocess.DEVNULL, **self._as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, run)
        self.port = self._port_arg or self.port or _free_port()
        settings = {"listen_addresses": "127.0.0.1", "port": self.port, "unix_socket_directories": "",
                    "max_connections": 300, "shared_buffers": "128MB"}
        if not self.fsync:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        cmd = [bin_dir / "postgres", "-D", self.data_dir]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        with open(self.base_dir / "postgres.log", "ab") as log:
            # own session: a Ctrl-C meant for the caller does not shut the server down behind it
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, **run)
        self._wait_ready(timeout)

    def _initdb(self, bin_dir, run):
        self.data_dir.mkdir(mode=0o700)
        if self._as:
            os.chown(self.data_dir, self._as["user"], self._as["group"])
        init = subprocess.Popen(
            [bin_dir / "initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust", "-E", "UTF8",
             "--no-locale", "--no-sync", "--no-instructions"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **run)
        try:
            out = init.communicate()[0]
        except BaseException:  # interrupted: take initdb's bootstrap postgres down with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(init.pid, signal.SIGKILL)
            init.wait()
            raise
        if init.returncode:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{out}")

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout}s:\n{self._log_tail()}") from None
                time.sleep(0.02)

    def _log_tail(self, lines=20):
        try:
            text = (self.base_dir / "postgres.log").read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        """Shut the server down and remove the base dir if start() made it; idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown, as `pg_ctl stop -m immediate`
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._made_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._made_base = False

    def create_database(self, name, template=None):
        """Create database `name` ([a-z0-9_]+), as a copy of database `template` if
        given (which must have no sessions); return its URL."""
        self._check_name(name)
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            self._check_name(template)
            sql += f' TEMPLATE "{template}"'
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)
        return self.url(name)

    def drop_database(self, name):
        """Drop database `name` if it exists, disconnecting its sessions."""
        self._check_name(name)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    def _check_name(name):
        if not DB_NAME.fullmatch(name):
            raise ValueError(f"bad database name {name!r}: use [a-z0-9_]+")


def main():
    parser = argparse.ArgumentParser(
        description="Run a throwaway PostgreSQL server (durable settings) until SIGINT/SIGTERM; print its URL.")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    stop_on = {signal.SIGINT, signal.SIGTERM}
    for sig in stop_on:  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, signal.default_int_handler)
    try:
        with PgCluster(port=args.port, fsync=True) as pg:
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_on)  # so sigwait cannot miss one
            print(pg.url(), flush=True)
            signal.sigwait(stop_on)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
