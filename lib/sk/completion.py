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


def script(shell):
    """The completion script for shell ('bash', 'zsh' or 'fish')."""
    import shtab
    return shtab.complete(tree(), shell=shell)
