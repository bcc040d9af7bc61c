"""`python -m sk_server`: the same as `sk server`."""

import sys

from .cmd.server import main

sys.exit(main(prog="python -m sk_server"))
