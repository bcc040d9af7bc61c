"""sk-admin: server upkeep, on the server host."""

import argparse

from . import _common

DESCRIPTION = """\
Run on the server host. `backup --to FILE` writes a consistent copy of the live
server database (SQLite online backup; safe while the server runs). `stats`
prints how many teams, devices and events the server holds."""


def get_parser(prog="sk-admin"):
    p = _common.parser(prog, DESCRIPTION)
    _common.db_flag(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("backup", help="consistent copy of the live database")
    b.add_argument("--to", required=True, metavar="FILE", help="where to write the copy (mode 600)")
    st = sub.add_parser("stats", help="counts of teams, devices and events")
    for sp in (b, st):
        _common.common(sp, suppress=True)
        sp.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _body(args):
    from ..errors import UsageError
    store = _common.server_store(args)
    if args.action == "backup":
        from sk_server.store import StoreError
        try:
            store.backup(args.to)
        except StoreError as e:
            raise UsageError(str(e)) from None
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
