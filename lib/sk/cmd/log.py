"""sk-log: print the local log as NDJSON."""

from . import _common

DESCRIPTION = """\
Print the local event log as NDJSON on stdout, oldest first: one object per
event with every envelope field (event_id, event_type, aggregate_type,
aggregate_id, lamport_clock, node_id, payload, timestamp), its local status
(queued, sent, rejected, local_only, remote), the reason when rejected, and its
local sequence number seq. Filters combine. --rejected lists the events the
server refused, set aside out of the log with the reason (sk-push-batch
--retry-rejected queues them again). The output is NDJSON (one JSON object a
line, a stable format), with or without --json, like every command that streams
events. On a shallow device (sk sync --shallow) a line on stderr says where its
history begins."""

STATUSES = ("queued", "sent", "rejected", "local_only", "remote")


def get_parser(prog="sk-log"):
    p = _common.parser(prog, DESCRIPTION, json_help="the output is NDJSON either way")
    _common.home_flag(p)
    p.add_argument("--type", metavar="EVENT_TYPE", help="only events of this type")
    p.add_argument("--aggregate", metavar="TYPE[:ID]", help="only events of this aggregate (type)")
    p.add_argument("--status", choices=STATUSES, help="only events with this local status")
    p.add_argument("--rejected", action="store_true",
                   help="only events the server rejected (same as --status rejected)")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="only events after local seq SEQ")
    p.add_argument("--limit", type=int, metavar="N", help="at most N events")
    return p


def _body(args, ctx):
    from ..errors import UsageError
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit must be >= 0")
    atype = aid = None
    if args.aggregate:
        atype, sep, rest = args.aggregate.partition(":")
        aid = rest if sep else None
    status = "rejected" if args.rejected else args.status
    from ..snapshot import shallow_info
    info = shallow_info(ctx.store)
    if info and not args.quiet:
        import sys
        print(f"{args.prog}: shallow history: it begins after seq {info['seq']} of the team's"
              " log (a snapshot" + (f" by device '{info['device']}'" if info.get("device") else "")
              + "); 'sk-pull --unshallow' fetches the rest", file=sys.stderr)
    for ev in ctx.store.log(atype, aid, args.type, status, args.after, args.limit):
        _common.emit(ev)
    return 0


def main(argv=None, prog="sk-log"):
    return _common.run(prog, get_parser, _body, argv)
