"""Shell completion for sk, made by shtab from the commands' own parsers (the
command table says which), never written by hand."""


def _installed():
    """(Command, its module) of each command that is installed (those of the server
    package are not everywhere)."""
    import importlib

    from .commands import COMMANDS
    for c in COMMANDS:
        try:
            yield c, importlib.import_module(c.module)
        except ImportError:
            continue


def tree():
    """One argparse parser for `sk`, with every command's real parser under it."""
    import argparse

    from . import __version__
    root = argparse.ArgumentParser(prog="sk", description="offline-first, event-sourced sync"
                                   " toolkit, git-style", allow_abbrev=False)
    root.add_argument("--version", action="version", version=f"sk {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND")
    for c, module in _installed():
        parser = module.get_parser(f"sk {c.name}")
        sub.add_parser(c.name, help=c.summary, parents=[parser], add_help=False,
                       description=parser.description, allow_abbrev=False)
    return root


def plumbing():
    """The parsers of the plumbing executables (sk-append, ...) that are installed."""
    return [module.get_parser(f"sk-{c.name}") for c, module in _installed()
            if c.kind == "plumbing"]


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
