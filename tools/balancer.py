#!/usr/bin/env python3
"""A round-robin TCP load balancer for tests and benchmarks: each new connection
goes to the next backend (skipping one that refuses), and bytes are piped both
ways until either side closes. HTTP keep-alive and WebSocket connections stay on
the backend they reached, as behind nginx with keepalive upstreams.

    with Balancer([("127.0.0.1", 9101), ("127.0.0.1", 9102)]) as lb:
        lb.url   # http://127.0.0.1:PORT

`python tools/balancer.py PORT BACKEND_PORT...` runs one until interrupted.
"""

import itertools
import socket
import sys
import threading


class Balancer:
    def __init__(self, backends, port=0, host="127.0.0.1"):
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.connections = [0] * len(self.backends)   # how many each backend got
        self._stopped = threading.Event()
        self._open = set()

    def start(self):
        threading.Thread(target=self._accept, name="balancer", daemon=True).start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stopped.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns, self._open = list(self._open), set()
        for s in conns:
            _close(s)

    def _accept(self):
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self):
        """A connection to the next backend that accepts one, or None."""
        for _ in range(len(self.backends)):
            with self._lock:
                i = next(self._next)
            try:
                s = socket.create_connection(self.backends[i], timeout=5)
            except OSError:
                continue
            s.settimeout(None)
            with self._lock:
                self.connections[i] += 1
            return s
        return None

    def _serve(self, client):
        backend = self._connect()
        if backend is None:
            _close(client)
            return
        with self._lock:
            self._open.update((client, backend))
        t = threading.Thread(target=_pipe, args=(backend, client), daemon=True)
        t.start()
        _pipe(client, backend)
        t.join()
        with self._lock:
            self._open.difference_update((client, backend))
        _close(client)
        _close(backend)


def _pipe(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(s):
    try:
        s.close()
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    port, *ports = (int(a) for a in sys.argv[1:])
    lb = Balancer([("127.0.0.1", p) for p in ports], port).start()
    print(lb.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        lb.stop()
