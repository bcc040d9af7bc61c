"""sk: the porcelain and git-style dispatcher (`sk <x>` runs `sk-<x>`)."""

import os
import shutil
import sys

from .. import __version__
from ..commands import COMMANDS, EXIT_STATUS, SERVER_EXTRA, find

DESCRIPTION = "offline-first, event-sourced sync toolkit, git-style"


def _help_text():
    lines = ["usage: sk [--version] [--help] <command> [<args>]", "", DESCRIPTION, ""]
    for kind in ("porcelain", "plumbing"):
        lines.append(f"{kind} commands:")
        for c in COMMANDS:
            if c.kind == kind:
                lines.append(f"  {c.name:<12}{c.summary}")
        lines.append("")
    lines += ["'sk <command> --help' for a command's options; 'sk <x>' runs 'sk-<x>'.",
              "exit status: " + " ".join(EXIT_STATUS.split())]
    return "\n".join(lines)


def get_parser(prog="sk"):
    """For the man page: the commands as sub-parsers."""
    import argparse
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION + ". 'sk <x>' runs the"
                                " porcelain command x, else the executable sk-<x> found next"
                                " to sk or on PATH, passing its exit status through.")
    p.add_argument("--version", action="version", version=f"sk {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        sub.add_parser(c.name, help=f"({c.kind}) {c.summary}")
    p._manpage = [{"heading": "exit status", "content": EXIT_STATUS}]
    return p


def find_executable(name):
    here = os.path.dirname(os.path.abspath(sys.argv[0] or ""))
    cand = os.path.join(here, f"sk-{name}")
    if os.path.isfile(cand) and os.access(cand, os.X_OK):
        return cand
    return shutil.which(f"sk-{name}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help":
            argv = [argv[1], "--help"]
        else:
            print(_help_text(), file=sys.stdout if argv else sys.stderr)
            return 0 if argv else 2
    if argv[0] == "--version":
        print(f"sk {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    entry = find(name)
    if entry and entry.kind == "porcelain":
        import importlib
        try:
            module = importlib.import_module(entry.module)
        except ImportError:   # sk server, without the server package
            print(f"sk {name}: runs on the server host, and this installation has no server:"
                  f" {SERVER_EXTRA}", file=sys.stderr)
            return 2
        return module.main(rest, prog=f"sk {name}")
    path = find_executable(name) if not name.startswith("-") else None
    if path is None:
        import difflib
        near = difflib.get_close_matches(name, [c.name for c in COMMANDS], n=1)
        print(f"sk: '{name}' is not an sk command"
              + (f"; did you mean '{near[0]}'? (see 'sk --help')" if near
                 else "; see 'sk --help'"),
              file=sys.stderr)
        return 2
    sys.stdout.flush()
    try:
        os.execv(path, [path] + rest)
    except OSError as e:
        print(f"sk: cannot run '{path}': {e}", file=sys.stderr)
        return 2


