"""sk sync: the porcelain (now, status, setup)."""

import argparse

from . import _common

DESCRIPTION = """\
sk sync (or sk sync now): stamp -> push every batch -> pull every page ->
resolve, then say what moved. Idempotent: a second run moves nothing.
-v prints each event as it moves; -n shows what would move and changes
nothing. A progress bar appears on a terminal when the work is long. A fresh
device begins at the team's newest snapshot (sealed by a member; refused, exit
5, unless it authenticates at a point of the log): with --shallow (or
SK_SHALLOW=1, for CI jobs) it fetches only the events after it; otherwise the
history before it follows, checked, not folded again. Edits that last-writer-
wins overwrote unseen are counted on stderr ("2 concurrent edits: sk
conflicts").

sk sync status: the server, config file, node id, queued / rejected /
local-only / unstamped counts, the age of the oldest queued event, the last
successful sync and the failures since. --check also asks the server:
Connected, Reachable (auth required), Unreachable or Error (exit 0, 4, 3, and
2 or 5 for Error: not configured, or a protocol failure).

sk sync watch: real time. Opens a WebSocket session (with a single-use token
from the server), pushes local events as soon as they are stamped (by sk-stamp
or any program), applies the team's events as they arrive, pings every 20 s,
and reconnects with backoff when the connection drops; offline, events stay
queued and drain on reconnect. One line on stderr per change of state, with its
time (UTC, RFC 3339); --json also writes one JSON object per change of state on
stdout ({"time", "state", "detail"}). Stops cleanly on SIGINT, SIGTERM or
SIGHUP. Exit 4 if the server refuses the key.

sk sync setup: ask for (or take --server and --key) the server URL and API
key, verify them against the server, refuse a key it rejects, and write them
to $SK_HOME/.env with mode 600. --key alone keeps the server URL set already.
Replacing a key set already asks first on a terminal; without one it needs
--yes (-y).

{never_sync}"""


from ..commands import NEVER_SYNC_SYNTAX  # noqa: E402

DESCRIPTION = DESCRIPTION.replace("{never_sync}", "never-sync rules (SK_NEVER_SYNC):\n" + NEVER_SYNC_SYNTAX)


def _now_flags(p, suppress=False):
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("-n", "--dry-run", action="store_true", default=d(False),
                   help="show what would move; change nothing")
    p.add_argument("--shallow", action="store_true", default=d(False),
                   help="a fresh device: begin at the team's newest snapshot and fetch only"
                        " the events after it (default: SK_SHALLOW)")


