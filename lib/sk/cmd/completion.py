"""sk completion: a shell completion script for sk, made from its real parsers."""

from . import _common

DESCRIPTION = """\
Print a completion script for SHELL (bash, zsh or fish) on stdout, made by shtab
from the parsers of every command (so it knows every subcommand and flag, and
follows them when they change). Install it once:

  bash: sk completion bash > ~/.local/share/bash-completion/completions/sk
        and, for the sk-* executables too, in ~/.bashrc:
        source ~/.local/share/bash-completion/completions/sk
  zsh:  sk completion zsh > "${fpath[1]}/_sk"
  fish: sk completion fish > ~/.config/fish/completions/sk.fish
        and, for the sk-* executables too, in ~/.config/fish/config.fish:
        source ~/.config/fish/completions/sk.fish

It completes `sk <command> ...` (the plumbing under `sk <name>`: sk log, sk
append, ...), and for bash and fish the sk-* executables (sk-log, sk-append,
...) as well; the shells load a completion file by the command's name, hence
the source line. Commands of the server package are left out where it is not
installed."""

SHELLS = ("bash", "zsh", "fish")


def get_parser(prog="sk completion"):
    p = _common.parser(prog, DESCRIPTION, json_flag=False)
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    return p


def _body(args, ctx):
    import sys

    from ..completion import script
    sys.stdout.write(script(args.shell))
    return 0


def main(argv=None, prog="sk completion"):
    return _common.run(prog, get_parser, _body, argv)
