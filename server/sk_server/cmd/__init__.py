"""The server host's commands: `sk server`, sk-register and sk-admin. Each is a
parser and a body run by the device commands' one runner (sk.cmd._common); they
come with `pip install 'sk[server]'`."""
