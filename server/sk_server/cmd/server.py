"""sk server: run the server under gunicorn (gthread)."""

import os

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
3 per team, and gives the newest to a fresh device (sk sync --shallow).

Operations: GET /healthz answers 200 while the process serves; GET /readyz 200
while the database answers, else 503 (for a load balancer or a systemd check).
--metrics HOST:PORT serves Prometheus metrics (sk_events_pushed_total,
sk_request_duration_seconds, sk_device_lag_events, ...; see the README) on a
listener of its own, added up over every worker and read from the database at
scrape time, so every server on one PostgreSQL shows the same team and device
figures. Nothing of the events' content is ever in a metric or a log line."""


def get_parser(prog="sk server"):
    p = _common.parser(prog, DESCRIPTION, json_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9100,
                   help="port (default 9100; 0: a free port, which is printed)")
    _server.db_flag(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--threads", type=int, default=32,
                   help="threads per worker (default 32); each open `sk sync watch`"
                        " session holds one, and sessions never take the last 8 (they are"
                        " REST's): size this above the number of watchers plus 8")
    p.add_argument("--access-log", action="store_true",
                   help="log every request to stdout (common log format, then microseconds taken)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON line per request on stdout (time, request_id, method,"
                        " endpoint, path, status, duration_ms, team, device, remote; never a"
                        " body, key or token), instead of --access-log's text")
    p.add_argument("--metrics", metavar="HOST:PORT", type=_address,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, a listener of"
                        " its own (never the API's port); off by default")
    p.add_argument("--forwarded-for", type=int, default=0, metavar="N",
                   help="N trusted proxies (nginx, a load balancer) stand in front: take the"
                        " client's address from X-Forwarded-For (default 0: the peer's"
                        " address), so the failed-authentication slow-down is per client")
    p.add_argument("--snapshot-every", type=_common.bounded(0, 10 ** 9, "N"), default=None,
                   metavar="N", help="ask for a snapshot every N events of a team's log"
                                     " (default $SK_SNAPSHOT_EVERY, else 10000; 0: never)")
    p.add_argument("--no-control-socket", action="store_true",
                   help="do not open gunicorn's control socket (by default it is beside a"
                        " SQLite database: server.db -> server.ctl; never for PostgreSQL)")
    return p


def _address(text):
    """HOST:PORT (or [IPv6]:PORT, or :PORT for 127.0.0.1), PORT from 0 to 65535."""
    import argparse
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


@_server.server_command
def _body(args, ctx):
    from sk.errors import UsageError
    if not 0 <= args.port < 65536:
        raise UsageError("--port must be from 0 to 65535")
    if args.workers < 1 or args.threads < 1:
        raise UsageError("--workers and --threads must be at least 1")
    if not 0 <= args.forwarded_for <= 10:
        raise UsageError("--forwarded-for must be from 0 to 10")
    if args.metrics and args.metrics[1] == args.port and args.port:
        raise UsageError("--metrics needs a port of its own, not the API's")
    if args.metrics:
        _server.require_metrics()
    from ..store import check_path, is_url
    db = _server.server_db(args)
    if not is_url(db):
        check_path(os.path.expanduser(db))   # what is wrong with it, before anything starts
    from ..serve import serve
    return serve(args.host, args.port, db, args.workers, args.threads,
                 args.access_log, not args.no_control_socket, forwarded_for=args.forwarded_for,
                 snapshot_every=args.snapshot_every, metrics=args.metrics,
                 log_format=args.log_format, say=lambda text: _common.say(args, f"{args.prog}: {text}"))


def main(argv=None, prog="sk server"):
    return _common.run(prog, get_parser, _body, argv)