def get_parser(prog="sk sync"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    _common.server_flags(p)
    _now_flags(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    now = sub.add_parser("now", help="stamp, push, pull and resolve (the default)")
    _common.common(now, suppress=True)
    _now_flags(now, suppress=True)
    st = sub.add_parser("status", help="what is queued, last success, failures since")
    _common.common(st, suppress=True)
    st.add_argument("--check", action="store_true", help="also check the connection and key")
    st.epilog = ("exit status: 1 when the last run failed (failures since > 0), else 0;"
                 " with --check, the connection's code first (3, 4, 2 or 5)")
    su = sub.add_parser("setup", help="set the server URL and API key, verified")
    _common.common(su, suppress=True)
    su.add_argument("-y", "--yes", action="store_true",
                    help="replace an API key set already without asking")
    wa = sub.add_parser("watch", help="real-time sync over a WebSocket until stopped")
    _common.common(wa, suppress=True)
    for sp in (now, st, su, wa):
        sp.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR",
                        help="device directory (default: $SK_HOME, else ~/.spec-kitty)")
        sp.add_argument("--server", default=argparse.SUPPRESS, metavar="URL",
                        help="server URL (default: SK_SERVER)")
        sp.add_argument("--key", default=argparse.SUPPRESS, metavar="KEY",
                        help="API key (default: SK_API_KEY)")
    return p


def _body(args, ctx):
    action = args.action or "now"
    return {"now": _now, "status": _status, "setup": _setup, "watch": _watch}[action](args, ctx)


def _watch(args, ctx):
    import sys

    from ..watch import Watch

    def log(line):   # each line with its time (UTC, RFC 3339): a watcher runs for days
        if not args.quiet:
            print(f"{_common.utc_time()} {args.prog} watch: {line}", file=sys.stderr, flush=True)

    def on_state(state, detail):
        _common.emit({"time": _common.utc_time(), "state": state, "detail": detail or None})
        sys.stdout.flush()

    return Watch(ctx.cfg, log, store=ctx.store, on_state=on_state if args.json else None).run()


def _now(args, ctx):
    import sys

    from ..progress import Progress
    from ..sync import run

    summary = run(ctx.cfg, ctx.store, ctx.client, args.dry_run,
                  _common.event_line if args.verbose else None,
                  lambda label, total: Progress(label, total, quiet=args.quiet),
                  shallow=args.shallow or ctx.cfg.shallow)
    if args.json:
        _common.emit(summary)
    elif args.dry_run:
        if not args.quiet:
            most = summary["would_pull_at_most"]
            print(f"would stamp {summary['would_stamp']}, push {summary['would_push']}"
                  + (f" (keep {summary['would_keep_local']} local)"
                     if summary["would_keep_local"] else "")
                  + f", pull at most {most if most is not None else '?'}, resolve"
                  f" {summary['would_resolve']}; nothing changed")
        if summary.get("unreachable"):
            print(f"{args.prog}: {summary['unreachable']} (what it would pull is not counted)",
                  file=sys.stderr)
    elif not args.quiet:
        s, pu, pl = summary["stamp"], summary["push"], summary["pull"]
        line = (f"stamped {s['stamped']}, pushed {pu['accepted']}"
                + (f" ({pu['duplicate']} already there)" if pu["duplicate"] else "")
                + (f", rejected {pu['rejected']}" if pu["rejected"] else "")
                + f", pulled {pl['new']}, resolved {summary['resolved']}")
        print(line)
    began = summary.get("began_at")
    if began and not args.quiet and not args.json:
        print(f"{args.prog}: began at the snapshot of seq {began['seq']}"
              f" ({began['aggregates']} aggregates"
              + (f", by device '{began['device']}'" if began.get("device") else "") + ")"
              + ("; history before it not fetched ('sk-pull --unshallow' fetches it)"
                 if "unshallow" not in summary else
                 f"; fetched the {summary['unshallow']} events before it"), file=sys.stderr)
    if summary.get("conflicts") and not args.quiet and not args.json:
        n = summary["conflicts"]
        print(f"{n} concurrent edit{'s' if n != 1 else ''}: sk conflicts", file=sys.stderr)
    if summary.get("snapshot_error") and args.verbose:
        print(f"{args.prog}: snapshot not given: {summary['snapshot_error']}", file=sys.stderr)
    healed = summary.get("healed")
    if healed and not args.quiet:
        print(f"{args.prog}: {healed.describe()}", file=sys.stderr)
    for prob in (summary.get("stamp") or summary).get("problems", []):
        _common.error(f"{args.prog}: unstamped row {prob['unstamped_seq']}: {prob['reason']}")
    if args.dry_run:
        return 0
    partial = (summary["push"]["rejected"] or summary["push"]["queued"]
               or summary["stamp"]["problems"])
    for why in summary["push"].get("held_reasons", []):
        print(f"{args.prog}: {why}", file=sys.stderr)
    if summary["push"]["rejected"] and not args.quiet:
        print(f"{args.prog}: {_common.plural(summary['push']['rejected'], 'event')} rejected;"
              " see 'sk-log --rejected'", file=sys.stderr)
    return 1 if partial else 0


def _ago(stamp):
    from datetime import datetime, timezone
    if not stamp:
        return "never"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    secs = int((datetime.now(timezone.utc) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{stamp} ({secs // size} {unit} ago)"
    return f"{stamp} ({max(secs, 0)} s ago)"


def _status(args, ctx):
    from ..sync import status
    info = status(ctx.cfg, args.check)
    if args.json:
        _common.emit(info)
    elif not args.quiet:
        _status_rows(args, info)
    failed = info["failures_since"] > 0
    if args.check and info["connection_exit"]:
        return info["connection_exit"]
    return 1 if failed else 0


def _status_rows(args, info):
    rows = [
        ("server", f"{info['server'] or '(not configured)'}"
                   + (f"  (from {info['server_from']})" if info["server_from"] else "")),
        ("config", info["config"] + ("" if info["config_exists"] else " (missing)")),
        ("node id", info["node_id"] or "(none yet)"),
        ("queued", str(info["queued"]) + (f" (oldest {_ago(info['oldest_queued'])})"
                                          if info["queued"] else "")),
        ("rejected", str(info["rejected"]) + (" (see sk-log --rejected)" if info["rejected"] else "")),
        ("local-only", str(info["local_only"])
         + (" (kept on this device by the never-sync rules)" if info["local_only"] else "")),
        ("unstamped", str(info["unstamped"])),
        ("unapplied", str(info["unapplied"])),
        ("unconfirmed", str(info["unconfirmed"])
         + (" (the server answered 'duplicate' for them; the next pull checks its log"
            " holds them)" if info["unconfirmed"] else "")),
        ("last sync", _ago(info["last_success"])),
        ("failures since", str(info["failures_since"])
         + (f" (last {_ago(info['last_failure'])}: {info['last_error']})"
            if info["failures_since"] else "")),
    ]
    shallow = info["shallow"]
    rows.append(("history", "complete" if not shallow else
                 f"shallow: begins after seq {shallow['seq']} (a snapshot"
                 + (f" by device '{shallow['device']}'" if shallow.get("device") else "")
                 + "); 'sk-pull --unshallow' fetches the rest"))
    rows.append(("conflicts", f"{info['open_conflicts']} open"
                 + (" (sk conflicts)" if info["open_conflicts"] else "")))
    watch = info["watch"]
    rows.append(("watch", "not running" if not watch else
                 f"running (pid {watch['pid']}), {watch['state']} since {watch['since']}"
                 + (f": {watch['detail']}" if watch.get("detail") else "")))
    if args.check:
        rows.append(("connection", f"{info['connection']}: {info['connection_detail']}"))
    if args.verbose:
        rows += [("home", info["home"]), ("database", info["database"]
                                          + ("" if info["log_exists"] else " (none yet)")),
                 ("cursor", str(info["cursor"])), ("clock", str(info["clock"])),
                 ("never-sync", info["never_sync"])]
    for k, v in rows:
        print(f"{k + ':':<16}{v}")


def _setup(args, ctx):
    import getpass
    import sys

    from ..errors import UsageError
    cfg = ctx.cfg
    server, key = getattr(args, "server", None), getattr(args, "key", None)
    if key and not server:   # a new key for the server already set up: keep its URL
        server = cfg.get("SK_SERVER")
    if not server or not key:
        if not sys.stdin.isatty():
            raise UsageError("give --server URL and --key KEY (no terminal to ask on)")
        try:
            if not server:
                default = cfg.get("SK_SERVER") or "http://127.0.0.1:9100"
                server = input(f"server URL [{default}]: ").strip() or default
            if not key:
                key = getpass.getpass("API key (from sk-register on the server host): ").strip()
        except EOFError:
            raise UsageError("setup cancelled") from None
    old = cfg.in_file("SK_API_KEY")      # the key this command would overwrite
    if old and old.strip() != key.strip() and not args.yes:
        where = cfg.env_path
        if not sys.stdin.isatty():
            raise UsageError(f"an API key is set already (from {where}); give --yes to"
                             " replace it (no terminal to ask on)")
        try:
            answer = input(f"replace the API key set in {where}? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            raise UsageError("setup cancelled; the API key is unchanged")
    from ..sync import setup
    result = setup(cfg, server, key)
    if args.json:
        _common.emit(result)
    else:
        _common.say(args, f"connected to {result['server']} as device '{result['device']}'"
                          f" (team '{result['team']}'); wrote {result['config']}")
    return 0


def main(argv=None, prog="sk sync"):
    return _common.run(prog, get_parser, _body, argv)
