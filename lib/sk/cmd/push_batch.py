"""sk-push-batch: push stamped, unsent events to the server."""

from ..wire import MAX_BATCH
from . import _common

DESCRIPTION = """\
Push one batch (at most 1000 events, --max N) of stamped, queued events to the
server and apply its per-event answers atomically: accepted and duplicate
events are marked sent; a rejected event is set aside with the server's reason
(see sk-log --rejected, sk sync status) and never blocks the rest. A batch the
server refuses as too large (HTTP 413) is split; an event too large on its own
is set aside. With --all, repeat until nothing is queued or no progress is made.
If the server's log is not the one this device saw (restored from an older
copy), every event this device holds is queued to push again, so the server
gets back what it lost. Exit 1 when anything was rejected, or, with --all, anything is left queued."""


def get_parser(prog="sk-push-batch"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    _common.server_flags(p)
    p.add_argument("--max", type=_common.bounded(1, MAX_BATCH), default=MAX_BATCH, metavar="N",
                   help=f"events in one batch (1-{MAX_BATCH}, default {MAX_BATCH})")
    p.add_argument("--all", action="store_true", help="push batches until the queue is empty")
    p.add_argument("--retry-rejected", action="store_true",
                   help="queue rejected events again before pushing")
    return p


def _body(args, ctx):
    from ..progress import Progress
    from ..sync import push
    store = ctx.store

    if args.retry_rejected:
        n = store.requeue_rejected()
        _common.say(args, f"queued {_common.plural(n, 'rejected event')} again")
    bar = Progress("push", store.counts(totals=False)["queued"] if args.all else None,
                   quiet=args.quiet)
    counts = push(store, ctx.client, ctx.keyring, args.max, args.all,
                  _common.event_line if args.verbose else None, bar)
    bar.close()
    healed = counts.get("healed")
    if healed:
        _common.say(args, healed.describe())
    for why in counts.get("held_reasons", []):
        _common.error(f"{args.prog}: {why}")
    if args.json:
        _common.emit(counts)
    else:
        _common.say(args, f"pushed {counts['accepted']} accepted, {counts['duplicate']} duplicate,"
                          f" {counts['rejected']} rejected; {counts['queued']} still queued")
    return 1 if counts["rejected"] or (args.all and counts["queued"]) else 0


def main(argv=None, prog="sk-push-batch"):
    return _common.run(prog, get_parser, _body, argv)
