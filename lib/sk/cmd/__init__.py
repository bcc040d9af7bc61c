"""One module per command: `get_parser()` (stdlib only, cheap) and `main(argv=None)`."""
