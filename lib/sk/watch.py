"""`sk sync watch`: real-time sync over a WebSocket, falling back to the queue.

One thread owns the SQLite connection and is the socket's only writer; a reader
thread only hands frames over through a queue. Local events are noticed without
asking the server: PRAGMA data_version on a second connection changes whenever
another process (sk-stamp, or anything that writes the file) commits.

The hello shows the server the last point of its log this device saw; a server
restored from an older copy answers "diverged", and the watcher queues every
event it holds to push again and reconnects (as sk sync heals it).
"""

import json
import os
import queue
import random
import signal
import sqlite3
import threading
import time

from . import wire
from .crypto import C2S, S2C, CryptoError
from .errors import AuthError, IntegrityError, SkError, Unreachable
from .keyring import Keyring
from .protocol import (NeedKey, NodeTaken, Rekey, ServerRestored, TeamChanged, accept_page,
                       batches, check_answer, known_out, push_body, settle_push)
from .store import open_store, utc_now
from .sync import open_client

PING_INTERVAL = 20.0
DEAD_AFTER = 2 * PING_INTERVAL + 10    # no frame or pong for this long: reconnect
LOCAL_POLL = 0.005                     # seconds between looks at the local file
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
# seconds between looks for members lacking the team key (SK_WATCH_SHARE_INTERVAL)
SHARE_INTERVAL = float(os.environ.get("SK_WATCH_SHARE_INTERVAL") or 30)


class Dropped(Exception):
    """The connection ended; reconnect."""


