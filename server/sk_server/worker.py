"""gunicorn's gthread worker, with a read timeout on every connection.

gthread waits for a first byte before it gives a connection a thread, but once a
byte has come it reads the request with no timeout: a few dozen connections that
send half a header and stall hold every thread. Here a connection's socket times
out after READ_TIMEOUT seconds without a byte, while headers or a body are read
(the WebSocket view takes the timeout off its upgraded socket: its session pings).
"""

import errno
import socket

from gunicorn.workers.gthread import TConn, ThreadWorker

READ_TIMEOUT = 10.0


class _TimedSocket(socket.socket):
    """A socket whose blocking mode is a timeout: gthread sets its connections
    blocking before each request."""

    __slots__ = ()

    def setblocking(self, flag):
        if flag:
            self.settimeout(READ_TIMEOUT)
        else:
            super().setblocking(False)


class Worker(ThreadWorker):
    def accept(self, listener):
        """gthread's accept, with a timed socket."""
        try:
            client_sock, client_addr = listener.accept()
            client_sock.__class__ = _TimedSocket
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
