"""Talk to an sk server: one sealed POST per call, errors mapped to exit codes.

Every request has one deadline (SK_TIMEOUT, the whole request: connect, send,
answer), kept by a watchdog that shuts the socket down when it passes, so a
server that trickles a byte at a time cannot hold a device (and its lock). Every
answer is read with a bound and never inflated by HTTP: sk's answers are sealed,
and compressed inside the seal.

An answer is authenticated when it is sealed under this device's key for this
very request. Only an authenticated answer may change local data; an unsealed
error (a proxy's, or a forged one) is reported, with its HTTP status, and at
most makes the caller retry or split.
"""

import http.client
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from . import PROTOCOL_VERSION, __version__, crypto, wire
from .errors import AuthError, ConfigError, IntegrityError, ServerError, Unreachable

MAX_ERROR_BODY = 64 * 1024     # an unsealed error answer is read up to this


class Stale(Exception):
    """A kept-alive connection was gone when it was used again: send once more,
    sealed anew, on a fresh one."""


class Transport:
    """One kept-alive HTTP/1.1 connection to the server (or through its proxy),
    used by one thread."""

    def __init__(self, server):
        parts = urlsplit(server)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.proxy = _proxy_for(server)
        self.conn = None

    def _connect(self, timeout):
        if self.proxy:
            phost, pport = self.proxy
            if self.https:
                conn = http.client.HTTPSConnection(phost, pport, timeout=timeout,
                                                   context=ssl.create_default_context())
                conn.set_tunnel(self.host, self.port)
            else:
                conn = http.client.HTTPConnection(phost, pport, timeout=timeout)
        elif self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return conn

    def post(self, path, headers, body, timeout, limit):
        """(status, reason, headers, body) of POST path, all within `timeout`
        seconds; the body is read up to `limit` bytes (ServerError past it)."""
        deadline = time.monotonic() + timeout
        target = (f"{'https' if self.https else 'http'}://{self.host}:{self.port}"
                  if self.proxy and not self.https else "") + self.prefix + path
        fresh = self.conn is None
        if fresh:
            self.conn = self._connect(timeout)
        elif self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        watchdog = _Watchdog(self.conn, deadline)
        try:
            self.conn.request("POST", target, body=body, headers=headers)
            resp = self.conn.getresponse()
            return _read(resp, limit)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            self.close()
            if fresh or watchdog.fired:
                raise
            raise Stale(str(e)) from None   # (nothing of an answer came: send once more)
        except BaseException:
            self.close()
            raise
        finally:
            if watchdog.cancel():
                self.close()
                raise socket.timeout(f"no whole answer within {timeout:g} s")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _Watchdog:
    """Shuts a connection's socket down at `deadline`, ending any read or write
    blocked on it."""

    def __init__(self, conn, deadline):
        self.conn, self.fired = conn, False
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self):
        self.fired = True
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self):
        """Stop the watchdog; True if it had fired."""
        self.timer.cancel()
        return self.fired


def _read(resp, limit):
    """The answer's status, reason, headers and body, read up to `limit` bytes.
    sk never asks for HTTP compression, and does not undo any: a body says what
    it is in its own bytes."""
    headers = {k.lower(): v for k, v in resp.getheaders()}
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        resp.close()
        raise ServerError(f"answer of {int(length)} bytes is over the {limit} bytes a"
                          f" {'sealed answer' if limit > MAX_ERROR_BODY else 'error'} may have",
                          status=resp.status, code="too_large")
    body = resp.read(limit + 1)
    if len(body) > limit:
        resp.close()
        raise ServerError(f"answer is over the {limit} bytes it may have", status=resp.status,
                          code="too_large")
    if length is not None and length.isdigit() and len(body) < int(length):
        raise http.client.IncompleteRead(body, int(length) - len(body))   # cut off on the way
    return resp.status, resp.reason, headers, body


def _proxy_for(url):
    """(host, port) of the HTTP(S)_PROXY that applies to url, or None."""
    import urllib.request
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return None
    p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return p.hostname, p.port or 80