class Watch:
    def __init__(self, cfg, log=None, resolve_each=True, store=None, on_state=None):
        """log(line) for every line to say; on_state(state, detail) for every change
        of state (sk sync watch --json)."""
        self.cfg = cfg
        self.log = log or (lambda line: None)
        self.on_state = on_state
        self.stop = threading.Event()
        self.resolve_each = resolve_each
        self.store = store
        self.state = None
        self.cursor = 0

    # -- bookkeeping ---------------------------------------------------------
    def set_state(self, state, detail=""):
        if state != self.state:
            self.log(f"{state}" + (f": {detail}" if detail else ""))
            if self.on_state:
                self.on_state(state, detail)
        self.state = state
        self.store.set_meta(watch=json.dumps({"pid": os.getpid(), "state": state,
                                              "since": utc_now(), "detail": detail}))

    # -- the loop ------------------------------------------------------------
    def run(self):
        """Watch until stopped; returns an exit code (4 when the key is refused)."""
        import gc
        gc.enable()   # it runs for days (a one-shot command runs without it: cmd._common)
        if self.store is None:
            self.store = open_store(self.cfg)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stop.set())
        backoff = BACKOFF_MIN
        code = 0
        try:
            while not self.stop.is_set():
                self.set_state("connecting", self.cfg.server)
                started = time.monotonic()
                try:
                    self.session()
                except (AuthError, NodeTaken) as e:   # said by the server, sealed: stop
                    self.set_state("stopped", f"{'key refused: ' if isinstance(e, AuthError) else ''}{e}")
                    self.store.record_outcome(False, f"watch: {_why(e)}")
                    code = e.exit_code
                    break
                except (SkError, Dropped, OSError) as e:
                    if self.stop.is_set():
                        break
                    if time.monotonic() - started > 30:
                        backoff = BACKOFF_MIN
                    wait = backoff * (0.5 + random.random())
                    self.store.record_outcome(False, f"watch: {_why(e)}")
                    self.set_state("offline", f"{_why(e)}; events stay queued; retrying in {wait:.1f} s")
                    self.stop.wait(wait)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if self.state != "stopped":
                self.set_state("stopped")
        return code

    def session(self):
        import websocket
        client = open_client(self.cfg)
        self.ring = Keyring(self.store, self.cfg.api_key)
        self.ring.ensure(client)   # the team key, and shares it with members who lack it
        self.client = client
        answer = client.call("ws-token", {})
        token = answer.get("token")
        if not isinstance(token, str):
            raise IntegrityError("server's ws-token answer has no token")
        try:
            check_answer(self.store, {"team": answer.get("team")})
        except TeamChanged as e:
            self.log(f"this device's key now belongs to team '{e.team}': reading"
                     " its log from the start")
        url = self.cfg.server.replace("http", "ws", 1) + wire.WS_PATH + "?token=" + token
        try:
            ws = websocket.create_connection(url, timeout=10, enable_multithread=True)
        except websocket.WebSocketException as e:
            raise Unreachable(f"websocket handshake failed: {e}") from None
        ws.settimeout(None)
        conn = _Conn(ws, client.master, client.key_id, wire.token_hash(token))
        try:
            self._serve(conn)
        finally:
            conn.close()
            client.close()

    def _serve(self, conn):
        store = self.store
        node, upto = store.own_events()
        self.cursor, self.chain = store.cursor(), store.cursor_chain()
        conn.send({"t": "hello", "cursor": self.cursor, "skip": {"node_id": node, "upto": upto},
                   "known": known_out(store), "queued": store.counts(totals=False)["queued"]})
        watcher = sqlite3.connect(store.path, timeout=60)
        last_version = None
        last_share = time.monotonic()
        in_flight = None
        next_id = 0
        live = False
        claims = set()   # the "duplicate" claims unsettled at the last look
        try:
            while not self.stop.is_set():
                msg = conn.next(LOCAL_POLL)
                while msg is not None:
                    t = msg.get("t")
                    if t == "events":
                        self._apply(msg)
                    elif t == "live":
                        live = True
                        self._asked(msg)
                        store.record_outcome(True)
                        self.set_state("connected", f"{self.cfg.server}, caught up at {msg.get('cursor')}")
                    elif t == "damaged":   # the server cannot read what it stored
                        raise IntegrityError(str(msg.get("message"))[:500])
                    elif t == "diverged":  # restored server: give it back what it lost
                        self._diverged(msg)
                        return
                    elif t == "result":
                        if in_flight is None or msg.get("id") != in_flight[0]:
                            raise IntegrityError("push result for a batch that was not sent")
                        self._results(in_flight[1], msg)
                        in_flight = None
                        last_version = None  # look at the queue again
                    else:
                        raise IntegrityError(f"unknown frame type {str(t)[:20]!r}")
                    msg = conn.next(0)
                if live and in_flight is None:
                    version = watcher.execute("PRAGMA data_version").fetchone()[0]
                    if version != last_version:
                        last_version = version
                        batch = next(batches(store.queued(wire.MAX_BATCH)), None)
                        if batch:   # cut by count and bytes, and sealed, as a REST push is
                            next_id += 1
                            body, attachments = push_body(batch, self.ring, known_out(store),
                                                          store.counts(totals=False)["queued"])
                            conn.send({"t": "push", "id": next_id, **body}, attachments)
                            in_flight = (next_id, batch)
                conn.keepalive()
                if time.monotonic() - last_share >= SHARE_INTERVAL:   # a new member's grant
                    last_share = time.monotonic()
                    self.ring.ensure(self.client)
                    if live and in_flight is None:
                        claims = self._claims(claims)
                        last_version = None   # what it queued again goes out now
        finally:
            watcher.close()

    def _claims(self, before):
        """Settle the server's "duplicate" claims that were already unsettled at the
        last look (an interval ago), once this device has read the log up to the
        server's head (the live stream may lag behind a burst), as sk sync does
        (sync.confirm_claims): a claim the log does not bear out is logged, and its
        event queued again. Returns the claims unsettled now."""
        from .sync import confirm_claims
        old = before & set(self.store.claims())
        head = self.client.hello().get("head") if old else None
        if old and type(head) is int and self.store.cursor() >= head:   # caught up
            try:
                confirm_claims(self.store, self.client, self.ring, only=old)
            except IntegrityError as e:
                self.store.record_outcome(False, f"watch: {_why(e)}")
                self.log(f"{e}")
        return set(self.store.claims())

    def _apply(self, msg):
        from .resolve import Folder
        fold = Folder(self.store) if self.resolve_each else None   # folded as stored
        try:
            got = accept_page(self.store, msg, self.cursor, self.ring, True, self.chain,
                              lambda why: self.log(why), fold=fold)
        except NeedKey as e:   # a new epoch began: its grant is on the server by now
            self.ring.need(self.client, e.epoch, e.where)
            got = accept_page(self.store, msg, self.cursor, self.ring, True, self.chain,
                              lambda why: self.log(why), fold=fold)
        self.cursor, self.chain = got.next, got.chain
        if got.new:
            self._resolve()
            self.log(f"received {got.new} event{'s' if got.new != 1 else ''}")

    def _diverged(self, msg):
        """The session found the server's log is not the one this device saw: queue
        what this device holds to push again (a new team's log: start it afresh)."""
        try:
            check_answer(self.store, msg)
        except ServerRestored as d:
            from .protocol import Healed
            self.log(Healed(d.reason, self.store.heal(), None, None).describe())
        except TeamChanged:
            pass

    def _asked(self, msg):
        """The server asked for a snapshot: build it (if this device's state is a
        point of the log right now) and give it, over REST."""
        if msg.get("snapshot_wanted") is True and self.resolve_each:
            from .sync import offer_snapshot
            self.client.asked.add("snapshot")
            done = {}
            offer_snapshot(self.store, self.client, self.ring, done)
            if done.get("snapshot_offered"):
                self.log(f"gave the server a snapshot at seq {done['snapshot_offered']}")
            elif done.get("snapshot_error"):
                self.log(f"snapshot not given: {done['snapshot_error']}")

    def _resolve(self):
        if self.resolve_each:
            from .resolve import resolve
            resolve(self.store, self.cfg.path_map or None)

    def _results(self, batch, msg):
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        try:
            settle_push(self.store, batch, msg, counts)
        except Rekey:   # a device was revoked or rotated: the next epoch, then on
            self.ring.ensure(self.client)
            return
        self._resolve()  # this device's own events show in its state too
        self._asked(msg)
        sent, rejected = counts["accepted"] + counts["duplicate"], counts["rejected"]
        self.log(f"pushed {sent} event{'s' if sent != 1 else ''}"
                 + (f", {rejected} rejected (see sk-log --rejected)" if rejected else ""))


