"""sk server: a Flask application factory over one store."""

import os


def create_app(config=None):
    """Build the app. `config` may set DB (path or URL; default $SK_SERVER_DB or
    ./sk-server.db), AUTH_FAIL_LIMIT, FORWARDED_FOR (how many trusted proxies stand
    in front), METRICS (count for `sk server --metrics`; PROMETHEUS_MULTIPROC_DIR
    set), LOG_FORMAT ("json": a JSON line per request on stdout) and any Flask
    setting."""
    from flask import Flask

    from sk import wire

    from .api import api
    from .store import open_store

    app = Flask(__name__, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=wire.MAX_BODY, JSON_SORT_KEYS=False,
                      AUTH_FAIL_LIMIT=20,   # failed authentications per address a minute
                      SNAPSHOT_EVERY=_every(os.environ.get("SK_SNAPSHOT_EVERY")),
                      DB=os.environ.get("SK_SERVER_DB") or "sk-server.db")
    app.config.update(config or {})
    store = app.config.get("STORE") or open_store(app.config["DB"])
    app.extensions["sk_store"] = store
    if app.config.get("FORWARDED_FOR"):
        # behind N trusted proxies: the client's address (for the failed-auth
        # slow-down) is the one they put in X-Forwarded-For
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=int(app.config["FORWARDED_FOR"]),
                                x_proto=0, x_host=0, x_port=0, x_prefix=0)
    from . import ops
    ops.init_app(app)   # metrics and request lines, when asked for
    app.register_blueprint(api)
    from . import ws
    ws.init_app(app)
    return app


def _every(value):
    """SK_SNAPSHOT_EVERY: events between snapshots (default 10000; 0: never)."""
    from sk.errors import ConfigError
    try:
        n = int(value) if value not in (None, "") else 10_000
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"SK_SNAPSHOT_EVERY must be a whole number >= 0, not '{value}'")
    return n
