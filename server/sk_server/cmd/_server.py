"""What the server host's commands share: the --db flag, opening the store, and
turning store errors into one line and an exit code."""

import functools
import os
import sys

from sk.errors import ConfigError, Unreachable, UsageError


def db_flag(p):
    p.add_argument("--db", metavar="DB",
                   help="server database: a SQLite path or postgresql://USER@HOST:PORT/DB"
                        " (default: $SK_SERVER_DB, else $SK_HOME/server.db)")


def server_db(args):
    from sk.config import Config
    return args.db or os.environ.get("SK_SERVER_DB") or str(Config().home / "server.db")


def server_store(args, create=False):
    """Open the server's store for a server-side command. Only the commands meant
    to (sk server, sk-admin init) create it; the others refuse a path with none."""
    from ..store import open_store
    return open_store(server_db(args), create=create)


def require_metrics():
    import importlib.util

    from sk.commands import SERVER_EXTRA
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"--metrics needs prometheus-client, which is not installed:"
                          f" {SERVER_EXTRA}")


def require_server_extra():
    """The server's own dependencies come with the server extra; a device has
    none of them."""
    import importlib.util

    from sk.commands import SERVER_EXTRA
    missing = [m for m in ("flask", "flask_sock", "gunicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this runs on the server host, and this installation has no server"
                          f" ({', '.join(missing)} missing): {SERVER_EXTRA}")


def server_command(body):
    """A server command's body: refused where the server extra is not installed;
    its store errors are the user's to fix (exit 2), or a database that does not
    answer (exit 3), said in one line."""
    @functools.wraps(body)
    def wrapped(args, ctx):
        from ..store import StoreError, StoreUnavailable
        require_server_extra()
        psycopg = sys.modules.get("psycopg")
        try:
            return body(args, ctx)
        except StoreUnavailable as e:
            raise Unreachable(str(e)) from None
        except StoreError as e:
            raise UsageError(str(e)) from None
        except Exception as e:
            if psycopg is not None and isinstance(e, psycopg.Error):
                raise ConfigError(f"database error: {str(e).strip().splitlines()[0]}") from None
            raise
    return wrapped
