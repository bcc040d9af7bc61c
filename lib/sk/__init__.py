"""sk: offline-first, event-sourced sync toolkit (client library).

The library is usable without the commands: `sk.store.LocalStore` is the device's
log, `sk.resolve` folds it, `sk.client.Client` talks to a server, `sk.sync` composes
them. Commands in `sk.cmd` only parse arguments and call one function here.
"""

__version__ = "0.4.0"
PROTOCOL_VERSION = 2
