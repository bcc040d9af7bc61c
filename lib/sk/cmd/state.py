"""sk-state: print the resolved state as JSON."""

from . import _common

DESCRIPTION = """\
Print the resolved state (as of the last sk-resolve) as JSON on stdout: all of
it as {type: {id: {key: value}}}, one aggregate type as {id: {...}}, or one
aggregate (TYPE:ID) as its object. Deleted aggregates are left out unless
--deleted is given; then they appear with "_deleted": true. Exit 1 when the
aggregate asked for does not exist."""


def get_parser(prog="sk-state"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("selector", nargs="?", metavar="TYPE[:ID]", help="what to print (default all)")
    p.add_argument("--deleted", action="store_true", help="include deleted aggregates")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    return p


def _body(args, ctx):
    import json
    import sys

    from ..errors import SkError
    from ..resolve import load_state
    atype = aid = None
    if args.selector:
        atype, sep, rest = args.selector.partition(":")
        aid = rest if sep else None
    state = load_state(ctx.store, atype, aid, args.deleted)
    if atype is not None:
        state = state.get(atype, {})
        if aid is not None:
            if aid not in state:
                raise SkError(f"no aggregate '{args.selector}' in the state", 1)
            state = state[aid]
    json.dump(state, sys.stdout, indent=2 if args.pretty else None, sort_keys=True,
              ensure_ascii=False, separators=None if args.pretty else (",", ":"))
    sys.stdout.write("\n")
    return 0


def main(argv=None, prog="sk-state"):
    return _common.run(prog, get_parser, _body, argv)
