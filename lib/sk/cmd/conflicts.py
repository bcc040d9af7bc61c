"""sk conflicts: the concurrent edits last-writer-wins decided, and what they overwrote."""

from . import _common

DESCRIPTION = """\
List the open conflicts: for each aggregate and key where a write was lost to a
concurrent one (made by a writer whose state did not hold it), the value that
won and every value it overwrote unseen, each with its event id, device, node,
Lamport clock, timestamp and actor. A write made by someone who had seen the
value it replaces is an edit, never a conflict; a later write of the key by a
device that had seen the conflict closes it (--all lists closed ones too). The
list is a function of the events alone: every device holding the same events
shows the same conflicts, whatever order they arrived in. Events from before sk
0.4.0 do not say what their writer had seen and never count as conflicts. On a
shallow device only the history it holds is looked at (a line on stderr says
so). --json prints one JSON object per conflict (NDJSON). Exit 0 either way."""


def get_parser(prog="sk conflicts"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("selector", nargs="?", metavar="TYPE[:ID]",
                   help="only this aggregate type, or this aggregate (default all)")
    p.add_argument("--all", action="store_true", help="closed conflicts too")
    return p


def describe(w):
    """'"value" by device (actor), Lamport 12 node 1a2b…, 2026-… event …' of one write."""
    from ..history import value_text, writer_label
    return (f"{value_text(w['value'], 60)} by {writer_label(w)}, Lamport {w['lamport_clock']}, {w['timestamp']},"
            f" event {w['event_id']}")


def _body(args, ctx):
    import sys

    from ..history import conflicts
    from ..snapshot import shallow_info
    atype = aid = None
    if args.selector:
        atype, sep, rest = args.selector.partition(":")
        aid = rest if sep else None
    info = shallow_info(ctx.store)
    if info and not args.quiet:
        print(f"{args.prog}: shallow history: only what came after seq {info['seq']} is looked"
              " at; 'sk-pull --unshallow' fetches the rest", file=sys.stderr)
    found = conflicts(ctx.store, atype, aid, include_closed=args.all)
    if args.json:
        for c in found:
            _common.emit({**c, "open": bool(c["lost"])})
        return 0
    if not found:
        _common.say(args, "no open conflicts" if not args.all else "no conflicts")
        return 0
    for c in found:
        state = "open" if c["lost"] else "closed"
        print(f"{c['aggregate_type']}:{c['aggregate_id']} {c['field']} ({state})")
        print(f"  kept   {describe(c['winner'])}")
        for w in c["lost"]:
            print(f"  lost   {describe(w)}")
        for w in c["closed"] if args.all else ():
            print(f"  closed {describe(w)}")
    n = sum(len(c["lost"]) for c in found)
    _common.say(args, f"{n} open conflict{'s' if n != 1 else ''}")
    return 0


def main(argv=None, prog="sk conflicts"):
    return _common.run(prog, get_parser, _body, argv)
