"""sk blame: each key of an aggregate, its value and the event behind it."""

from . import _common

DESCRIPTION = """\
For each key of the aggregate TYPE:ID, like git blame: its value and the event
behind it (event id, event type, device, node, Lamport clock, timestamp, actor).
Found by index from the aggregate's own events, however long the log. On a
shallow device a key whose event came before its snapshot is shown as the
snapshot recorded it, marked "(from the snapshot)". A deleted aggregate shows
its deletion and its last values (as sk-state --deleted does; in --json under
"_deleted"). --json prints one object {key: {...}}. Exit 1 when this device
holds nothing of the aggregate."""


def get_parser(prog="sk blame"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("aggregate", metavar="TYPE:ID", help="the aggregate, e.g. feature:F-12")
    return p


def _body(args, ctx):
    import json
    import sys

    from ..errors import SkError, UsageError
    from ..history import blame
    atype, sep, aid = args.aggregate.partition(":")
    if not sep or not atype or not aid:
        raise UsageError(f"{args.aggregate!r} must look like TYPE:ID")
    found = blame(ctx.store, atype, aid)
    if not found:
        raise SkError(f"no writes of '{args.aggregate}' on this device", 1)
    if args.json:
        json.dump(found, sys.stdout, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        sys.stdout.write("\n")
        return 0
    gone = found.pop("_deleted", None)
    width = max([len(k) for k in found] + [1])
    if gone is not None:
        who = gone.get("device") or f"node {gone['node_id'][:8]}"
        print(f"(deleted at L{gone['lamport_clock']} {gone.get('timestamp') or ''} {who},"
              f" {gone.get('event_type') or 'in the snapshot'} {gone.get('event_id') or ''});"
              " its last values:".replace("  ", " "))
    from ..history import value_text, writer_label
    for key, w in found.items():
        who, value = writer_label(w), value_text(w["value"], 50)
        where = " (from the snapshot)" if w.get("from_snapshot") else ""
        print(f"{key:<{width}} = {value}  (L{w['lamport_clock']} {w['timestamp']} {who},"
              f" {w['event_type']} {w['event_id']}){where}")
    return 0


def main(argv=None, prog="sk blame"):
    return _common.run(prog, get_parser, _body, argv)
