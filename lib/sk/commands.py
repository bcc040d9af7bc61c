"""The one table of commands: name, class, summary. `sk --help`, the man pages,
the README check and setup.cfg's console scripts all follow it."""

# (name, class, module under sk.cmd, summary); porcelain runs inside `sk`,
# plumbing is its own executable sk-<name> as well.
COMMANDS = (
    ("sync", "porcelain", "sync", "stamp, push, pull and resolve; status; setup; watch"),
    ("server", "porcelain", "server", "run the sk server under a production WSGI server"),
    ("append", "plumbing", "append", "append events (NDJSON or flags) to the local log, unstamped"),
    ("stamp", "plumbing", "stamp", "give unstamped events their id, node, Lamport clock and time"),
    ("push-batch", "plumbing", "push_batch", "push one batch (or --all) of queued events"),
    ("pull", "plumbing", "pull", "fetch the team's new events after the cursor, page by page"),
    ("resolve", "plumbing", "resolve", "fold unapplied events into the state; remap paths"),
    ("state", "plumbing", "state", "print the resolved state as JSON"),
    ("log", "plumbing", "log", "print the local log as NDJSON"),
    ("register", "plumbing", "register", "on the server host: create, list, revoke, rotate devices"),
    ("admin", "plumbing", "admin", "on the server host: migrate to PostgreSQL, backup, stats"),
)

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
        if entry[0] == name:
            return entry
    return None


def executables():
    """(executable name, module name) for every installed command."""
    return [("sk", "sk")] + [(f"sk-{n}", m) for n, c, m, _ in COMMANDS if c == "plumbing"]
