"""Docs cannot drift: man pages are fresh, every command has a page, a README row
and a console script, and --help works for each."""

import configparser
import re
import subprocess
import sys

from conftest import BIN, ROOT

sys.path.insert(0, str(ROOT / "tools"))

from sk.commands import COMMANDS, executables  # noqa: E402


def test_man_pages_are_fresh():
    import genman
    stale = [name for name, text in genman.pages().items()
             if not (ROOT / "man" / name).exists() or (ROOT / "man" / name).read_text() != text]
    assert stale == [], f"stale man pages, run 'make man': {stale}"


def test_every_command_has_man_page_with_its_sections():
    names = [exe for exe, _ in executables()]
    names += [f"sk-{c.name}" for c in COMMANDS if c.kind == "porcelain"]
    for name in names:
        page = ROOT / "man" / f"{name}.1"
        assert page.exists(), f"no man page for {name}"
        text = page.read_text()
        for section in ("EXIT STATUS", "EXAMPLES", "FILES", "ENVIRONMENT", "SEE ALSO"):
            assert f".SH {section}\n" in text, f"{name}.1 lacks {section}"
        see_also = text.split(".SH SEE ALSO\n")[1]
        assert all(f"{other}(1)" in see_also for other in names if other != name), name


def test_readme_table_matches_command_table():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- commands:")[1].split("<!-- /commands -->")[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (.+) \|$", block, re.M)
    want = [(f"sk {c.name}" if c.kind == "porcelain" else f"sk-{c.name}", c.kind, c.summary)
            for c in COMMANDS]
    assert rows == want


def test_console_scripts_match_command_table():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts == {exe: f"{mod}:main" for exe, mod in executables()}
    for exe in scripts:
        assert (BIN / exe).exists(), f"{exe} not installed"
        assert (ROOT / "bin" / exe).exists(), f"bin/{exe} missing from the checkout"


def test_every_command_answers_help():
    argvs = [[str(BIN / exe), "--help"] for exe, _ in executables()]
    argvs += [[str(BIN / "sk"), c.name, "--help"] for c in COMMANDS if c.kind == "porcelain"]
    argvs += [[sys.executable, "-m", "sk_server", "--help"]]
    for argv in argvs:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (argv, p.stderr)
        assert "usage:" in p.stdout and "Traceback" not in p.stderr, argv


def test_checkout_shims_run():
    p = subprocess.run([str(ROOT / "bin" / "sk-log"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "usage: sk-log" in p.stdout, p.stderr