class Client:
    def __init__(self, server, api_key, timeout=30.0):
        try:
            self.key_id, _ = crypto.parse_api_key(api_key)
        except ValueError as e:
            raise ConfigError(f"bad API key: {e}") from None
        self.master = crypto.derive_master(api_key)
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.transport = Transport(self.server)
        self.asked = set()   # what the server asked of this device in an answer (shared by twins)
        self.headers = {
            wire.PROTOCOL_HEADER: str(PROTOCOL_VERSION),
            wire.KEY_HEADER: self.key_id,
            "Content-Type": wire.CONTENT_TYPE,
            "Accept-Encoding": "identity",
            "User-Agent": f"sk/{__version__}",
        }

    def twin(self):
        """Another client for the same server and key, with its own connection, for
        a second thread."""
        other = Client.__new__(Client)
        other.__dict__.update(self.__dict__)
        other.transport = Transport(self.server)
        return other

    def call(self, endpoint, body, attachments=()):
        """POST a sealed `body` (and its attachments) to /api/<endpoint>; return the
        opened answer (its attachments under "attachments"). An error answer
        raises: ServerError(authenticated=True) only if it was sealed for this
        request."""
        try:
            try:
                blob, nonce = wire.seal_request(self.master, self.key_id, endpoint, body,
                                                attachments)
                status, reason, headers, data = self.transport.post(
                    f"/api/{endpoint}", self.headers, blob, self.timeout, wire.MAX_BODY)
            except Stale:
                blob, nonce = wire.seal_request(self.master, self.key_id, endpoint, body,
                                                attachments)
                status, reason, headers, data = self.transport.post(
                    f"/api/{endpoint}", self.headers, blob, self.timeout, wire.MAX_BODY)
        except (socket.timeout, TimeoutError):
            raise Unreachable(f"server '{self.server}' did not answer within"
                              f" {self.timeout:g} s") from None
        except ServerError as e:
            raise IntegrityError(f"'{self.server}/api/{endpoint}': {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach server '{self.server}': {_reason(e)}") from None
        sealed = headers.get("content-type", "").split(";")[0] == wire.CONTENT_TYPE
        if status == 200 and not sealed:
            raise IntegrityError(f"'{self.server}/api/{endpoint}' answered 200 with"
                                 f" {headers.get('content-type') or 'no content type'}, not a"
                                 " sealed sk answer: is this an sk server?")
        if sealed:
            if status == 200:
                answer = self._open(endpoint, nonce, data)
                if answer.get("snapshot_wanted") is True:
                    self.asked.add("snapshot")
                return answer
            try:
                answer = self._open(endpoint, nonce, data)
            except IntegrityError:
                if status == 401:   # sealed for the key the server holds: not this one
                    raise AuthError(f"key rejected: the server holds another key under key id"
                                    f" '{self.key_id}' (a wrong or mistyped API key?)") from None
                if status == 429:
                    raise Unreachable(f"server '{self.server}' answered HTTP 429: too many"
                                      " failed authentications from this address") from None
                raise
            raise _error(status, reason, answer.get("error"), answer.get("protocol"),
                         self.server, endpoint, authenticated=True)
        err, theirs = _unsealed_error(data, headers)
        raise _error(status, reason, err, theirs, self.server, endpoint, authenticated=False)

    def _open(self, endpoint, nonce, data):
        try:
            return wire.open_response(self.master, self.key_id, endpoint, nonce, data)
        except crypto.CryptoError:
            raise IntegrityError(f"answer from '{self.server}' failed authentication:"
                                 " altered in transit, or not from the server that holds"
                                 " this key") from None
        except wire.WireError as e:
            raise IntegrityError(f"malformed answer from '{self.server}': {e}") from None

    def hello(self):
        return self.call("hello", {})

    def pull(self, after, limit, skip=None, known=None, queued=None):
        body = {"after": after, "limit": limit}
        if queued is not None:   # for the server's admin: how many events wait here
            body["queued"] = queued
        if skip is not None:
            body["skip"] = {"node_id": skip[0], "upto": skip[1]}
        if known is not None:
            body["known"] = known
        return self.call("pull", body)

    def close(self):
        self.transport.close()


def _reason(exc):
    text = str(exc)
    for hint in ("Connection refused", "Name or service not known", "timed out",
                 "Connection reset", "Remote end closed", "No route to host",
                 "Temporary failure in name resolution"):
        if hint.lower() in text.lower():
            return hint.lower()
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or text}"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _unsealed_error(data, headers):
    """({code, message} or None, the server's protocol) of an unsealed error body."""
    if headers.get("content-encoding", "identity") != "identity":
        return None, None
    try:
        answer = wire.loads(data[:MAX_ERROR_BODY])
        err = answer.get("error")
        return (err if isinstance(err, dict) else None), answer.get("protocol")
    except (ValueError, AttributeError, RecursionError):
        return None, None


def _error(status, reason, err, theirs, server, endpoint, authenticated):
    """The exception for an error answer, naming the HTTP status. `authenticated`:
    the answer was sealed for this request (the server said it), else anyone on
    the way may have."""
    err = err if isinstance(err, dict) else {}
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = str(err.get("message"))[:500] if err.get("message") is not None else None
    what = f"server '{server}' answered HTTP {status}"
    detail = f": {message}" if message else (f" ({reason})" if reason else "")
    if status in (401, 403):
        if authenticated and code == "bad_key":
            return IntegrityError(f"the server could not authenticate the request: altered in"
                                  f" transit{': ' + message if message else ''}")
        if authenticated:
            return AuthError(f"key rejected: {message or reason}")
        return AuthError(f"key rejected{': ' + message if message else ''} (HTTP {status},"
                         " unsealed: the server does not know this key, or something"
                         " between this device and the server answered)")
    if code == "damaged" and authenticated:   # the server says it cannot read what it stored
        return IntegrityError(message or "the server's stored events cannot be read")
    if code == "protocol_version":
        side = ("upgrade the sk server" if isinstance(theirs, int) and theirs < PROTOCOL_VERSION
                else "upgrade sk on this device")
        return IntegrityError(f"{message}; {side}")
    if status in (408, 429):   # too slow, or too many failures from here: later
        return Unreachable(f"{what}{detail}")
    if status == 413:
        return ServerError(f"{what} (too large){': ' + message if message else ''}",
                           status=413, code=code, authenticated=authenticated)
    if status in (502, 503, 504) or (status >= 500 and code):
        return Unreachable(what + detail)
    if code is None or status == 404:
        return IntegrityError(f"no sk server at '{server}/api/{endpoint}': HTTP {status}"
                              f"{' (' + reason + ')' if reason else ''}; the URL is the"
                              " server's root, e.g. http://host:9100")
    return IntegrityError(what + detail)
