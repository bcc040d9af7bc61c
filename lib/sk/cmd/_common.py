"""What every command shares: the common flags and the error boundary."""

import argparse
import contextlib
import json
import os
import signal
import sys

from ..commands import ENVIRONMENT, EXIT_STATUS


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (exit 2), like every error; no
    silent abbreviations (`--statu` is refused, not taken for `--status`). A
    sub-parser (`sk sync status`) refuses what it does not know itself, so the
    usage error names it."""

    def __init__(self, *a, allow_abbrev=False, **kw):
        super().__init__(*a, allow_abbrev=allow_abbrev, **kw)
        self._sub = False

    def error(self, message):
        self.exit(2, stamp_error(f"{self.prog}: {message} (see '{self.prog} --help')") + "\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if self._sub and extra:
            self.error("unrecognized arguments: " + " ".join(extra))
        return ns, extra

    def add_subparsers(self, **kw):
        action = super().add_subparsers(**kw)
        make = action.add_parser

        def add_parser(name, **kw2):
            sp = make(name, **kw2)
            sp._sub = True
            return sp
        action.add_parser = add_parser
        return action


def stamp_error(line):
    """An error line, with the UTC time in front (RFC 3339) when stderr is not a
    terminal (a cron job's mail, a log file): when did it fail?"""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return line if tty else f"{utc_time()} {line}"


def utc_time():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def error(text):
    """An error on stderr: always printed (also with -q), timestamped off a terminal."""
    print(stamp_error(text), file=sys.stderr, flush=True)


def parser(prog, description, json_flag=True, json_help=None, **kw):
    p = Parser(
        prog=prog, description=description,
        epilog="exit status: " + " ".join(EXIT_STATUS.split()),
        formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    from .. import __version__
    p.add_argument("--version", action="version", version=f"sk {__version__}",
                   help="print the version of sk and exit")
    common(p, json_flag, json_help=json_help)
    p._manpage = [{"heading": "exit status", "content": EXIT_STATUS},
                  {"heading": "environment", "content": ENVIRONMENT}]
    return p


def common(p, json_flag=True, suppress=False, json_help=None):
    """-q/-v (and --json) on parser p; suppress=True for a sub-parser that must not
    overwrite what its parent parsed."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="say more (per event)")
    if json_flag:
        p.add_argument("--json", action="store_true", default=d(False),
                       help=json_help or "machine-readable output on stdout")


def bounded(lo, hi, name="N"):
    """An argparse type: an integer from lo to hi, else a usage error (exit 2)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be from {lo} to {hi}")
        return value
    return parse


def home_flag(p):
    p.add_argument("--home", metavar="DIR",
                   help="device directory (default: $SK_HOME, else ~/.spec-kitty)")


def server_flags(p):
    p.add_argument("--server", metavar="URL", help="server URL (default: SK_SERVER)")
    p.add_argument("--key", metavar="KEY", help="API key (default: SK_API_KEY)")


def config(args):
    from ..config import Config
    return Config(getattr(args, "home", None),
                  {"SK_SERVER": getattr(args, "server", None), "SK_API_KEY": getattr(args, "key", None)})


def say(args, text):
    """Chatter for people: stderr, silenced by -q."""
    if not args.quiet:
        print(text, file=sys.stderr)


_VERBS = {"accepted": ("pushed", None), "duplicate": ("pushed", "already on the server")}


def event_line(kind, ev, reason=None):
    """The one style of a -v line, on stderr: `pulled <id> <type> <aggregate>` (and
    `pushed`, `stamped`, `rejected`, `would push`, ...), then `: reason` if any."""
    verb, why = _VERBS.get(kind, (kind, None))
    reason = reason or why
    print(f"{verb} {ev.event_id} {ev.event_type} {ev.aggregate_type}:{ev.aggregate_id}"
          + (f": {reason}" if reason else ""), file=sys.stderr)


def plural(n, word, many=None):
    """'1 event', '2 events', '1,000 events'."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def emit(obj):
    """One JSON object a line on stdout (result types are written as objects)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                                default=lambda o: o._asdict()) + "\n")


