"""Real-time sync: the WebSocket endpoint GET /api/ws?token=...

A session is one thread (flask-sock under gunicorn's gthread worker) that is the
connection's only writer. It opens with a single-use token from POST
/api/ws-token, reads the client's sealed hello (its pull cursor), sends what the
device missed (catch-up), then live events as they are stored, and stores the
device's pushed batches exactly as a REST push does (api.push_batch).

The team's log in the store is the only truth. The in-process Hub wakes this
process's sessions when a push lands here, or when the store tells of events
stored by another server (PostgreSQL LISTEN/NOTIFY, see Store.listen); every
session also looks at the store each CHECK_INTERVAL, so an event stored
elsewhere still arrives when the store cannot tell. Nothing that must hold
across requests lives in the Hub.

The hello carries the device's last known point of the log; if the server's log
is not the one the device saw (restored from an older copy), the session sends
a sealed "diverged" frame and closes with 4409, and the device heals it.
"""

import socket
import struct
import threading
import time

from flask import Blueprint, current_app, g, request

from sk import crypto, wire
from sk.crypto import C2S, S2C

from . import ops
from .api import (Refused, page_out, parse_batch, parse_known, parse_queued, parse_skip,
                  push_batch, wanted)
from .store import Damaged

PING_INTERVAL = 20          # seconds between WebSocket pings (a silent client is dropped)
CHECK_INTERVAL = 1.0        # seconds between looks at the store for events from elsewhere
KEY_CHECK_INTERVAL = 0.5    # seconds between checks that the key is still valid: a revoked
                            # or rotated device's sessions close within a second, everywhere
SEND_TIMEOUT = 15           # a client that stops reading for this long is dropped
HELLO_TIMEOUT = 15


_HUBS = []   # the Hubs of this process's apps (one, under sk server): close_all on a stop


def close_all():
    """Close every WebSocket session of this process (the worker got SIGTERM)."""
    for hub in _HUBS:
        hub.close_all()


class Hub:
    """Which sessions of this process belong to which team; wakes them. It also
    keeps sessions from taking the threads REST needs: at most `limit` in this
    process and `per_device` for one device (each holds a thread while it lasts)."""

    def __init__(self, limit=24, per_device=4):
        self._lock = threading.Lock()
        self._teams = {}
        self.limit, self.per_device = limit, per_device
        self._held = {}   # device -> sessions admitted in this process
        self.stopping = False
        _HUBS.append(self)

    def admit(self, device):
        """Reserve a session for device: None, or why there is no room."""
        with self._lock:
            total = sum(self._held.values())
            if total >= self.limit:
                return (f"this server holds {total} real-time sessions, its most (the rest of"
                        " its threads serve REST); try again later")
            if self._held.get(device, 0) >= self.per_device:
                return (f"device '{device}' holds {self._held[device]} real-time sessions"
                        " already, its most")
            self._held[device] = self._held.get(device, 0) + 1
            return None

    def release(self, device):
        with self._lock:
            n = self._held.get(device, 0) - 1
            if n > 0:
                self._held[device] = n
            else:
                self._held.pop(device, None)

    def join(self, team, session):
        with self._lock:
            self._teams.setdefault(team, set()).add(session)
        ops.session(team, 1)

    def leave(self, team, session):
        with self._lock:
            members = self._teams.get(team)
            if members and session in members:
                members.discard(session)
                if not members:
                    del self._teams[team]
                ops.session(team, -1)

    def close_all(self):
        """The server is stopping: every session of this process closes now (1001,
        going away), so that a stop does not wait for watchers to leave; one still
        saying hello closes at its next look (half a second)."""
        self.stopping = True
        self.notify(None)

    def notify(self, team):
        """Wake the sessions of `team` (of every team if None)."""
        with self._lock:
            if team is None:
                members = [s for m in self._teams.values() for s in m]
            else:
                members = list(self._teams.get(team, ()))
        for session in members:
            session.wake()

    def count(self):
        with self._lock:
            return sum(len(m) for m in self._teams.values())


