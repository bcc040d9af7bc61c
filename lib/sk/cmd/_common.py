"""What every command shares: the common flags and the error boundary."""

import argparse
import json
import signal
import sys

from ..commands import ENVIRONMENT, EXIT_STATUS


def parser(prog, description, json_flag=True, **kw):
    p = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="exit status: " + " ".join(EXIT_STATUS.split()),
        formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    common(p, json_flag)
    p._manpage = [{"heading": "exit status", "content": EXIT_STATUS},
                  {"heading": "environment", "content": ENVIRONMENT}]
    return p


def common(p, json_flag=True, suppress=False):
    """-q/-v (and --json) on parser p; suppress=True for a sub-parser that must not
    overwrite what its parent parsed."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="say more (per event)")
    if json_flag:
        p.add_argument("--json", action="store_true", default=d(False),
                       help="machine-readable output on stdout")


def home_flag(p):
    p.add_argument("--home", metavar="DIR",
                   help="device directory (default: $SK_HOME, else ~/.spec-kitty)")


def server_flags(p):
    p.add_argument("--server", metavar="URL", help="server URL (default: SK_SERVER)")
    p.add_argument("--key", metavar="KEY", help="API key (default: SK_API_KEY)")


def config(args):
    from ..config import Config
    return Config(getattr(args, "home", None),
                  {"SK_SERVER": getattr(args, "server", None), "SK_API_KEY": getattr(args, "key", None)})


def say(args, text):
    """Chatter for people: stderr, silenced by -q."""
    if not args.quiet:
        print(text, file=sys.stderr)


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")


def run(prog, get_parser, body, argv=None):
    """Parse argv, call body(args); turn sk errors into one line and an exit code."""
    from ..errors import SkError
    args = get_parser(prog).parse_args(argv)
    args.prog = prog
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = body(args)
        sys.stdout.flush()
        return code or 0
    except SkError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the disk, not the user: full, read-only, gone
        print(f"{prog}: {e.strerror or e}" + (f": '{e.filename}'" if e.filename else ""),
              file=sys.stderr)
        return 2
    except Exception as e:
        sqlite3, psycopg = sys.modules.get("sqlite3"), sys.modules.get("psycopg")
        if psycopg is not None and isinstance(e, psycopg.Error):   # the server's PostgreSQL
            print(f"{prog}: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 3 if isinstance(e, psycopg.OperationalError) else 2
        if sqlite3 is None or not isinstance(e, sqlite3.Error):
            raise
        print(f"{prog}: database error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def db_flag(p):
    p.add_argument("--db", metavar="DB",
                   help="server database: a SQLite path or postgresql://USER@HOST:PORT/DB"
                        " (default: $SK_SERVER_DB, else $SK_HOME/server.db)")


def server_db(args):
    import os

    from ..config import Config
    return args.db or os.environ.get("SK_SERVER_DB") or str(Config().home / "server.db")


def server_store(args, create=False):
    """Open the server's store for a server-side command; errors become exit 2.
    Only a command that is meant to (registering the first device) creates it."""
    from ..errors import ConfigError
    try:
        from sk_server.store import StoreError, open_store
    except ImportError as e:
        raise ConfigError(f"the sk server package is not installed: {e}") from None
    try:
        return open_store(server_db(args), create=create)
    except StoreError as e:
        raise ConfigError(str(e)) from None
