"""sk-admin: server upkeep, on the server host."""

import argparse
import sys

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

stats prints how many teams, devices and events the server holds.

init creates the server database (a SQLite file, or the tables on a PostgreSQL
database) and its server secret, as the first `sk server` would; sk-register and
the other sk-admin actions never create one.

status prints, per team, its head (the last sequence number), events stored
and snapshots kept, and per device its team, last seen, lag (the team's head
minus the point its last pull reached), queued (how many events it last said
it had queued to push) and revoked: the same figures `sk server --metrics`
exports. --json: one object {"teams": [...], "devices": [...]}.

verify walks every team's log: sequence numbers dense from 1 to the head, the
hash chain (chain(0) = 32 zero bytes, chain(n) = SHA-256(chain(n-1) +
event_id(n)), PROTOCOL.md section 6) as stored and as the team records it, and
each sealed event's id, node and clock as its batch's manifest has them at its
place (what the sealed content is bound to: the server cannot open it). It
reads a bounded chunk at a time, so it runs beside a live server on logs of any
size. Exit 0 when every log is intact; exit 5 naming the team and its first bad
seq when not (a restore that went wrong, a hand-edited row, a body moved to
another event, a cell that no longer reads as it was written). --json: one
object a team."""


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
    ini = sub.add_parser("init", help="create the server database and its secret")
    sta = sub.add_parser("status", help="per team head, events, snapshots; per device"
                                        " last seen, lag, queued, revoked")
    ver = sub.add_parser("verify", help="check every team's sequence, hash chain and manifests (exit 5"
                                        " naming the first bad seq)")
    for sp in (m, b, st, ini, sta, ver):
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
    if args.action == "init":
        return _init(args)
    store = _server.server_store(args)
    if args.action == "status":
        return _status(args, store.status())
    if args.action == "verify":
        return _verify(args, store)
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


def _init(args):
    import os

    from ..secret import where
    from ..store import is_url, open_store, redact
    db = _server.server_db(args)
    existed = is_url(db) or (os.path.exists(os.path.expanduser(db))
                             and os.path.getsize(os.path.expanduser(db)) > 0)
    store = open_store(db, create=True)
    stats = store.stats()
    store.close()
    if existed and is_url(db):
        _common.say(args, f"server database {redact(db)} is ready ({stats['devices']} devices);"
                          f" server secret: {where(db)}")
    elif existed:
        _common.say(args, f"server database '{db}' exists already ({stats['devices']} devices);"
                          " nothing changed")
    else:
        _common.say(args, f"created server database '{db}' and its secret ({where(db)});"
                          " register devices with sk-register, start it with sk server")
    if args.json:
        _common.emit({"db": redact(db), "created": not existed, **stats})
    return 0


def _status(args, status):
    if args.json:
        _common.emit(status)
        return 0

    def table(cols, rows):
        cells = [cols] + [tuple("-" if r[c] is None else str(r[c]) for c in cols) for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    table(("team", "head", "events", "snapshots"), status["teams"])
    print()
    table(("device", "team", "last_seen", "lag", "queued", "revoked"), status["devices"])
    return 0


def _verify(args, store):
    from sk.errors import IntegrityError
    bad = []
    for team in store.verify():
        if args.json:
            _common.emit(team)
        if team["seq"] is not None:
            bad.append(team)
            print(f"{args.prog}: team '{team['team']}': seq {team['seq']}: {team['reason']}",
                  file=sys.stderr)
        elif args.verbose:
            _common.say(args, f"team '{team['team']}': {team['head']} events, sequence and"
                              " hash chain and manifests intact")
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more team(s))" if len(bad) > 1 else ""
        raise IntegrityError(f"verify: team '{first['team']}' is not intact from seq"
                             f" {first['seq']}{more}")
    _common.say(args, "verify: every team's sequence, hash chain and manifests are intact")
    return 0


def main(argv=None, prog="sk-admin"):
    return _common.run(prog, get_parser, _body, argv)
