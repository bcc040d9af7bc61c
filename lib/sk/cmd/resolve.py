"""sk-resolve: fold unapplied events into the state."""

from . import _common

DESCRIPTION = """\
Fold every event not yet applied into the resolved state: per aggregate, each
payload key is a last-writer-wins register ordered by (lamport_clock, node_id);
an event whose type ends in _deleted deletes the aggregate as of its stamp, and
a later-stamped event brings it back. The result does not depend on the order
or the number of times events arrived. --rebuild recomputes from the whole log.
--map FROM=TO (or SK_PATH_MAP) remaps machine-specific paths in the state,
never in the log; the map is remembered for later runs."""


def get_parser(prog="sk-resolve"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("--rebuild", action="store_true", help="recompute the state from the whole log")
    p.add_argument("--map", action="append", default=[], metavar="FROM=TO",
                   help="replace path prefix FROM with TO in state values; repeatable")
    return p


def _body(args, ctx):
    from ..config import parse_path_map
    from ..progress import Progress
    from ..resolve import resolve
    store = ctx.store
    path_map = parse_path_map(args.map) if args.map else (ctx.cfg.path_map or None)
    bar = Progress("resolve", store.counts(totals=False)["unapplied"], quiet=args.quiet)
    n = resolve(store, path_map, args.rebuild, bar)
    bar.close()
    if args.json:
        _common.emit({"applied": n, "rebuild": args.rebuild})
    elif n or args.verbose:
        _common.say(args, f"applied {n} event{'s' if n != 1 else ''}")
    return 0


def main(argv=None, prog="sk-resolve"):
    return _common.run(prog, get_parser, _body, argv)
