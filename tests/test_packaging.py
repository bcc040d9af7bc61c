"""`pip install sk` is a device: the library and the device commands, without Flask,
gunicorn or psycopg; `pip install 'sk[server]'` adds the server. The device
library never imports the server package."""

import ast
import configparser
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, run

pytestmark = pytest.mark.one_backend   # device-side: see conftest

SERVER_DEPS = ("flask", "flask-sock", "gunicorn", "psycopg", "psycopg-pool")


def test_the_device_library_never_imports_the_server_package():
    offenders = []
    for path in (ROOT / "lib" / "sk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("sk_server", "flask", "gunicorn", "psycopg")]
    assert offenders == []


def test_server_dependencies_come_only_with_the_server_extra():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    device = cfg["options"]["install_requires"].lower()
    server = cfg["options.extras_require"]["server"].lower()
    for dep in SERVER_DEPS:
        assert dep not in device.replace("websocket-client", ""), dep
        assert dep in server, dep


@pytest.mark.slow
@pytest.mark.parametrize("server_db", ["sqlite"], indirect=True)   # the device is the point
def test_a_device_install_syncs_and_refuses_the_server_commands(tmp_path, server):
    """A fresh venv with `pip install .` (no extras): no server dependency installed;
    sk server, sk-register and sk-admin exit 2 naming the extra; the device commands
    sync against a real server."""
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    for dep in SERVER_DEPS:
        assert f"\n{dep}==" not in "\n" + listed, f"{dep} installed on a device"
    # the man pages, where man looks (share/man/man1 of the prefix): `man sk-sync` finds them
    man1 = venv / "share" / "man" / "man1"
    assert sorted(p.name for p in man1.glob("sk*.1")) == sorted(p.name for p in
                                                                 (ROOT / "man").glob("*.1"))
    if shutil.which("man"):
        found = subprocess.run(["man", "-w", "sk-sync"], capture_output=True, text=True,
                               env={**os.environ, "MANPATH": str(venv / "share" / "man")})
        assert found.stdout.strip() == str(man1 / "sk-sync.1"), found
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    for argv in (["sk", "server", "--port", str(free_port())], ["sk-register", "--list"],
                 ["sk-admin", "stats"]):
        p = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True,
                           text=True, env=env, timeout=60)
        assert p.returncode == 2, (argv, p.stdout, p.stderr)
        assert "pip install 'sk[server]'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    home = tmp_path / "device-home"
    key = server.register("plain-device")
    env["SK_HOME"] = str(home)
    for argv in (["sk", "sync", "setup", "--server", server.url, "--key", key],
                 ["sk-append", "--type", "feature_created", "--aggregate", "feature:F-1",
                  "--set", "title=Login"],
                 ["sk", "sync"]):
        p = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, (argv, p.stdout, p.stderr)
    assert run("sk-state", "feature:F-1", home=home).stdout.strip() == '{"title":"Login"}'
