"""sk-pull: fetch the team's new events after the stored cursor."""

from ..wire import MAX_PAGE
from . import _common

DESCRIPTION = """\
Fetch the team's events after the stored cursor (a server sequence number,
never a wall-clock time), page by page until the server says no more follow,
store them in the local log, advance the Lamport clock past them and move the
cursor, one transaction per page. Exit 0 only when the end was reached. Run
sk-resolve afterwards (sk sync does) to fold them into the state.

Every pull shows the server the last point of its log this device saw (a
sequence number and the log's hash chain there). If the server's log is no
longer that one (it was restored from an older copy), sk-pull queues every
event this device holds to push again, pulls the whole log, and exits 1 until
'sk-push-batch --all' has given the server back what it lost.

--unshallow, on a device that began at a snapshot (sk sync --shallow): fetch
the history before it, checked against the snapshot's hash chain, without
changing the state; the device then holds its whole history."""


def get_parser(prog="sk-pull"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    _common.server_flags(p)
    p.add_argument("--since", type=_common.bounded(0, 2 ** 63 - 1, "SEQ"), metavar="SEQ",
                   help="start after server sequence SEQ instead of the stored cursor"
                        " (the cursor moves only if SEQ is not past it)")
    p.add_argument("--unshallow", action="store_true",
                   help="fetch the history before the snapshot this device began at")
    p.add_argument("--print", action="store_true", dest="print_events",
                   help="also write every fetched event to stdout as NDJSON")
    p.add_argument("--page-size", type=_common.bounded(1, MAX_PAGE), default=MAX_PAGE,
                   metavar="N", help=f"events per page (1-{MAX_PAGE}, default {MAX_PAGE})")
    return p


def _body(args, ctx):
    import sys

    from ..progress import Progress
    from ..sync import pull

    def on_event(kind, ev):
        if args.print_events:
            _common.emit(ev.to_dict())
        if args.verbose:
            _common.event_line("pulled", ev)

    if args.unshallow:
        if args.since is not None:
            from ..errors import UsageError
            raise UsageError("--unshallow fetches from the log's start; leave out --since")
        from ..snapshot import shallow_seq
        from ..sync import unshallow
        was = shallow_seq(ctx.store)
        bar = Progress("history", was, quiet=args.quiet)
        n = unshallow(ctx.store, ctx.client, ctx.keyring, bar)
        bar.close()
        if args.json:
            _common.emit({"unshallowed": was is not None, "received": n, "before_seq": was})
        else:
            _common.say(args, f"fetched {_common.plural(n, 'event')} of the history before seq {was}; the"
                              " history is complete" if was is not None else
                              "the history is complete already (not a shallow device)")
        return 0
    bar = Progress("pull", None, quiet=args.quiet)
    counts = pull(ctx.store, ctx.client, ctx.keyring, args.since, on_event, bar, args.page_size)
    bar.close()
    if args.json and not args.print_events:
        _common.emit(counts)
    else:
        _common.say(args, f"pulled {_common.plural(counts['received'], 'event')},"
                          f" {counts['new']} new, in {_common.plural(counts['pages'], 'page')};"
                          f" cursor {counts['cursor']}")
    healed = counts.get("healed")
    if healed:  # said even with -q: a script must push to finish healing
        print(f"{args.prog}: {healed.describe()}: run 'sk-push-batch --all' (or 'sk sync')",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None, prog="sk-pull"):
    return _common.run(prog, get_parser, _body, argv)
