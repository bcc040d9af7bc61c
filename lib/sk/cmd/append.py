"""sk-append: append events to the local log, unstamped, all or nothing."""

import sys

from . import _common

DESCRIPTION = """\
Append events to the device's local log, unstamped. With no event flags, read
NDJSON from standard input: one JSON object per line with event_type,
aggregate_type, aggregate_id and optionally payload (an object), event_id (a
UUID) and timestamp (RFC 3339 in UTC, ending in Z or +00:00, e.g.
2026-01-31T12:00:00Z; other offsets are refused; without one, the time of
stamping). With --type and --aggregate, append one event
built from the flags. Either every event is appended or none is: a bad line
anywhere is reported with its line number and nothing is appended (exit 2).
Run sk-stamp afterwards (sk sync does) to give the events their stamps.
An event_id the log holds already (--event-id, or in the NDJSON) is not appended
again: with the same type, aggregate and payload it is a duplicate (said, exit
0); with other content it is an error (exit 1): the event is set aside with the
reason (sk-log --rejected) and named in one line.
--actor (or SK_ACTOR) records who made them: a person, or an agent and the
model that drove it ("ci-bot (claude-x)"); it is sealed with the payload, and
sk blame and sk conflicts show it."""


def get_parser(prog="sk-append"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("--type", metavar="EVENT_TYPE", help="event type, e.g. feature_created")
    p.add_argument("--aggregate", metavar="TYPE:ID", help="the aggregate, e.g. feature:F-12")
    p.add_argument("--payload", metavar="JSON", help="payload object as JSON text")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="a payload field (VALUE is JSON if it parses, else a string); repeatable")
    p.add_argument("--event-id", metavar="UUID", help="use this event id instead of a new one")
    p.add_argument("--actor", metavar="NAME",
                   help="who made these events (default $SK_ACTOR), e.g. 'alice' or 'agent (model)'")
    return p


def _from_flags(args):

    from ..errors import UsageError
    from ..event import EventError, check_new, loads
    if not args.type or not args.aggregate:
        raise UsageError("--type and --aggregate TYPE:ID go together")
    atype, sep, aid = args.aggregate.partition(":")
    if not sep:
        raise UsageError(f"--aggregate {args.aggregate!r} must look like TYPE:ID")
    try:
        payload = loads(args.payload) if args.payload else {}
    except (ValueError, RecursionError) as e:
        raise UsageError(f"--payload is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise UsageError("--payload must be a JSON object")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r} must look like KEY=VALUE")
        try:
            payload[key] = loads(value)
        except (ValueError, RecursionError):
            payload[key] = value
    try:
        return [check_new({"event_type": args.type, "aggregate_type": atype, "aggregate_id": aid,
                           "payload": payload, "event_id": args.event_id})]
    except EventError as e:
        raise UsageError(str(e)) from None


def _body(args, ctx):
    from ..errors import UsageError
    from ..event import EventError, parse_ndjson
    if args.type or args.aggregate or args.payload or args.set or args.event_id:
        events = _from_flags(args)
    else:
        if sys.stdin.isatty():
            print(f"{args.prog}: reading NDJSON events from the terminal; end with Ctrl-D",
                  file=sys.stderr)
        events = parse_ndjson(sys.stdin.buffer)
    from ..config import check_actor
    actor = check_actor(args.actor, "--actor") if args.actor is not None else ctx.cfg.actor
    known = []
    try:
        n = ctx.store.append(events, actor=actor, known=known)
    except EventError as e:
        raise UsageError(f"{e}; nothing appended") from None
    dups = [eid for eid, what, _ in known if what == "duplicate"]
    bad = [(eid, why) for eid, what, why in known if what == "rejected"]
    for eid in dups:
        _common.say(args, f"{args.prog}: event {eid} is in the log already (a duplicate);"
                          " not appended again")
    for eid, why in bad:
        _common.error(f"{args.prog}: {why}; set aside (see 'sk-log --rejected')")
    if args.json:
        _common.emit({"appended": n, "duplicates": dups,
                      "rejected": [{"event_id": e, "reason": r} for e, r in bad]})
    elif n or not known:
        _common.say(args, f"appended {_common.plural(n, 'event')} (unstamped)")
    return 1 if bad else 0


def main(argv=None, prog="sk-append"):
    return _common.run(prog, get_parser, _body, argv)
