"""Shell completion for sk, made by shtab from the commands' own parsers (the
command table says which), never written by hand."""


def tree():
    """One argparse parser for `sk`, with every command's real parser under it."""
    import argparse
    import importlib

    from . import __version__
    from .commands import COMMANDS
    root = argparse.ArgumentParser(prog="sk", description="offline-first, event-sourced sync"
                                   " toolkit, git-style", allow_abbrev=False)
    root.add_argument("--version", action="version", version=f"sk {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        try:
            module = importlib.import_module(c.module)
        except ImportError:   # the server's commands, where the server package is not installed
            continue
        parser = module.get_parser(f"sk {c.name}")
        sub.add_parser(c.name, help=c.summary, parents=[parser], add_help=False,
                       description=parser.description, allow_abbrev=False)
    return root


def plumbing():
    """The parsers of the plumbing executables (sk-append, ...) that are installed."""
    import importlib

    from .commands import COMMANDS
    for c in COMMANDS:
        if c.kind != "plumbing":
            continue
        try:
            module = importlib.import_module(c.module)
        except ImportError:   # the server's commands, where the server package is not installed
            continue
        yield module.get_parser(f"sk-{c.name}")


# shells whose scripts for several commands may follow one another in one file
ONE_FILE = ("bash", "fish")


def script(shell):
    """The completion script for shell ('bash', 'zsh' or 'fish'): `sk <command>`, and
    for bash and fish each sk-<name> executable too (zsh's script names one command)."""
    import shtab
    parts = [shtab.complete(tree(), shell=shell)]
    if shell in ONE_FILE:
        parts += [shtab.complete(p, shell=shell) for p in plumbing()]
    return "\n".join(parts)
