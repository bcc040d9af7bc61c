"""sk team: the team key's members, approvals, and the approval mode."""

import argparse

from . import _common

DESCRIPTION = """\
The team key is shared by the team's devices, never by the server: a member
seals it to each device's identity (derived from the device's API key), and
every network command of a member (sk sync, sk sync watch, this one) shares it
with the devices that lack it, the whole history included.

sk team members: every device of the team, its fingerprint, whether it holds the
current key epoch, and whether it is approved (first it shares the key, as any
member's sync would).

sk team approve NAME: where the team requires approval, grant device NAME the
team key. Shows NAME's fingerprint and this device's; compare them with what
`sk team members` shows on NAME (or `sk sync status`) before saying yes (or give
--yes). The approval is a MAC under the team key, which the server cannot make.

sk team require-approval: from now on members share the key only with devices a
member approved; the devices that hold it now are approved by this one. Once a
device has seen approval required, it refuses to share the key if the server
ever says otherwise. (By default, registration by the admin is the approval.)"""


def get_parser(prog="sk team"):
    p = _common.parser(prog, DESCRIPTION)
    _common.home_flag(p)
    _common.server_flags(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = sub.add_parser("members", help="the team's devices, fingerprints and key epochs")
    a = sub.add_parser("approve", help="grant a registered device the team key (approval mode)")
    a.add_argument("name", metavar="NAME", help="the device to approve")
    a.add_argument("--yes", action="store_true", help="do not ask; the fingerprints were compared")
    r = sub.add_parser("require-approval", help="members share the key only with approved devices")
    for sp in (m, a, r):
        _common.common(sp, suppress=True)
        sp.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR", help=argparse.SUPPRESS)
        sp.add_argument("--server", default=argparse.SUPPRESS, metavar="URL", help=argparse.SUPPRESS)
        sp.add_argument("--key", default=argparse.SUPPRESS, metavar="KEY", help=argparse.SUPPRESS)
    return p


def _body(args, ctx):
    from ..team import approve, members, require_approval
    if args.action == "members":
        rows = members(ctx.keyring, ctx.client)
        if args.json:
            for r in rows:
                _common.emit(r)
        elif not args.quiet:
            for r in rows:
                print(f"{r['device']:<20} {r['fingerprint'] or '(no identity yet)':<25}"
                      f" {'epoch ' + str(r['epoch']) if r['epoch'] else 'no key':<9}"
                      f"{' approved' if r['approved'] else ''}{' revoked' if r['revoked'] else ''}"
                      f"{' (this device)' if r['self'] else ''}")
        return 0
    if args.action == "require-approval":
        n = require_approval(ctx.keyring, ctx.client)
        _common.say(args, f"team '{ctx.keyring.team}' now requires approval; approved the"
                          f" {_common.plural(n, 'device')} that hold"
                          f"{'s' if n == 1 else ''} the key")
        return 0
    return _approve(args, ctx, approve)


def _approve(args, ctx, approve):
    import sys

    from ..errors import UsageError

    def confirm(theirs, mine):
        print(f"device '{args.name}': fingerprint {theirs}\nthis device: fingerprint {mine}",
              file=sys.stderr)
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError("compare the fingerprints, then give --yes (no terminal to ask on)")
        return input("approve it and share the team key with it? [y/N] ").strip().lower() == "y"

    if approve(ctx.keyring, ctx.client, args.name, confirm):
        _common.say(args, f"approved '{args.name}' and shared the team key with it")
        return 0
    _common.say(args, "not approved")
    return 1


def main(argv=None, prog="sk team"):
    return _common.run(prog, get_parser, _body, argv)