def _why(exc):
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class _Conn:
    """A sealed-frame WebSocket connection: main thread writes, a reader thread reads."""

    def __init__(self, ws, master, key_id, sid):
        self.ws, self.master, self.key_id, self.sid = ws, master, key_id, sid
        self.n_out = self.n_in = 0
        self.inbox = queue.Queue()
        self.last_rx = self.last_ping = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        import websocket
        from websocket import ABNF
        try:
            while True:
                opcode, frame = self.ws.recv_data_frame(control_frame=True)
                self.last_rx = time.monotonic()
                if opcode == ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else 1000
                    self.inbox.put(("closed", code, frame.data[2:].decode("utf-8", "replace")))
                    return
                if opcode in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT):
                    self.inbox.put(("frame", frame.data))
        except (websocket.WebSocketException, OSError) as e:
            self.inbox.put(("error", e))

    def send(self, obj, attachments=()):
        """Seal and send a frame (with its attachments), numbered."""
        import websocket
        self.n_out += 1
        blob = wire.seal_frame(self.master, self.key_id, C2S, self.sid, {**obj, "n": self.n_out},
                               attachments)
        try:
            self.ws.send_binary(blob)
        except (websocket.WebSocketException, OSError) as e:
            raise Dropped(f"connection lost while sending: {e}") from None

    def next(self, timeout):
        """The next opened frame, or None after timeout."""
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return None
        if item[0] == "error":
            raise Dropped(f"connection lost: {_why(item[1])}")
        if item[0] == "closed":   # a close code is not sealed: it proves nothing, so the
            _, code, reason = item  # watcher reconnects, and REST says (sealed) if the key is gone
            raise Dropped(f"server closed the connection ({code}{': ' + reason if reason else ''})")
        try:
            obj = wire.open_frame(self.master, self.key_id, S2C, self.sid, item[1])
        except CryptoError:
            raise IntegrityError("a frame from the server failed authentication") from None
        except wire.WireError as e:
            raise IntegrityError(f"malformed frame from the server: {e}") from None
        self.n_in += 1
        if obj.get("n") != self.n_in:
            raise IntegrityError("frame from the server out of order or replayed")
        return obj

    def keepalive(self):
        import websocket
        now = time.monotonic()
        if now - self.last_rx > DEAD_AFTER:
            raise Dropped(f"no answer from the server for {now - self.last_rx:.0f} s")
        if now - self.last_ping >= PING_INTERVAL:
            self.last_ping = now
            try:
                self.ws.ping()
            except (websocket.WebSocketException, OSError) as e:
                raise Dropped(f"connection lost: {e}") from None

    def close(self):
        try:
            self.ws.close(timeout=1)
        except Exception:  # noqa: BLE001 - closing a socket that may be dead already
            pass
