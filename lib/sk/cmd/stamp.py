"""sk-stamp: stamp every unstamped event in the local log."""

from . import _common

DESCRIPTION = """\
Give every unstamped event in the local log its event_id (if absent), this
device's node_id, the next Lamport clock value and a timestamp (if absent), and
move it into the log, queued for sk-push-batch (or kept local-only when it
matches a never-sync rule). One transaction; idempotent: with nothing unstamped
it changes nothing.

THE UNSTAMPED TABLE is a documented interface. Any program may insert rows into
the table `unstamped` of $SK_HOME/sk.db (SQLite, WAL mode; use a busy timeout)
and run sk-stamp:

  INSERT INTO unstamped(event_type, aggregate_type, aggregate_id, payload)
  VALUES ('feature_created', 'feature', 'F-1', '{"title": "Login"}');

Columns: event_type, aggregate_type, aggregate_id (TEXT, required); payload (TEXT,
a JSON object, default '{}'); event_id (TEXT UUID, optional); timestamp (TEXT
RFC 3339, optional); seq (INTEGER, assigned). A row that breaks a rule is left in
place and reported with its seq (exit 1); a row whose event_id is already in the
log with the same content is the same event and is dropped (and said); one whose
event_id the log holds with other content is set aside (sk-log --rejected) with
the reason, and reported (exit 1). -v prints one line per event stamped."""


def get_parser(prog="sk-stamp"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    p.add_argument("--new-node", action="store_true",
                   help="give this home a node id of its own (when the server says another"
                        " device or home uses it: a copied home); its unsent events are"
                        " stamped again under it")
    return p


def _body(args, ctx):
    from ..sync import stamp
    if args.new_node:
        old, new, n = ctx.store.new_node()
        _common.say(args, f"node id {old} -> {new}; stamped {n} unsent event"
                          f"{'s' if n != 1 else ''} again")
    result = stamp(ctx.store, ctx.cfg, _common.event_line if args.verbose else None)
    for prob in result["problems"]:
        _common.error(f"{args.prog}: unstamped row {prob['unstamped_seq']}: {prob['reason']}")
    if args.json:
        _common.emit(result)
    elif result["stamped"] or result["duplicates"] or args.verbose:
        _common.say(args, f"stamped {_common.plural(result['stamped'], 'event')}"
                          + (f" ({result['local_only']} local-only)" if result["local_only"] else "")
                          + (f", dropped {_common.plural(result['duplicates'], 'duplicate')}"
                             " (the same event id and content as one in the log)"
                             if result["duplicates"] else ""))
    return 1 if result["problems"] else 0


def main(argv=None, prog="sk-stamp"):
    return _common.run(prog, get_parser, _body, argv)