class Closed(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Session:
    def __init__(self, ws, store, key, sid):
        self.ws, self.store, self.key, self.sid = ws, store, key, sid
        self.n_in = self.n_out = 0
        self.dirty = threading.Event()
        self.known = None   # (seq, chain): the last point of the team's log this session saw
        self.noted = None   # the cursor last noted in the store for this device

    def wake(self):
        self.dirty.set()
        self.ws.event.set()

    def send(self, obj, attachments=()):
        """Send a frame: an object, or the JSON text of one (page_out's), to which
        the frame counter n is added, and its attachments."""
        self.n_out += 1
        if isinstance(obj, str):
            obj = f'{{"n":{self.n_out},' + obj[1:]
        else:
            obj["n"] = self.n_out
        self.ws.send(wire.seal_frame(self.key.master, self.key.key_id, S2C, self.sid, obj,
                                     attachments))

    def _take(self):
        """The next received message, or None (never blocks)."""
        buf = self.ws.input_buffer
        return buf.pop(0) if buf else None

    def open(self, data):
        if not isinstance(data, bytes):
            raise Closed(4400, "frames must be binary sealed messages")
        try:
            obj = wire.open_frame(self.key.master, self.key.key_id, C2S, self.sid, data,
                                  containers=wire.MAX_CONTAINERS)
        except crypto.CryptoError:
            raise Closed(4401, "frame failed authentication") from None
        except wire.WireError as e:
            raise Closed(4400, f"malformed frame: {e}") from None
        self.n_in += 1
        if obj.get("n") != self.n_in:
            raise Closed(4400, "frame out of order or replayed")
        return obj

    def recv_hello(self, hub):
        deadline = time.monotonic() + HELLO_TIMEOUT
        while self.ws.connected and time.monotonic() < deadline:
            if hub.stopping:
                raise Closed(1001, "the server is stopping")
            data = self._take()
            if data is not None:
                hello = self.open(data)
                cursor = hello.get("cursor")
                if hello.get("t") != "hello" or type(cursor) is not int or not 0 <= cursor < 2 ** 63:
                    raise Closed(4400, "first frame must be a hello with an integer cursor")
                try:
                    out = (cursor, parse_skip(hello.get("skip"), self.key.device),
                           parse_known(hello.get("known")))
                    queued = parse_queued(hello.get("queued"))
                    if queued is not None:
                        self.store.note_device(self.key.device, queued=queued)
                    return out
                except Refused as e:
                    raise Closed(4400, e.message) from None
            self.ws.event.wait(0.5)
            self.ws.event.clear()
        raise Closed(4408, "no hello within 15 s")

    def send_new(self, cursor, exclude, catchup=False):
        """Send every stored event after cursor, page by page; return the new cursor.
        Every look shows the store the last point of the log this session saw (the
        device's, at first), so a log put back under a live session is noticed."""
        while True:
            try:
                page = self.store.pull(self.key.team, cursor, 1000, exclude, self.known)
                frame = page_out(page, t="events", catchup=catchup)
            except Damaged as e:
                self.damaged("pull", e)
            if page.diverged:
                self.diverged(page.diverged)
            if page.chain is not None:
                self.known = (page.next, page.chain)
            if not page.rows and page.next == cursor:
                return self.reached(cursor)
            self.send(*frame)
            ops.pulled(self.key.team, page)
            cursor = page.next
            if not page.more:
                return self.reached(cursor)

    def reached(self, cursor):
        """Remember the point of the log this device has now been sent (its lag)."""
        if cursor != self.noted:
            self.store.note_device(self.key.device, pulled=cursor)
            self.noted = cursor
        return cursor

    def diverged(self, reason):
        """Say why, sealed (the close frame says only that), and close: the device
        heals the server and comes back."""
        self.send({"t": "diverged", "diverged": reason, "team": self.key.team})
        raise Closed(4409, "the server's log is not the one this device saw")

    def damaged(self, what, e):
        """The store cannot read what it stored: say so, sealed (a close frame proves
        nothing), log the cause, and close."""
        current_app.logger.error("websocket %s of '%s': %s", what, self.key.device, e,
                                 exc_info=e)
        self.send({"t": "damaged", "message": str(e)})
        raise Closed(1011, "stored events cannot be read") from None

    def check_key(self):
        if not self.store.key_valid(self.key.key_id):
            raise Closed(4401, "key revoked or rotated")

    def handle(self, msg):
        if msg.get("t") != "push":
            raise Closed(4400, f"unknown frame type {str(msg.get('t'))[:20]!r}")
        try:
            batch, relay = parse_batch(msg)
            queued = parse_queued(msg.get("queued"))
        except Refused as e:
            raise Closed(4400, f"push frame: {e.message}") from None
        self.check_key()
        try:
            answer = push_batch(self.key, batch, relay, known=self.known, queued=queued)
        except Refused as e:   # refused for what it is (a writer point off the log)
            raise Closed(4400, f"push frame: {e.message}") from None
        except Damaged as e:
            self.damaged("push", e)
        if "diverged" in answer:
            self.diverged(answer["diverged"])
        if "chain" in answer:
            self.known = (answer["head"], bytes.fromhex(answer["chain"]))
        self.send({"t": "result", "id": msg.get("id"), **answer})

    def run(self, hub):
        cursor, exclude, self.known = self.recv_hello(hub)
        cursor = self.send_new(cursor, exclude, catchup=True)
        self.send({"t": "live", "cursor": cursor, **({"snapshot_wanted": True}
                                                     if wanted(self.key.team) else {})})
        hub.join(self.key.team, self)
        try:
            last_look = last_key = time.monotonic()
            while self.ws.connected:
                if hub.stopping:
                    raise Closed(1001, "the server is stopping")
                while (data := self._take()) is not None:
                    self.handle(self.open(data))
                now = time.monotonic()
                if self.dirty.is_set() or now - last_look >= CHECK_INTERVAL:
                    self.dirty.clear()
                    cursor = self.send_new(cursor, exclude)
                    last_look = now
                if now - last_key >= KEY_CHECK_INTERVAL:
                    self.check_key()
                    last_key = now
                self.ws.event.wait(KEY_CHECK_INTERVAL)
                self.ws.event.clear()
        finally:
            hub.leave(self.key.team, self)


def _limit_send_time(ws):
    """Make a send to a client that stopped reading fail instead of blocking forever."""
    sock = getattr(ws, "sock", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        except OSError:
            pass


def admit():
    """Before the upgrade: use the token, and make sure there is room for the
    session (refused with 503 if not, so a watcher backs off and REST keeps its
    threads). The upgraded socket reads without a timeout: the session pings."""
    from .api import error
    store = current_app.extensions["sk_store"]
    hub = current_app.extensions["sk_hub"]
    token = request.args.get("token", "")
    key = store.consume_ws_token(wire.token_hash(token)) if token else "missing token"
    if isinstance(key, str):
        ops.auth_failure("ws_token")
    if not isinstance(key, str):
        full = hub.admit(key.device)
        if full:
            resp = error(503, "busy", full)
            resp.headers["Retry-After"] = "10"
            return resp
        g.sk_ws = (key, wire.token_hash(token))
    else:
        g.sk_ws = key
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        from .worker import read_within
        sock.settimeout(None)
        read_within(sock, None)   # the session pings: it reads for as long as it lives
    return None


def session(ws):
    store = current_app.extensions["sk_store"]
    hub = current_app.extensions["sk_hub"]
    if isinstance(g.sk_ws, str):
        ws.close(4401, f"refused: {g.sk_ws}")
        return
    key, sid = g.sk_ws
    _limit_send_time(ws)
    try:
        Session(ws, store, key, sid).run(hub)
    except Closed as e:
        if ws.connected:
            ws.close(e.code, e.message)
        _hang_up(ws)
    except OSError:
        pass  # the client went away or stopped reading
    except Exception as e:   # never an HTTP 500 into an upgraded socket
        current_app.logger.error("websocket session of '%s': %s: %s", key.device,
                                 type(e).__name__, str(e)[:200])
        if ws.connected:
            ws.close(1011, "internal error")
        _hang_up(ws)
    finally:
        hub.release(key.device)


def _hang_up(ws):
    """After our close frame, end the TCP connection too, so neither the reader
    thread nor gunicorn waits on a client that keeps it open."""
    sock = getattr(ws, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _DaemonThread(threading.Thread):
    """simple-websocket's reader thread; a daemon, so a stopping server never
    waits for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


def init_app(app):
    from flask_sock import Sock
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"ping_interval": PING_INTERVAL,
                                                  "max_message_size": wire.MAX_BODY,
                                                  "thread_class": _DaemonThread})
    hub = Hub(app.config.get("WS_SESSIONS", 24), app.config.get("WS_PER_DEVICE", 4))
    app.extensions["sk_hub"] = hub
    app.extensions["sk_notify"] = hub.notify
    app.extensions["sk_store"].listen(hub.notify)  # events stored by other servers
    bp = Blueprint("ws", __name__)
    bp.before_request(admit)
    Sock().route(wire.WS_PATH, bp=bp)(session)
    app.register_blueprint(bp)
