"""The one table of commands: name, class, module, summary and what each needs.
`sk --help`, the man pages, the README check and setup.cfg's console scripts all
follow it.

Porcelain runs inside `sk`; plumbing is its own executable sk-<name> as well.
Commands of the server package (module sk_server.cmd.*) come with
`pip install 'sk[server]'`.

What a command needs, as git's RUN_SETUP flags say it, is provided by the one
runner (sk.cmd._common.run) before the command's body runs:
  store   the device's local log, created if missing
  log     the device's local log, which must exist (read-only commands create nothing)
  client  a client for the configured server and key
  lock    the device's sync lock (one network run at a time)
  track   the run's outcome recorded for `sk sync status`
  keys    the team key, brought up to date and shared (sk.keyring) before the body runs
"""

from collections import namedtuple

Command = namedtuple("Command", "name kind module summary needs")

COMMANDS = (
    Command("sync", "porcelain", "sk.cmd.sync",
            "stamp, push, pull and resolve; status; setup; watch",
            # sk sync takes its own lock and tracks itself: a dry run must do neither
            {"now": "store client", "status": "", "setup": "", "watch": "store client"}),
    Command("team", "porcelain", "sk.cmd.team",
            "the team key's members; approve a device; require approval",
            {"members": "store client lock", "approve": "store client lock",
             "require-approval": "store client lock"}),
    Command("conflicts", "porcelain", "sk.cmd.conflicts",
            "the concurrent edits last-writer-wins decided, and what they overwrote", "log"),
    Command("blame", "porcelain", "sk.cmd.blame",
            "each key of an aggregate: its value and the event behind it", "log"),
    Command("server", "porcelain", "sk_server.cmd.server",
            "run the sk server under a production WSGI server", ""),
    Command("append", "plumbing", "sk.cmd.append",
            "append events (NDJSON or flags) to the local log, unstamped", "store"),
    Command("stamp", "plumbing", "sk.cmd.stamp",
            "give unstamped events their id, node, Lamport clock and time", "store"),
    Command("push-batch", "plumbing", "sk.cmd.push_batch",
            "push one batch (or --all) of queued events", "store client lock track keys"),
    Command("pull", "plumbing", "sk.cmd.pull",
            "fetch the team's new events after the cursor, page by page",
            "store client lock track keys"),
    Command("resolve", "plumbing", "sk.cmd.resolve",
            "fold unapplied events into the state; remap paths", "log"),
    Command("state", "plumbing", "sk.cmd.state", "print the resolved state as JSON", "log"),
    Command("log", "plumbing", "sk.cmd.log", "print the local log as NDJSON", "log"),
    Command("register", "plumbing", "sk_server.cmd.register",
            "on the server host: create, list, revoke, rotate devices", ""),
    Command("admin", "plumbing", "sk_server.cmd.admin",
            "on the server host: init, status, verify, migrate to PostgreSQL, backup, stats",
            ""),
)
SERVER_EXTRA = "pip install 'sk[server]'"

EXIT_STATUS = """\
0 ok; 1 partial (something was rejected or left unsynced); 2 usage or local
configuration error; 3 server unreachable; 4 authentication rejected (unknown,
revoked or rotated key); 5 integrity or protocol failure (a response failed to
decrypt, was altered or malformed, or the protocol versions differ)."""

ENVIRONMENT = """\
SK_HOME: the device directory (default ~/.spec-kitty) holding .env and sk.db.
SK_SERVER, SK_API_KEY: the server URL and this device's key; a flag beats the
environment, which beats $SK_HOME/.env. SK_NEVER_SYNC: extra TYPE:GLOB rules for
events that never leave the device. SK_PATH_MAP: FROM=TO,... paths to remap in the
state. SK_SERVER_DB: the server's database, a SQLite path or postgresql://URL
(server-side commands). SK_SERVER_SECRET, SK_SERVER_SECRET_FILE: the server secret
that wraps key material, or the file holding it (needed for PostgreSQL)."""


def find(name):
    for entry in COMMANDS:
        if entry.name == name:
            return entry
    return None


def by_module(module):
    for entry in COMMANDS:
        if entry.module == module:
            return entry
    return None


def needs(entry, action=None):
    """The set of what `entry` needs (for `action`, when it has several)."""
    want = entry.needs
    if isinstance(want, dict):
        want = want.get(action or next(iter(want)), "")
    return set(want.split())


def executables():
    """(executable name, module) for every installed command."""
    return [("sk", "sk.cmd.sk")] + [(f"sk-{c.name}", c.module) for c in COMMANDS
                                    if c.kind == "plumbing"]
