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
    Command("completion", "porcelain", "sk.cmd.completion",
            "print a bash, zsh or fish completion script for sk", ""),
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

NEVER_SYNC_SYNTAX = """\
A never-sync rule keeps the events it matches on this device (local-only):
TYPE:GLOB (or aggregate=TYPE:GLOB) matches events of aggregate type TYPE (or
* for every type) whose aggregate id matches the shell glob GLOB; type=GLOB
matches events whose event type matches GLOB. Case does not count. Rules are
separated by commas; a rule that could never match is refused."""

ENVIRONMENT = """\
SK_HOME: the device directory (default ~/.spec-kitty) holding .env and sk.db.
SK_SERVER, SK_API_KEY: the server URL and this device's key; a flag beats the
environment, which beats $SK_HOME/.env. SK_NEVER_SYNC: extra never-sync rules,
comma-separated, for events that never leave the device: TYPE:GLOB (aggregate
type, glob over the aggregate id; aggregate=TYPE:GLOB says the same) or
type=GLOB (glob over the event type), e.g. 'feature:private-*,type=draft_*'; a
rule that could never match is refused (exit 2). SK_PATH_MAP: FROM=TO,... paths to remap in the
state. SK_SERVER_DB: the server's database, a SQLite path or postgresql://URL
(server-side commands). SK_SERVER_SECRET, SK_SERVER_SECRET_FILE: the server secret
that wraps key material, or the file holding it (needed for PostgreSQL)."""


FILES = """\
$SK_HOME/.env: the server URL and API key (mode 600, written by sk sync setup).
$SK_HOME/sk.db: the device's local log, state and bookkeeping (SQLite, WAL).
$SK_HOME/sync.lock: one network run at a time on this device."""

SERVER_FILES = """\
The server database: --db or SK_SERVER_DB (a SQLite file, or postgresql://URL).
The server secret that wraps key material: a file beside a SQLite database, or
SK_SERVER_SECRET / SK_SERVER_SECRET_FILE (needed for PostgreSQL)."""

# EXAMPLES of each man page, by command (and `sk` itself); genman.py puts them in
EXAMPLES = {
    "sk": "sk sync\nsk help sync\nsk log --limit 5",
    "sync": "sk sync setup --server https://sk.example.org --key KEY\nsk sync\n"
            "sk sync -n -v\nsk sync status -q || echo 'the last sync failed'\n"
            "SK_NEVER_SYNC='feature:private-*,type=draft_*' sk sync\nsk sync watch --json",
    "team": "sk team members\nsk team approve laptop",
    "conflicts": "sk conflicts\nsk conflicts feature:F-1 --all --json",
    "blame": "sk blame feature:F-1",
    "completion": "sk completion bash > ~/.local/share/bash-completion/completions/sk\n"
                  "sk completion fish > ~/.config/fish/completions/sk.fish",
    "server": "sk server --db /var/lib/sk/server.db --port 9100",
    "append": "sk-append --type feature_created --aggregate feature:F-1 --set title=Login\n"
              "producer | sk-append",
    "stamp": "sk-stamp -v",
    "push-batch": "sk-push-batch --all\nsk-push-batch --retry-rejected",
    "pull": "sk-pull\nsk-pull --print | jq .\nsk-pull --unshallow",
    "resolve": "sk-resolve\nsk-resolve --map /home/alice=/Users/alice",
    "state": "sk-state --pretty\nsk-state feature:F-1\nsk-state --at 2026-12-01T09:30:00Z",
    "log": "sk-log --limit 10\nsk-log --rejected\nsk-log --aggregate feature:F-1 | jq .payload",
    "register": "sk-register --name laptop --team default --db /var/lib/sk/server.db",
    "admin": "sk-admin backup --db /var/lib/sk/server.db --to /backup/sk.db",
}


def man_name(entry):
    """The man page of a command: sk-sync(1) for `sk sync`, sk-log(1) for sk-log."""
    return f"sk-{entry.name}"


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
