"""Run the app under gunicorn (gthread worker): what `sk server` does."""

import sys


def serve(host="127.0.0.1", port=9100, db=None, workers=1, threads=32, access_log=False,
          control_socket=True, timeout=60):
    from gunicorn.app.base import BaseApplication

    from . import create_app

    app = create_app({"DB": db} if db else None)  # fail here, clearly, on a bad DB

    class _Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                "workers": workers, "worker_class": "gthread", "threads": threads,
                "timeout": timeout, "graceful_timeout": 5, "keepalive": 30,
                "accesslog": "-" if access_log else None, "errorlog": "-",
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve())