class Context:
    """What the runner gives a command's body, made when first asked for: the
    configuration, the local store and a client."""

    def __init__(self, args, needs=()):
        self.args, self.needs = args, set(needs)
        self._cfg = self._store = self._client = self._keyring = None

    @property
    def cfg(self):
        if self._cfg is None:
            self._cfg = config(self.args)
        return self._cfg

    @property
    def store(self):
        if self._store is None:
            from ..store import open_store
            self._store = open_store(self.cfg, create="log" not in self.needs)
        return self._store

    @property
    def keyring(self):
        if self._keyring is None:
            from ..keyring import Keyring
            self._keyring = Keyring(self.store, self.cfg.api_key)
        return self._keyring

    @property
    def client(self):
        if self._client is None:
            from ..sync import open_client
            self._client = open_client(self.cfg)
        return self._client

    def close(self):
        if self._client is not None:
            self._client.close()
        if self._store is not None:
            self._store.close()


def run(prog, get_parser, body, argv=None):
    """Parse argv; provide what the command table says the command needs (the
    local store, a client, the device lock, tracking for `sk sync status`); call
    body(args, ctx); turn sk errors into one line and an exit code. The client and
    the store are closed however the body ends. SIGTERM and SIGHUP stop a device
    command as Ctrl-C does (a tracked run records the failure); it exits
    128 + the signal's number."""
    from ..commands import by_module, needs
    from ..errors import Interrupted, SkError
    args = get_parser(prog).parse_args(argv)
    args.prog = prog
    # events a server accepted before nesting was bounded (sk 0.3.0 let 976 levels in)
    # must still parse wherever they arrive, inside a page or a batch
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4000))
    entry = by_module(body.__module__)
    ctx = Context(args, needs(entry, getattr(args, "action", None)) if entry else ())
    if body.__module__.startswith("sk.cmd."):   # (the server's commands keep their own)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        # A device command is one short process that makes millions of small objects
        # (events, rows, stamps) and no cycles to speak of: the cyclic collector's
        # passes over them took a quarter of a large pull, and reclaimed nothing.
        # Memory is still freed as it always is (reference counts); `sk sync watch`,
        # which runs for days, turns the collector back on (sk.watch).
        import gc
        gc.disable()
    try:
        with contextlib.ExitStack() as stack:
            if ctx.needs & {"store", "log"}:
                ctx.store          # a bad home fails here, before anything else
            if "client" in ctx.needs:
                ctx.client         # and so does a missing or malformed server or key
            if "lock" in ctx.needs:
                from ..sync import device_lock
                stack.enter_context(device_lock(ctx.cfg))
            if "track" in ctx.needs:
                from ..sync import tracked
                stack.enter_context(tracked(ctx.store))
            if "keys" in ctx.needs:
                ctx.keyring.ensure(ctx.client)
            code = body(args, ctx)
        sys.stdout.flush()
        return code or 0
    except BrokenPipeError:   # stdout went away (`sk-log | head`): stop quietly, as git does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except SkError as e:
        error(f"{prog}: {e}")
        return e.exit_code
    except OSError as e:  # the disk, not the user: full, read-only, gone
        error(f"{prog}: {e.strerror or e}" + (f": '{e.filename}'" if e.filename else ""))
        return 2
    except Exception as e:
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(e, sqlite3.Error):
            raise
        error(f"{prog}: database error: {e}")
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        done = getattr(e, "done", None)
        error(f"{prog}: {Interrupted.describe(signum)}" + (f"; {done}" if done else ""))
        return 128 + signum
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        ctx.close()


def _interrupt(signum, frame):
    from ..errors import Interrupted
    raise Interrupted(signum)
