"""gunicorn's gthread worker, with a read timeout on every connection.

gthread waits for a first byte before it gives a connection a thread, but once a
byte has come it reads the request with no timeout: a few dozen connections that
send half a header and stall hold every thread. Here a connection's socket times
out after HEADER_TIMEOUT seconds without a byte while its headers are read (an
honest client sends them at once), and all of them must come within
HEADER_DEADLINE; the app gives the body BODY_TIMEOUT a byte and BODY_DEADLINE in
all (api._body): a byte now and then holds no thread for longer. The WebSocket
view takes both off its upgraded socket (its session pings). On SIGTERM the
WebSocket sessions are closed at once.
"""

import errno
import queue
import socket
import threading
import time
import weakref

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

HEADER_TIMEOUT = 3.0
HEADER_DEADLINE = 10.0
BODY_TIMEOUT = 10.0
BODY_DEADLINE = 60.0       # and one more second for each BODY_RATE bytes it declares
BODY_RATE = 32 * 1024      # (8 MiB, the largest body, at 32 KiB/s: 316 s in all)

_deadlines = weakref.WeakKeyDictionary()   # socket -> when its request must be read


def read_within(sock, seconds):
    """Give what is left of the request on `sock` `seconds` in all (None: no bound)."""
    if seconds is None:
        _deadlines.pop(sock, None)
    else:
        _deadlines[sock] = time.monotonic() + seconds


class _TimedSocket(socket.socket):
    """A socket whose blocking mode is a timeout: gthread sets its connections
    blocking before each request."""

    __slots__ = ()

    def setblocking(self, flag):
        if flag:   # a request begins
            self.settimeout(HEADER_TIMEOUT)
            read_within(self, HEADER_DEADLINE)
        else:
            super().setblocking(False)

    def _bound(self):
        """Read no later than the request's deadline."""
        deadline = _deadlines.get(self)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionResetError(errno.ECONNRESET, "client too slow")
            timeout = self.gettimeout()
            if timeout is None or timeout > left:
                self.settimeout(left)

    # a client that stalls is a client gone: gthread then closes the connection and
    # logs one debug line, not a traceback
    def recv(self, *args):
        self._bound()
        try:
            return super().recv(*args)
        except socket.timeout:
            raise ConnectionResetError(errno.ECONNRESET, "client stalled") from None

    def recv_into(self, *args):
        self._bound()
        try:
            return super().recv_into(*args)
        except socket.timeout:
            raise ConnectionResetError(errno.ECONNRESET, "client stalled") from None


class _Conn(TConn):
    """gthread closes a connection "gracefully" on its main thread: it lingers up to
    2 s reading what the client still sends, and a few dozen clients that never
    close would stall every connection of the worker, one after the other. Here
    the lingering is done by one thread of its own."""

    def close(self, graceful=False):
        if not graceful:
            return super().close()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return util.close(self.sock)
        _lingering().put((time.monotonic() + 2.0, self.sock))


_linger_queue = None
_linger_lock = threading.Lock()


def _lingering():
    global _linger_queue
    with _linger_lock:
        if _linger_queue is None:
            _linger_queue = queue.Queue()
            threading.Thread(target=_linger, args=(_linger_queue,), name="sk-linger",
                             daemon=True).start()
    return _linger_queue


def _linger(q):
    """Drain each closing socket until its client closes or its time is up."""
    while True:
        deadline, sock = q.get()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                socket.socket.settimeout(sock, min(left, 0.2))
                try:
                    if not socket.socket.recv(sock, 4096):
                        break
                except socket.timeout:
                    if q.qsize():   # others wait: come back to this one later
                        q.put((deadline, sock))
                        sock = None
                        break
        except OSError:
            pass
        if sock is not None:
            util.close(sock)


class Worker(ThreadWorker):
    def handle_exit(self, sig, frame):
        """SIGTERM: stop as gthread does, and close the WebSocket sessions at once
        (each holds its connection open, so the stop would wait graceful_timeout
        for watchers that never leave)."""
        super().handle_exit(sig, frame)
        from . import ws
        ws.close_all()

    def _cap_keepalive(self, deadline):
        """On a stop gthread keeps idle kept-alive connections up to 2 s, so that a
        request on one is answered "Connection: close" rather than dropped; sk's
        client sends again on a fresh connection when a kept-alive one was closed,
        so they close at once (gunicorn 27 calls this; others never do)."""
        super()._cap_keepalive(time.monotonic())

    def accept(self, listener):
        """gthread's accept, with a timed socket and a connection that lingers apart."""
        try:
            client_sock, client_addr = listener.accept()
            client_sock.__class__ = _TimedSocket
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = _Conn(self.cfg, client_sock, client_addr, listener.getsockname())
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
