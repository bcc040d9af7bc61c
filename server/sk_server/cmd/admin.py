"""sk-admin: server upkeep, on the server host."""

import argparse

from sk.cmd import _common

from . import _server

DESCRIPTION = """\
Run on the server host.

migrate --from PATH.db --to postgresql://USER@HOST:PORT/DB copies a SQLite
server's teams, devices, key material and events into PostgreSQL, keeping every
team's sequence numbers and hash chain, so devices' cursors stay valid and their
API keys keep working. The key material is unwrapped with the SQLite server's
secret (the file beside it, or --from-secret) and wrapped again with the target's
(SK_SERVER_SECRET or SK_SERVER_SECRET_FILE, created if the target is new). It is
idempotent and resumable: run it again after an interruption, or after stopping
the old server, and it copies only what is missing. It refuses a target holding
teams or devices the source does not have unless given --force, and always
refuses a team whose log there is not the start of the source's.

backup --to FILE writes a consistent copy of the live SQLite server database
(SQLite online backup; safe while the server runs). Keep the server secret too.
For PostgreSQL use pg_dump.

stats prints how many teams, devices and events the server holds."""


def get_parser(prog="sk-admin"):
    p = _common.parser(prog, DESCRIPTION)
    _server.db_flag(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = sub.add_parser("migrate", help="copy a SQLite server into PostgreSQL")
    m.add_argument("--from", dest="source", required=True, metavar="PATH.db",
                   help="the SQLite server database to copy")
    m.add_argument("--to", dest="target", required=True, metavar="URL",
                   help="the target database: postgresql://USER@HOST:PORT/DB (or a SQLite path)")
    m.add_argument("--from-secret", metavar="FILE",
                   help="the source's server secret file (default: beside PATH.db)")
    m.add_argument("--force", action="store_true",
                   help="add to a target that already holds other teams or devices")
    b = sub.add_parser("backup", help="consistent copy of the live SQLite database")
    b.add_argument("--to", required=True, metavar="FILE", help="where to write the copy (mode 600)")
    st = sub.add_parser("stats", help="counts of teams, devices and events")
    for sp in (m, b, st):
        _common.common(sp, suppress=True)
        sp.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _migrate(args):
    import os

    from sk.errors import UsageError
    from sk.progress import Progress

    from .. import migrate
    from ..secret import SecretError, beside, read_secret, where
    from ..store import open_store, redact, sqlite_store
    src_path = os.path.expanduser(args.source)
    if "://" in src_path or not os.path.isfile(src_path):
        raise UsageError(f"--from must be an existing SQLite server database: '{args.source}'")
    try:
        source = sqlite_store(src_path, secret=read_secret(args.from_secret or beside(src_path)))
        target = open_store(args.target)
        if target.same_database(source):
            raise UsageError("--from and --to are the same database")
        meta, work = migrate.plan(source, target, args.force)
        bar = Progress("migrate", migrate.total(work), quiet=args.quiet)
        done = migrate.migrate(source, target, meta, work, bar)
        bar.close()
    except (SecretError, migrate.MigrateError) as e:
        raise UsageError(str(e)) from None
    _common.say(args, f"copied {done['events']} events ({done['already']} were there already),"
                      f" {done['devices']} devices, {done['keys']} keys of {done['teams']}"
                      f" team(s) into {redact(args.target)}; start every server with"
                      f" --db on it and the same server secret ({where(args.target)})")
    if args.json:
        _common.emit(done)
    return 0


@_server.server_command
def _body(args, ctx):
    if args.action == "migrate":
        return _migrate(args)
    store = _server.server_store(args)
    if args.action == "backup":
        store.backup(args.to)
        stats = store.stats()
        _common.say(args, f"backed up {stats['events']} events of {stats['teams']} team(s)"
                          f" to '{args.to}'; keep the server secret too (see sk server):"
                          " the devices' keys in the copy need it")
        if args.json:
            _common.emit({"backup": args.to, **stats})
        return 0
    stats = store.stats()
    if args.json:
        _common.emit(stats)
    else:
        for k, v in stats.items():
            print(f"{k}: {v}")
    return 0


def main(argv=None, prog="sk-admin"):
    return _common.run(prog, get_parser, _body, argv)
