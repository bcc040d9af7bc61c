"""sk server: run the server under gunicorn (gthread)."""

from sk.cmd import _common

from . import _server

DESCRIPTION = """\
Run the sk server: the Flask application under gunicorn with the gthread
worker (a production WSGI server, not the Flask development server). The
database is --db, else $SK_SERVER_DB, else $SK_HOME/server.db: a SQLite file
(created if missing), or postgresql://USER@HOST:PORT/DB, which several servers
(with --no-control-socket) may share behind any load balancer. Register devices
with sk-register against the same database. Stop it with SIGTERM or Ctrl-C.
`python -m sk_server` does the same.

Each device's key material in the database is wrapped with the server secret,
which is kept out of the database: SK_SERVER_SECRET (32 bytes, base64url), else
the file SK_SERVER_SECRET_FILE, else the file beside the database (server.db ->
server.secret, created with mode 600 together with a new database); for
PostgreSQL one of the first two is required. Back it up with the database,
apart from it; several servers on one database share it.
Repeated failed authentication from one address (20 a minute) is answered with
429 until the minute is over; behind a proxy or load balancer, give
--forwarded-for so that the address is the client's, not the proxy's.

Snapshots: when a team's log has grown --snapshot-every events (default
10000, or $SK_SNAPSHOT_EVERY; 0: never) past its newest snapshot, the server
asks the next device that syncs (sk sync, sk sync watch) for one, at most once
a minute. The device seals it under the team key; the server keeps the newest
3 per team, and gives the newest to a fresh device (sk sync --shallow)."""


def get_parser(prog="sk server"):
    p = _common.parser(prog, DESCRIPTION, json_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9100, help="port (default 9100)")
    _server.db_flag(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--threads", type=int, default=32,
                   help="threads per worker (default 32); each open `sk sync watch`"
                        " session holds one, and sessions never take the last 8 (they are"
                        " REST's): size this above the number of watchers plus 8")
    p.add_argument("--access-log", action="store_true",
                   help="log every request to stdout (common log format, then microseconds taken)")
    p.add_argument("--forwarded-for", type=int, default=0, metavar="N",
                   help="N trusted proxies (nginx, a load balancer) stand in front: take the"
                        " client's address from X-Forwarded-For (default 0: the peer's"
                        " address), so the failed-authentication slow-down is per client")
    p.add_argument("--snapshot-every", type=_common.bounded(0, 10 ** 9, "N"), default=None,
                   metavar="N", help="ask for a snapshot every N events of a team's log"
                                     " (default $SK_SNAPSHOT_EVERY, else 10000; 0: never)")
    p.add_argument("--no-control-socket", action="store_true",
                   help="do not open gunicorn's control socket (when several servers run)")
    return p


@_server.server_command
def _body(args, ctx):
    from sk.errors import UsageError
    if not 0 < args.port < 65536:
        raise UsageError("--port must be from 1 to 65535")
    if args.workers < 1 or args.threads < 1:
        raise UsageError("--workers and --threads must be at least 1")
    if not 0 <= args.forwarded_for <= 10:
        raise UsageError("--forwarded-for must be from 0 to 10")
    from ..serve import serve
    return serve(args.host, args.port, _server.server_db(args), args.workers, args.threads,
                 args.access_log, not args.no_control_socket, forwarded_for=args.forwarded_for,
                 snapshot_every=args.snapshot_every)


def main(argv=None, prog="sk server"):
    return _common.run(prog, get_parser, _body, argv)
