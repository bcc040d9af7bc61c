"""sk-register: manage devices, on the server host."""

from sk.cmd import _common

from . import _server

DESCRIPTION = """\
Run on the server host, against the server's database. --name NAME [--team
TEAM] creates a device and prints its new API key, alone on stdout; it is shown
once and not stored (the server keeps only key material derived from it). Give
the key to the device's `sk sync setup`. The database must exist: `sk server
--db PATH` or `sk-admin init --db PATH` creates it (sk-register never does, so a
mistyped --db cannot mint keys no server knows). --list shows every device (name, team,
created, last seen, revoked); --revoke NAME refuses the device's key at once;
--rotate NAME prints a new key and refuses the old one at once."""


def get_parser(prog="sk-register"):
    p = _common.parser(prog, DESCRIPTION)
    _server.db_flag(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--name", metavar="NAME", help="create device NAME and print its key")
    what.add_argument("--list", action="store_true", help="list devices")
    what.add_argument("--revoke", metavar="NAME", help="revoke device NAME")
    what.add_argument("--rotate", metavar="NAME", help="print a new key for NAME; retire the old")
    p.add_argument("--team", default="default", help="team of a new device (default: default)")
    return p


@_server.server_command
def _body(args, ctx):
    from .. import devices
    store = _server.server_store(args)
    if args.name is not None:
        print(devices.register(store, args.name, args.team))
        _common.say(args, f"registered device '{args.name}' in team '{args.team}';"
                          " the key above is shown only once")
    elif args.rotate is not None:
        print(devices.rotate(store, args.rotate))
        _common.say(args, f"rotated the key of '{args.rotate}'; the old key is refused now")
    elif args.revoke is not None:
        devices.revoke(store, args.revoke)
        _common.say(args, f"revoked device '{args.revoke}'")
    else:
        _list(args, store.list_devices())
    return 0


def _list(args, rows):
    from sk.crypto import fingerprint
    rows = [{**{k: v for k, v in r.items() if k not in ("identity", "approval")},
             "fingerprint": fingerprint(r["identity"]) if r["identity"] else None,
             "approved": r["approval"] is not None} for r in rows]
    if args.json:
        for r in rows:
            _common.emit(r)
        return
    cols = ("name", "team", "created", "last_seen", "revoked", "fingerprint")
    table = [cols] + [tuple(r[c] or "-" for c in cols) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def main(argv=None, prog="sk-register"):
    return _common.run(prog, get_parser, _body, argv)
