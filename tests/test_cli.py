"""The command line to git's standard (issue 16): --version everywhere, no silent
abbreviations, suggestions, the one -v style, never-sync rules said and checked,
reused event ids, status exit codes, signals recorded, read-only commands that
create nothing, completion, setup keeping what it should."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import (append, command, ev, free_port, log, run, status, sync,
                      unstamped_count)
from sk.commands import COMMANDS, executables

FAKE_KEY = "sk1.0123456789abcdef." + "A" * 43
UTC_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def interruptible():
    """In the child: SIGINT as a terminal gives it, even when this test runs where SIGINT
    is ignored (a background job of a shell ignores it, and its children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def device_argvs():
    """Every device command, as a user runs it."""
    out = [[exe] for exe, mod in executables() if mod.startswith("sk.")]
    out += [["sk", c.name] for c in COMMANDS if c.kind == "porcelain"
            and c.module.startswith("sk.")]
    return out


# -- conventions -------------------------------------------------------------------------
def test_version_on_every_command():
    from sk import __version__
    for argv in device_argvs():
        p = run(*argv, "--version")
        assert p.stdout.strip() == f"sk {__version__}", (argv, p.stdout)


def test_no_silent_abbreviations():
    p = run("sk-log", "--statu", "queued", code=2)
    assert "--statu" in p.stderr
    p = run("sk", "sync", "status", "--chec", code=2)
    assert "--chec" in p.stderr


def test_a_subcommand_usage_error_names_the_subcommand():
    p = run("sk", "sync", "status", "--chek", code=2)
    assert "sk sync status: unrecognized arguments: --chek" in p.stderr
    assert "see 'sk sync status --help'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_typo_suggests_the_command():
    p = run("sk", "snyc", code=2)
    assert "did you mean 'sync'?" in p.stderr
    p = run("sk", "zzzzzz", code=2)
    assert "did you mean" not in p.stderr and "not an sk command" in p.stderr


def test_n_is_only_dry_run():
    run("sk-append", "--type", "x", "--aggregate", "a:1")
    run("sk-append", "--type", "x", "--aggregate", "a:2")
    run("sk-stamp")
    p = run("sk-log", "-n", "1", code=2)
    assert "-n" in p.stderr
    lines = run("sk-log", "--limit", "1").stdout.splitlines()
    assert len(lines) == 1
    assert "--dry-run" in run("sk", "sync", "--help").stdout
    assert "NDJSON" in run("sk-log", "--help").stdout


def test_errors_off_a_terminal_carry_the_utc_time_even_with_q():
    p = run("sk-log", "--limit", "-1", code=2)
    assert re.match(UTC_TIME + r" sk-log: ", p.stderr), p.stderr
    env = dict(os.environ, SK_SERVER="http://127.0.0.1:1", SK_API_KEY=FAKE_KEY)
    p = run("sk", "sync", "-q", env=env, code=3)
    assert re.match(UTC_TIME + r" sk sync: ", p.stderr), p.stderr


def test_plurals():
    p = run("sk-append", "--type", "x", "--aggregate", "a:1")
    assert "appended 1 event (unstamped)" in p.stderr
    p = run("sk-append", input="".join(json.dumps(ev("x", f"a:{i}")) + "\n" for i in range(2)))
    assert "appended 2 events (unstamped)" in p.stderr
    assert "stamped 3 events" in run("sk-stamp").stderr


def test_append_help_says_timestamps_are_utc():
    text = " ".join(run("sk-append", "--help").stdout.split())
    assert "UTC" in text and "ending in Z" in text


# -- -v: one line per event, one style -----------------------------------------------------
def test_stamp_v_lines():
    eid = str(uuid.uuid4())
    run("sk-append", "--type", "feature_created", "--aggregate", "feature:F-1",
        "--event-id", eid)
    p = run("sk-stamp", "-v")
    assert f"stamped {eid} feature_created feature:F-1" in p.stderr.splitlines()


def test_state_v_and_status_v_say_something():
    run("sk-append", "--type", "x", "--aggregate", "a:1", "--set", "k=1")
    run("sk-stamp")
    p = run("sk-state", "-v")
    assert "not folded yet" in p.stderr and json.loads(p.stdout) == {}
    assert run("sk-state").stderr == ""
    plain = run("sk", "sync", "status").stdout
    more = run("sk", "sync", "status", "-v").stdout
    assert "clock:" in more and "clock:" not in plain


# -- never-sync rules -------------------------------------------------------------------------
def test_never_sync_rule_forms():
    from sk.event import NeverSync
    ns = NeverSync(["type=draft_*", "aggregate=project:secret-*", "feature:private-*"])
    assert ns.matches("feature", "F-1", "draft_saved")
    assert not ns.matches("feature", "F-1", "feature_created")
    assert ns.matches("project", "SECRET-1", "x")
    assert ns.matches("feature", "private-2", "x")
    assert not ns.matches("feature", "public", "x")


@pytest.mark.parametrize("rule", ["draft_*:*", "Feat ure:x", "type=", "type=a:b",
                                  "colour=blue", ":x", "feature:"])
def test_never_sync_rules_that_cannot_match_are_refused(rule):
    from sk.event import EventError, NeverSync
    with pytest.raises(EventError) as e:
        NeverSync([rule])
    assert repr(rule) in str(e.value)
    run("sk-append", "--type", "x", "--aggregate", "a:1")
    p = run("sk-stamp", env=dict(os.environ, SK_NEVER_SYNC=rule), code=2)
    assert "SK_NEVER_SYNC" in p.stderr and repr(rule) in p.stderr
    assert unstamped_count(os.environ["SK_HOME"]) == 1


def test_never_sync_by_event_type_stays_local_and_status_counts_it():
    home = os.environ["SK_HOME"]
    env = dict(os.environ, SK_NEVER_SYNC="type=draft_*")
    append(home, [ev("draft_saved", "feature:F-1", {"t": 1}),
                  ev("feature_created", "feature:F-2", {"t": 2})])
    run("sk-stamp", env=env)
    assert {e["aggregate_id"]: e["status"] for e in log(home)} == {"F-1": "local_only",
                                                                   "F-2": "queued"}
    assert status(home)["local_only"] == 1
    text = run("sk", "sync", "status").stdout
    assert re.search(r"^local-only:\s+1 \(kept on this device by the never-sync rules\)",
                     text, re.M), text
    helptext = " ".join(run("sk", "sync", "--help").stdout.split())
    assert "type=GLOB" in helptext and "TYPE:GLOB" in helptext


# -- reused event ids -----------------------------------------------------------------------
def test_event_id_reused_same_content_is_a_duplicate_other_content_an_error():
    home = os.environ["SK_HOME"]
    eid = str(uuid.uuid4())
    flags = ["--type", "feature_created", "--aggregate", "feature:F-1", "--event-id", eid]
    run("sk-append", *flags, "--set", "title=Login")
    run("sk-stamp")
    p = run("sk-append", *flags, "--set", "title=Login")                 # the same event
    assert f"event {eid} is in the log already (a duplicate)" in p.stderr
    assert unstamped_count(home) == 0
    p = run("sk-append", *flags, "--set", "title=Other", code=1)         # another event
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and eid in lines[0] and "other content" in lines[0], p.stderr
    aside = log(home, "--rejected")
    assert [(e["event_id"], e["payload"]) for e in aside] == [(eid, {"title": "Other"})]
    assert "other content" in aside[0]["reason"]
    assert [e["payload"] for e in log(home)] == [{"title": "Login"}]
    assert status(home)["rejected"] == 1


def test_event_id_reused_by_another_program_is_set_aside_at_stamp():
    import sqlite3
    home = os.environ["SK_HOME"]
    eid = str(uuid.uuid4())
    run("sk-append", "--type", "t", "--aggregate", "a:1", "--event-id", eid, "--set", "v=1")
    run("sk-stamp")
    db = sqlite3.connect(os.path.join(home, "sk.db"))
    with db:
        db.execute("INSERT INTO unstamped(event_id, event_type, aggregate_type, aggregate_id,"
                   " payload) VALUES (?, 't', 'a', '1', '{\"v\": 2}')", (eid,))
        db.execute("INSERT INTO unstamped(event_id, event_type, aggregate_type, aggregate_id,"
                   " payload) VALUES (?, 't', 'a', '1', '{\"v\":1}')", (eid,))
    db.close()
    p = run("sk-stamp", code=1)
    assert "other content" in p.stderr and "dropped 1 duplicate" in p.stderr
    assert [e["payload"] for e in log(home, "--rejected")] == [{"v": 2}]
    assert unstamped_count(home) == 0


# -- status for monitoring, signals -------------------------------------------------------------
def dead_env():
    return dict(os.environ, SK_SERVER=f"http://127.0.0.1:{free_port()}", SK_API_KEY=FAKE_KEY)


def test_status_exits_1_after_a_failed_run_and_q_prints_nothing():
    home = os.environ["SK_HOME"]
    run("sk-append", "--type", "x", "--aggregate", "a:1")
    assert run("sk", "sync", "status").returncode == 0
    sync(home, env=dead_env(), code=3)
    p = run("sk", "sync", "status", "-q", code=1)
    assert p.stdout == "" and p.stderr == ""
    assert run("sk", "sync", "status", code=1).stdout.count("failures since:") == 1
    assert status(home)["failures_since"] == 1      # --json exits 1 too (the helper checks)


class SilentServer:
    """A port that takes connections and never answers; `connected` is set once a
    client is waiting on it."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connected = threading.Event()
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def silent_server():
    srv = SilentServer()
    yield srv
    srv.close()


@pytest.mark.parametrize("argv,sig", [(["sk", "sync"], signal.SIGTERM),
                                      (["sk", "sync"], signal.SIGHUP),
                                      (["sk", "sync"], signal.SIGINT),
                                      (["sk-stamp", "&&", "sk-pull"], signal.SIGTERM),
                                      (["sk-stamp", "&&", "sk-push-batch"], signal.SIGHUP)])
def test_a_signal_during_a_tracked_run_is_a_failed_run(silent_server, argv, sig):
    """sk sync, and the plumbing that tracks its runs (sk-pull, sk-push-batch)."""
    home = os.environ["SK_HOME"]
    run("sk-append", "--type", "x", "--aggregate", "a:1")
    env = dict(os.environ, SK_SERVER=silent_server.url, SK_API_KEY=FAKE_KEY)
    if argv[1] == "&&":
        run(argv[0], env=env)
        argv = argv[2:]
    proc = subprocess.Popen([command(argv[0]), *argv[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    assert silent_server.connected.wait(30)      # the run is waiting on the server
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err
    name = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert name in err
    info = status(home)
    assert info["failures_since"] == 1 and info["last_error"] == name
    assert info["unstamped"] == 0 and info["queued"] == 1      # the stamp was kept


# -- read-only commands create nothing ---------------------------------------------------------
@pytest.mark.parametrize("argv", [["sk-log"], ["sk-state"], ["sk", "sync", "status"],
                                  ["sk", "conflicts"], ["sk", "blame", "a:1"],
                                  ["sk", "sync", "status", "-v"]])
def test_read_only_commands_create_nothing_at_a_typo_home(tmp_path, argv):
    typo = tmp_path / "no" / "such-home"
    p = run(*argv, "--home", str(typo), code=None)
    assert "Traceback" not in p.stderr
    assert not typo.exists() and not typo.parent.exists(), argv


# -- completion -------------------------------------------------------------------------------
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell):
    text = run("sk", "completion", shell).stdout
    assert len(text) > 1000
    for word in ("conflicts", "--shallow", "--dry-run", "status"):
        if shell == "fish" and word.startswith("--"):
            word = f"-l {word[2:]}"          # fish: complete -c sk ... -l shallow
        assert word in text, (shell, word)


def test_bash_completion_sourced_completes_the_plumbing_executables_too():
    """Sourced by bash, the script registers a completion for `sk` and for each sk-*
    executable, and completes an sk-log flag."""
    text = run("sk", "completion", "bash").stdout
    probe = text + """
complete -p sk sk-append sk-log sk-push-batch >/dev/null || exit 7
COMP_WORDS=(sk-log --li); COMP_CWORD=1; COMP_LINE="sk-log --li"; COMP_POINT=${#COMP_LINE}
$(complete -p sk-log | sed -E 's/.* -F ([^ ]+) .*/\\1/') sk-log --li sk-log
printf '%s\\n' "${COMPREPLY[@]}"
"""
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--limit" in p.stdout.split(), p.stdout
    assert "complete -c sk-append" in run("sk", "completion", "fish").stdout


def test_completion_refuses_other_shells_and_shtab_stays_out_of_other_commands():
    run("sk", "completion", "tcsh", code=2)
    code = ("import sys; from sk.cmd import sync, log, append, sk; sync.get_parser();"
            " assert 'shtab' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- setup ---------------------------------------------------------------------------------------
def test_setup_refuses_to_replace_a_key_without_a_terminal_or_yes(tmp_path):
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    env_file = home / ".env"
    env_file.write_text(f"SK_SERVER='http://127.0.0.1:{free_port()}'\nSK_API_KEY='{FAKE_KEY}'\n")
    other = "sk1.fedcba9876543210." + "B" * 43
    p = run("sk", "sync", "setup", "--key", other, home=home, code=2)
    assert "--yes" in p.stderr
    assert FAKE_KEY in env_file.read_text()
    # with --yes it goes on to verify the key at the URL kept from .env (unreachable here)
    p = run("sk", "sync", "setup", "--key", other, "--yes", home=home, code=3)
    assert "127.0.0.1" in p.stderr
    assert FAKE_KEY in env_file.read_text()


# -- man pages --------------------------------------------------------------------------------------
def test_man_pages_go_to_share_man_man1():
    import configparser

    from conftest import ROOT
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options.data_files"]["share/man/man1"].strip() == "man/*.1"


# -- against a real server (slow) ---------------------------------------------------------------
def test_dry_run_counts_stamping_and_lists_with_v(server, device):
    a = device("dry")
    append(a, [ev("feature_created", "feature:F-1", {"t": 1})])
    summary = json.loads(sync(a, "-n", "--json").stdout)
    assert (summary["would_stamp"], summary["would_push"], summary["would_resolve"]) == (1, 1, 1)
    text = sync(a, "-n").stdout
    assert text.startswith("would stamp 1, push 1, pull at most 0, resolve 1;"), text
    lines = sync(a, "-n", "-v").stderr.splitlines()
    assert "would stamp (new id) feature_created feature:F-1" in lines
    assert "would push (new id) feature_created feature:F-1" in lines
    assert unstamped_count(a) == 1 and log(a) == []          # nothing changed
    out = sync(a, "-v")
    assert re.search(r"pushed 1\b", out.stdout), out.stdout
    eid = log(a)[0]["event_id"]
    assert f"stamped {eid} feature_created feature:F-1" in out.stderr.splitlines()
    assert f"pushed {eid} feature_created feature:F-1" in out.stderr.splitlines()
    summary = json.loads(sync(a, "-n", "--json").stdout)
    assert (summary["would_stamp"], summary["would_push"], summary["would_resolve"]) == (0, 0, 0)
    # offline: what is here is counted still, and it says what is not
    append(a, [ev("feature_created", "feature:F-2", {"t": 2})])
    env = (a / ".env").read_text()
    (a / ".env").write_text(env.replace(server.url, "http://127.0.0.1:9"))
    p = sync(a, "-n")
    assert p.stdout.startswith("would stamp 1, push 1, pull at most ?, resolve 1;"), p.stdout
    assert "cannot reach server" in p.stderr and "what it would pull is not counted" in p.stderr, p.stderr
    assert json.loads(sync(a, "-n", "--json").stdout)["unreachable"]


def read_until(proc, word, timeout=60):
    """Lines of proc's stderr until one begins with `word`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith(word):
            return line
    raise AssertionError(f"no '{word}' line from {proc.args}")


@pytest.mark.parametrize("server_db", ["sqlite"], indirect=True)   # the device is the point

def _sync_stopped(home, until, sig, code):
    """Run `sk sync -v` in home, send it `sig` once its stderr says `until`, and check
    it stops within 5 s with exit `code`; returns its stderr."""
    proc = subprocess.Popen([command("sk"), "sync", "-v"], env=dict(os.environ, SK_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    read_until(proc, until)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5 and proc.returncode == code, (proc.returncode, err[-500:])
    return err

def test_ctrl_c_stops_push_and_pull_at_once_with_a_summary(server, device):
    a, b = device("big-a"), device("big-b")
    append(a, [ev("feature_created", "feature:F-first", {"i": -1})])
    sync(a)
    sync(b)            # b has read the log: it pulls what follows (no snapshot to begin at)
    n = 30000
    run("sk-append", home=a, timeout=120, input="".join(
        json.dumps(ev("feature_created", f"feature:F-{i}", {"i": i})) + "\n" for i in range(n)))
    err = _sync_stopped(a, "pushed ", signal.SIGINT, 130)
    last = err.strip().splitlines()[-1]
    m = re.search(r"sk sync: interrupted; pushed ([\d,]+) of 30,000; run 'sk sync' to go on$",
                  last)
    assert m, last
    info = status(a)
    assert info["failures_since"] == 1 and info["last_error"] == "interrupted"
    assert info["unapplied"] == n                  # it did not go on to resolve everything
    assert 0 < info["queued"] < n
    assert n - info["queued"] >= int(m.group(1).replace(",", ""))
    run("sk", "sync", home=a, timeout=300)
    assert status(a)["queued"] == 0 and status(a)["unapplied"] == 0
    # the other device, interrupted while it pulls: one SIGTERM is enough
    err = _sync_stopped(b, "pulled ", signal.SIGTERM, 143)
    assert re.search(r"sk sync: stopped by SIGTERM; pulled [\d,]+ events; run 'sk sync' to go"
                     r" on$", err.strip().splitlines()[-1]), err[-300:]
    assert status(b)["last_error"] == "stopped by SIGTERM"
    run("sk", "sync", home=b, timeout=300)
    assert len(json.loads(run("sk-state", "feature", home=b).stdout)) == n + 1


@pytest.mark.parametrize("server_db", ["sqlite"], indirect=True)   # the device is the point
def test_setup_key_keeps_the_url_and_watch_json_and_times(server, device):
    a = device("setup-a")
    env_file = a / ".env"
    url_line = [ln for ln in env_file.read_text().splitlines() if ln.startswith("SK_SERVER=")]
    new_key = server.register("setup-a2")
    run("sk", "sync", "setup", "--key", new_key, home=a, code=2)          # no terminal, no --yes
    p = run("sk", "sync", "setup", "--key", new_key, "-y", home=a)
    assert "setup-a2" in p.stderr
    text = env_file.read_text()
    assert new_key in text and [ln for ln in text.splitlines()
                                if ln.startswith("SK_SERVER=")] == url_line
    proc = subprocess.Popen([command("sk"), "sync", "watch", "--json"],
                            env=dict(os.environ, SK_HOME=str(a)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["state"] and re.fullmatch(UTC_TIME, first["time"]), first
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert err and all(re.match(UTC_TIME + " sk sync watch: ", ln) for ln in err.splitlines()), err
