#!/usr/bin/env python3
"""Generate man/<command>.1 from each command's argparse parser (argparse-manpage).

`python tools/genman.py` writes the pages; `--check` exits 1 if any committed page
is stale or missing (the test suite runs it)."""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "server")]

DATE = "2026-11-22"  # fixed, so pages only change when a parser does


def pages():
    """{file name: man page text} for every command and porcelain subcommand."""
    import importlib

    from argparse_manpage.manpage import Manpage

    from sk import __version__
    from sk.commands import (COMMANDS, EXAMPLES, FILES, SERVER_FILES, executables,
                             man_name)

    targets = [(exe, mod, exe) for exe, mod in executables()]
    targets += [(f"sk-{c.name}", c.module, f"sk {c.name}") for c in COMMANDS
                if c.kind == "porcelain"]
    out = {}
    for name, mod, prog in targets:
        module = importlib.import_module(mod)
        parser = module.get_parser(prog)
        parser.epilog = None  # the exit codes have their own EXIT STATUS section
        summary = next((c.summary for c in COMMANDS if c.module == mod), None)
        entry = next((c for c in COMMANDS if c.module == mod), None)
        key = entry.name if entry else "sk"
        sections = [s for s in getattr(parser, "_manpage", [])
                    if s["heading"] not in ("examples", "files", "see also")]
        if key in EXAMPLES:
            sections.append({"heading": "examples", "content": _lines(EXAMPLES[key])})
        on_server = bool(entry and entry.module.startswith("sk_server"))
        sections.append({"heading": "files", "content": _lines(SERVER_FILES if on_server
                                                                else FILES)})
        if not any(s["heading"] == "environment" for s in sections):
            from sk.commands import ENVIRONMENT
            sections.append({"heading": "environment", "content": ENVIRONMENT})
        others = ["sk(1)"] if key != "sk" else []
        others += [f"{man_name(c)}(1)" for c in COMMANDS if c is not entry]
        sections.append({"heading": "see also", "content": ", ".join(others)})
        parser._manpage = sections
        page = Manpage(parser, _data={
            "date": DATE, "project_name": "sk", "version": __version__,
            "manual_title": "sk manual", "manual_section": 1,
            "description": summary or "offline-first, event-sourced sync toolkit, git-style",
        })
        text = str(page)
        if " " in prog:  # `sk sync` is documented as sk-sync(1), like git-commit(1)
            text = text.replace(f".TH {prog.upper()} ", f".TH {name.upper()} ", 1)
        out[f"{name}.1"] = text
    return out


def _lines(text):
    """Text kept line by line in the page (roff no-fill), minus signs as such."""
    return ".nf\n" + text.replace("-", "\\-") + "\n.fi"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="fail if man/ is stale")
    args = p.parse_args(argv)
    os.environ.setdefault("COLUMNS", "80")
    man = ROOT / "man"
    stale = []
    for fname, text in pages().items():
        path = man / fname
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(fname)
        else:
            man.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale man pages (run 'make man'): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
