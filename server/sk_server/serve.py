"""Run the app under gunicorn (gthread worker): what `sk server` does."""

import sys

REST_THREADS = 8   # threads of a worker that WebSocket sessions never take


def serve(host="127.0.0.1", port=9100, db=None, workers=1, threads=32, access_log=False,
          control_socket=True, timeout=60, forwarded_for=0, snapshot_every=None):
    import signal

    from gunicorn.app.base import BaseApplication

    from . import create_app

    # each WebSocket session holds a thread: leave REST its own (REST_THREADS)
    config = {"FORWARDED_FOR": forwarded_for,
              "WS_SESSIONS": max(1, threads - min(REST_THREADS, threads // 2))}
    if db:
        config["DB"] = db
    if snapshot_every is not None:
        config["SNAPSHOT_EVERY"] = snapshot_every
    app = create_app(config)  # fail here, clearly, on a bad DB
    _check_bind(host, port)
    # a client that hangs up mid-answer must not kill a worker: ignore SIGPIPE
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    class _Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                "workers": workers, "worker_class": "sk_server.worker.Worker", "threads": threads,
                "timeout": timeout, "graceful_timeout": 5, "keepalive": 30,
                "accesslog": "-" if access_log else None, "errorlog": "-",
                # the common log format, then the time taken in microseconds
                "access_log_format": '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s %(D)s',
                "proc_name": "sk-server",
            }
            if not control_socket and "control_socket_disable" in self.cfg.settings:
                settings["control_socket_disable"] = True
            for k, v in settings.items():
                if k in self.cfg.settings:
                    self.cfg.set(k, v)

        def load(self):
            return app

    _Server().run()
    return 0


def _check_bind(host, port):
    """Fail with one line, before gunicorn starts, when the address can't be used."""
    import socket

    from sk.errors import ConfigError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve())
