"""Run the app under gunicorn (gthread worker): what `sk server` does."""

import os
import sys

REST_THREADS = 8   # threads of a worker that WebSocket sessions never take


def serve(host="127.0.0.1", port=9100, db=None, workers=1, threads=32, access_log=False,
          control_socket=True, timeout=60, forwarded_for=0, snapshot_every=None,
          metrics=None, log_format="text", say=None):
    """Serve until SIGTERM. The listening sockets (the API's, and with metrics=(host,
    port) the metrics') are bound before anything else is made, so an address in
    use leaves no new database behind; port 0 takes a free port, which `say` is told
    with the rest of the addresses. control_socket: gunicorn's control socket
    beside the SQLite database (server.db -> server.ctl); never for PostgreSQL."""
    import shutil
    import signal
    import tempfile

    from gunicorn.app.base import BaseApplication

    api_sock = _listen(host, port)
    metrics_sock = multiproc = None
    master = os.getpid()   # a worker leaves through this frame too: only the master cleans up

    def cleanup():
        for sock in (api_sock, metrics_sock):
            if sock is not None:
                sock.close()
        if multiproc:
            shutil.rmtree(multiproc, ignore_errors=True)

    try:
        if metrics:
            metrics_sock = _listen(*metrics)
            # before prometheus_client is imported: every worker writes its figures here
            multiproc = tempfile.mkdtemp(prefix="sk-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc
        from . import create_app
        # each WebSocket session holds a thread: leave REST its own (REST_THREADS)
        config = {"FORWARDED_FOR": forwarded_for, "LOG_FORMAT": log_format,
                  "METRICS": bool(metrics),
                  "WS_SESSIONS": max(1, threads - min(REST_THREADS, threads // 2))}
        if db:
            config["DB"] = db
        if snapshot_every is not None:
            config["SNAPSHOT_EVERY"] = snapshot_every
        app = create_app(config)  # fail here, clearly, on a bad DB
        ctl = _control_socket(app.config["DB"]) if control_socket else None
        listener = None
        if metrics_sock is not None:
            from . import ops
            from .store import open_store
            listener = ops.MetricsListener(metrics_sock, open_store(app.config["DB"], create=False))
        if say:
            say(f"listening on {_url(api_sock)}"
                + (f"; metrics on {_url(metrics_sock)}/metrics" if metrics_sock else ""))
        # no database connection is carried across gunicorn's fork (a SQLite connection
        # a worker inherits and closes at its exit can corrupt the database): each
        # process connects afresh
        app.extensions["sk_store"].close()
        if listener is not None:
            listener.store.close()
        # a client that hangs up mid-answer must not kill a worker: ignore SIGPIPE
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        fd = api_sock.detach()   # gunicorn takes the bound socket over (and closes this fd)

        class _Server(BaseApplication):
            def load_config(self):
                settings = {
                    "bind": f"fd://{fd}",
                    "workers": workers, "worker_class": "sk_server.worker.Worker",
                    "threads": threads,
                    "timeout": timeout, "graceful_timeout": 5, "keepalive": 30,
                    "accesslog": "-" if access_log and log_format != "json" else None,
                    "errorlog": "-",
                    # the common log format, then the time taken in microseconds
                    "access_log_format": '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s %(D)s',
                    "proc_name": "sk-server",
                }
                if "control_socket_disable" in self.cfg.settings:
                    if ctl is None:
                        settings["control_socket_disable"] = True
                    else:
                        settings["control_socket"] = ctl
                if listener is not None:
                    settings["when_ready"] = lambda arbiter: listener.start()
                    settings["post_fork"] = lambda arbiter, worker: listener.forget()
                    settings["child_exit"] = _child_exit
                for k, v in settings.items():
                    if k in self.cfg.settings:
                        self.cfg.set(k, v)

            def load(self):
                return app

        _Server().run()
    except SystemExit as e:
        # gunicorn ends a worker, and the master once its workers are gone, with
        # SystemExit: everything is answered, committed and closed by then, and what
        # the interpreter would still tear down (threads blocked on sockets, the
        # app) only delays the stop, by half a second and more
        if os.getpid() == master:
            cleanup()
        _exit_now(e.code)
    finally:
        if os.getpid() == master:
            cleanup()
    return 0


def _exit_now(code):
    """Flush what was written and end the process (see serve)."""
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def _child_exit(arbiter, worker):
    """A worker is gone: its live gauges (sessions) no longer count."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def _control_socket(db):
    """gunicorn's control socket beside a SQLite database (server.db -> server.ctl),
    not in ~/.gunicorn; none for PostgreSQL (several servers share one database),
    nor where the path is too long for a Unix socket."""
    from .store import is_url
    if is_url(db):
        return None
    path = os.path.splitext(os.path.abspath(os.path.expanduser(os.fspath(db))))[0] + ".ctl"
    return path if len(path.encode()) < 100 else None


def _url(sock):
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _listen(host, port):
    """A TCP socket bound to host:port (0: any free port), or one line saying why
    not, before anything else starts."""
    import socket

    from sk.errors import ConfigError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)   # held now; listened on once the server is ready (gunicorn's
            # listen, MetricsListener.start), so a connection that succeeds finds it ready
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve())
