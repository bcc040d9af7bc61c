"""sk-state: print the resolved state as JSON."""

from . import _common

DESCRIPTION = """\
Print the resolved state (as of the last sk-resolve) as JSON on stdout: all of
it as {type: {id: {key: value}}}, one aggregate type as {id: {...}}, or one
aggregate (TYPE:ID) as its object. Deleted aggregates are left out unless
--deleted is given; then they appear with "_deleted": true. Exit 1 when the
aggregate asked for does not exist.

--at gives the state as of then, folded from the log: --at N (a Lamport clock)
counts every event stamped at or before N; --at TIME (RFC 3339 with its offset,
e.g. 2026-12-01T09:30:00Z) every event whose display timestamp is at or before
TIME. Display timestamps are the writers' wall clocks, not an order: a device
with a wrong clock places its events wrongly in time, never in the state. On a
shallow device a point before its snapshot exits 1 (that history is not here).
-v says on stderr what the state is as of, and how many events are not folded
into it yet."""


def get_parser(prog="sk-state"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("selector", nargs="?", metavar="TYPE[:ID]", help="what to print (default all)")
    p.add_argument("--deleted", action="store_true", help="include deleted aggregates")
    p.add_argument("--at", metavar="LAMPORT|TIME",
                   help="the state as of a Lamport clock or an RFC 3339 time (display timestamps)")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    return p


def _body(args, ctx):
    import json
    import sys

    from ..errors import SkError, UsageError
    atype = aid = None
    if args.selector:
        atype, sep, rest = args.selector.partition(":")
        aid = rest if sep else None
    if args.at is not None:
        from ..history import parse_when, state_at
        try:
            when = parse_when(args.at)
        except ValueError as e:
            raise UsageError(str(e)) from None
        state = state_at(ctx.store, when, atype, aid, args.deleted)
    else:
        from ..resolve import load_state
        state = load_state(ctx.store, atype, aid, args.deleted)
    if atype is not None:
        state = state.get(atype, {})
        if aid is not None:
            if aid not in state:
                raise SkError(f"no aggregate '{args.selector}' in the state", 1)
            state = state[aid]
    if args.verbose:
        unapplied = ctx.store.counts(totals=False)["unapplied"]
        _common.say(args, f"{args.prog}: " + (f"as of {args.at}" if args.at is not None else
                    "as of the last resolve") + (f"; {_common.plural(unapplied, 'event')} not"
                                                 " folded yet (sk-resolve)" if unapplied and
                                                 args.at is None else ""))
    json.dump(state, sys.stdout, indent=2 if args.pretty else None, sort_keys=True,
              ensure_ascii=False, separators=None if args.pretty else (",", ":"))
    sys.stdout.write("\n")
    return 0


def main(argv=None, prog="sk-state"):
    return _common.run(prog, get_parser, _body, argv)
