"""The WebSocket endpoint /api/ws at the protocol level: a real `sk server` process
and a real WebSocket client (websocket-client), frames sealed with sk.wire.

Every refusal test also shows that the refused attempt stored nothing and that
the server still serves a correct session afterwards."""

import secrets
import struct
import time
import uuid

import pytest
import websocket
from websocket import ABNF

from conftest import open_page, push_request, query, results, fake_grant
from sk import crypto, wire
from sk.client import Client
from sk.crypto import C2S, S2C
from sk.errors import AuthError

TIMEOUT = 10  # seconds: every socket operation is bounded by this


def new_event(tag, i=0):
    return {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
            "aggregate_type": "feature", "aggregate_id": f"{tag}-{i}", "lamport_clock": 1 + i,
            "node_id": f"proto-{tag}", "payload": {"tag": tag, "i": i},
            "timestamp": "2026-01-31T12:00:00Z"}


def push_frame(team, events, id=1, t="push"):
    """(frame, attachments) of a push of `events`, sealed under the test's team key
    as a member would seal them (the server never reads them)."""
    body, attachments = push_request(team, events)
    return {"t": t, "id": id, **body}, attachments


def server_events(server, team):
    """The event ids the server stored for `team`, in sequence order."""
    return [r[0] for r in query(server.db, "SELECT event_id FROM events WHERE team = ?"
                                              " ORDER BY seq", (team,))]


class Session:
    """A client-side sealed session over one WebSocket connection."""

    def __init__(self, server, key, token, team):
        self.team = team
        self.client = Client(server.url, key)
        self.master, self.key_id = self.client.master, self.client.key_id
        self.sid = wire.token_hash(token)
        self.ws = websocket.create_connection(
            server.url.replace("http", "ws", 1) + wire.WS_PATH + "?token=" + token,
            timeout=TIMEOUT)
        self.n_out = self.n_in = 0

    def seal(self, obj, n=None, master=None, sid=None, attachments=()):
        if n is None:
            self.n_out += 1
            n = self.n_out
        obj = dict(obj, n=n)
        return wire.seal_frame(master or self.master, self.key_id, C2S, sid or self.sid, obj,
                               attachments)

    def send(self, obj, attachments=(), **kw):
        self.ws.send_binary(self.seal(obj, attachments=attachments, **kw))

    def send_push(self, events, id=None, **kw):
        """Send a push frame of `events` (a sealed batch, as a member seals it)."""
        frame, attachments = push_frame(self.team, events, self.n_out + 1 if id is None else id)
        self.send(frame, attachments, **kw)

    def events(self, msg):
        """The events of an events frame, opened as a member of the team opens them."""
        return open_page(msg, self.team)

    def recv(self):
        """The next opened frame from the server; ('closed', code, reason) on close."""
        for _ in range(100):
            frame = self.ws.recv_frame()  # raw: no automatic close reply
            op = frame.opcode
            if op == ABNF.OPCODE_CLOSE:
                code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                return ("closed", code, frame.data[2:].decode("utf-8", "replace"))
            if op in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT):
                obj = wire.open_frame(self.master, self.key_id, S2C, self.sid, frame.data)
                self.n_in += 1
                assert obj.get("n") == self.n_in, f"server frame counter {obj.get('n')} != {self.n_in}"
                return obj
        raise AssertionError("no data or close frame in 100 control frames")

    def hello(self, cursor=0):
        """Send the hello; return (events received in catch-up, live frame)."""
        self.send({"t": "hello", "cursor": cursor})
        got = []
        for _ in range(50):
            msg = self.recv()
            assert isinstance(msg, dict), f"session closed during catch-up: {msg}"
            if msg["t"] == "live":
                return got, msg
            assert msg["t"] == "events" and msg["catchup"] is True, msg
            got.extend(self.events(msg))
        raise AssertionError("no 'live' frame after 50 catch-up frames")

    def push(self, events):
        self.send_push(events)
        for _ in range(20):
            msg = self.recv()
            assert isinstance(msg, dict), f"session closed instead of answering a push: {msg}"
            if msg["t"] == "result":
                return results(msg, events)
        raise AssertionError("no push result")

    def expect_closed(self, codes, allow_reset=False):
        """The server closes this session with one of `codes`, within TIMEOUT.
        allow_reset: a client that kept sending after the server's close may see the
        connection reset before it reads the close frame; that also counts."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                msg = self.recv()
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as e:
                if allow_reset:
                    return ("reset", None, str(e))
                raise AssertionError(f"connection dropped without a close frame: {e}") from None
            if isinstance(msg, tuple):
                self.ws.shutdown()  # like a real client: drop the TCP connection after the close
                assert msg[1] in codes, f"closed with {msg[1]} ({msg[2]}), wanted one of {codes}"
                return msg
        raise AssertionError(f"server did not close the session within {TIMEOUT} s")

    def close(self):
        try:
            self.ws.close(timeout=1) if self.ws.connected else None
            self.ws.shutdown()
        except Exception:  # noqa: BLE001 - may already be closed
            pass


class Device:
    def __init__(self, server, name, team):
        self.server, self.name, self.team = server, name, team
        self.key = server.register(name, team)
        self.client = Client(server.url, self.key)
        self.sessions = []

    @property
    def identity(self):
        return crypto.identity_public(crypto.identity_secret(self.key)).hex()

    def begin_epoch(self):
        """Begin the team's first key epoch, as a team's first member does before it
        pushes, granting it to itself (the key itself is the test's, conftest.team_key:
        the server never sees one, only that a grant is there)."""
        state = self.client.call("keys", {"identity": self.identity, "epoch": 1,
                                          "grants": [self._grant(self)]})
        assert "refused" not in state and state["epoch"] == 1 and not state["rekey"], state

    def share(self, other):
        """Grant the team key to another device, as a member's next sync does."""
        other.client.call("keys", {"identity": other.identity})
        state = self.client.call("keys", {"grants": [self._grant(other)]})
        assert "refused" not in state, state

    def _grant(self, to):
        return {"epoch": 1, "device": to.name, "recipient": to.identity,
                "sealed": fake_grant(to.name).hex()}

    def token(self):
        tok = self.client.call("ws-token", {})["token"]
        assert isinstance(tok, str) and len(tok) >= 32
        return tok

    def connect(self, token=None):
        s = Session(self.server, self.key, token if token is not None else self.token(),
                    self.team)
        self.sessions.append(s)
        return s

    def refused(self, query):
        """Open /api/ws with a raw query string; return the close (code, reason)."""
        ws = websocket.create_connection(
            self.server.url.replace("http", "ws", 1) + wire.WS_PATH + query, timeout=TIMEOUT)
        try:
            for _ in range(100):
                frame = ws.recv_frame()
                op = frame.opcode
                if op == ABNF.OPCODE_CLOSE:
                    ws.shutdown()
                    return int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()
                assert op not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT), \
                    "a refused connection must not get data frames"
            raise AssertionError("no close frame")
        finally:
            ws.shutdown()

    def close(self):
        for s in self.sessions:
            s.close()
        self.client.close()


@pytest.fixture
def server(module_server):
    """One real `sk server` per backend for this module (each test uses its own
    devices and teams)."""
    return module_server


@pytest.fixture
def devices(server):
    """A factory: devices(name, team) -> a registered Device; names and teams are
    made unique to the test, so tests sharing the server cannot see each other."""
    made, tag, first = [], uuid.uuid4().hex[:8], {}

    def make(name, team="proto"):
        d = Device(server, f"{name}-{tag}", f"{team}-{tag}")
        made.append(d)
        if d.team not in first:   # the team's first device begins its key epoch
            d.begin_epoch()
            first[d.team] = d
        else:                     # and shares it with each device after it
            first[d.team].share(d)
        return d
    yield make
    for d in made:
        d.close()


def assert_server_serves(dev, expect_ids):
    """A fresh, correct session of `dev` works and its catch-up is exactly `expect_ids`."""
    s = dev.connect()
    got, live = s.hello(0)
    assert [e["event_id"] for e in got] == list(expect_ids)
    assert live["cursor"] == len(expect_ids)
    s.close()


# -- the positive control ----------------------------------------------------------
def test_valid_token_opens_session_push_is_stored_and_sent_to_the_team(server, devices):
    a, b = devices("a"), devices("b")
    sa = a.connect()
    got, live = sa.hello(0)
    assert got == [] and live["cursor"] == 0
    sb = b.connect()
    assert sb.hello(0) == ([], {"t": "live", "cursor": 0, "n": 1})

    evs = [new_event("ok", i) for i in range(3)]
    results = sa.push(evs)
    assert [(r["event_id"], r["status"]) for r in results] == [(e["event_id"], "accepted") for e in evs]
    assert server_events(server, a.team) == [e["event_id"] for e in evs]
    # the same events again over the session: duplicates, not stored twice
    assert {r["status"] for r in sa.push(evs)} == {"duplicate"}
    assert server_events(server, a.team) == [e["event_id"] for e in evs]

    # b's live session gets them without asking, sealed for b's session
    msg = sb.recv()
    assert msg["t"] == "events" and msg["catchup"] is False
    got = sb.events(msg)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in evs]
    assert got[0]["payload"] == {"tag": "ok", "i": 0} and msg["next"] == 3


# -- tokens -----------------------------------------------------------------------
def test_token_is_single_use(server, devices):
    a = devices("a")
    tok = a.token()
    first = a.connect(tok)
    assert first.hello(0)[1]["t"] == "live"
    # reused while the first session is open, then after it closed: refused with 4401
    code, reason = a.refused("?token=" + tok)
    assert code == 4401 and "used" in reason
    first.push([new_event("single")])
    first.close()
    code, reason = a.refused("?token=" + tok)
    assert code == 4401 and "used" in reason
    # a token only opens a session: an unused fresh token still works
    assert_server_serves(a, server_events(server, a.team))
    assert len(server_events(server, a.team)) == 1


def test_reused_token_session_cannot_speak(server, devices):
    """Even a client that ignores the close and sends a sealed push stores nothing."""
    a = devices("a")
    tok = a.token()
    s1 = a.connect(tok)
    s1.hello(0)
    s2 = a.connect(tok)
    try:
        s2.send({"t": "hello", "cursor": 0})
        s2.send_push([new_event("reuse")], id=1)
    except (websocket.WebSocketException, OSError):
        pass  # the server may have gone already
    s2.expect_closed({4401}, allow_reset=True)
    assert server_events(server, a.team) == []
    # the first session is untouched by the attempt
    first = new_event("first")
    assert s1.push([first])[0]["status"] == "accepted"
    assert server_events(server, a.team) == [first["event_id"]]


def test_expired_token_refused(server, devices):
    a = devices("a")
    store = server.store()
    try:
        past, fresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now_ms = int(time.time() * 1000)
        store.add_ws_token(wire.token_hash(past), a.client.key_id, now_ms - 1000)
        # control: a row inserted the same way, but not expired, opens a session
        store.add_ws_token(wire.token_hash(fresh), a.client.key_id, now_ms + 60_000)
    finally:
        store.close()
    code, reason = a.refused("?token=" + past)
    assert code == 4401 and "expired" in reason
    s = a.connect(fresh)
    assert s.hello(0)[1]["t"] == "live"
    s.close()
    # a server-issued token expires 5 minutes after issue
    tok = a.token()
    expires = query(server.db, "SELECT expires FROM ws_tokens WHERE token_hash = ?",
                    (wire.token_hash(tok),))[0][0]
    assert abs(expires - (time.time() * 1000 + wire.WS_TOKEN_TTL_MS)) < 30_000


@pytest.mark.parametrize("query", [
    "", "?token=", "?token=garbage", "?tok=x", "?token=" + "A" * 4000,
    "?token=" + secrets.token_urlsafe(32),   # well-formed but never issued
], ids=["none", "empty", "garbage", "wrong-param", "huge", "never-issued"])
def test_missing_or_garbage_token_refused(server, devices, query):
    a = devices("a")
    code, reason = a.refused(query)
    assert code == 4401 and reason.startswith("refused")
    assert server_events(server, a.team) == []
    assert_server_serves(a, [])


def test_token_of_revoked_device_refused(server, devices):
    a = devices("a")
    tok = a.token()
    server.admin("sk-register", "--revoke", a.name)
    code, _ = a.refused("?token=" + tok)
    assert code == 4401
    with pytest.raises(AuthError):
        a.token()


def test_revoked_during_session_push_refused(server, devices):
    a = devices("a")
    s = a.connect()
    s.hello(0)
    server.admin("sk-register", "--revoke", a.name)
    s.send_push([new_event("revoked")], id=1)
    s.expect_closed({4401})
    assert server_events(server, a.team) == []


# -- frames -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["hello-other-device-key", "hello-random-key",
                                  "push-other-device-key", "push-random-key",
                                  "push-other-session", "push-tampered"])
def test_frame_with_wrong_key_closes_session_nothing_stored(server, devices, case):
    a, other = devices("a"), devices("other")
    wrong = {"other-device-key": other.client.master,
             "random-key": crypto.derive_master(f"sk1.{'0' * 16}.{'A' * 43}")}
    s = a.connect()
    ev = new_event("wrongkey")
    if case.startswith("hello-"):
        s.send({"t": "hello", "cursor": 0}, master=wrong[case[len("hello-"):]])
    else:
        s.hello(0)
        frame, attachments = push_frame(a.team, [ev])
        if case == "push-other-session":
            s.send(frame, attachments, sid=wire.token_hash(a.token()))
        elif case == "push-tampered":
            blob = bytearray(s.seal(frame, attachments=attachments))
            blob[-20] ^= 0x01
            s.ws.send_binary(bytes(blob))
        else:
            s.send(frame, attachments, master=wrong[case[len("push-"):]])
    code = s.expect_closed({4400, 4401})[1]
    assert code == 4401, f"a frame failing authentication should close with 4401, got {code}"
    assert server_events(server, a.team) == []
    assert_server_serves(a, [])


@pytest.mark.parametrize("case", ["skipped", "repeated", "replayed-blob", "zero", "missing"])
def test_frame_out_of_order_closes_session_nothing_stored(server, devices, case):
    a = devices("a")
    s = a.connect()
    s.hello(0)                                  # n=1
    stored = []
    ev = new_event("order")
    frame, attachments = push_frame(a.team, [ev])
    if case == "skipped":
        s.send(frame, attachments, n=3)
    elif case == "repeated":
        s.send(frame, attachments, n=1)
    elif case == "zero":
        s.send(frame, attachments, n=0)
    elif case == "missing":
        s.ws.send_binary(wire.seal_frame(s.master, s.key_id, C2S, s.sid, frame, attachments))
    else:
        blob = s.seal(frame, attachments=attachments)   # n=2: accepted once
        s.ws.send_binary(blob)
        msg = s.recv()
        assert msg["t"] == "result" and msg["statuses"] == "a"
        stored = [ev["event_id"]]
        s.ws.send_binary(blob)                  # the same sealed frame again
        s.send_push([new_event("after-replay")], id=2, n=3)
    s.expect_closed({4400, 4401})
    assert server_events(server, a.team) == stored
    assert_server_serves(a, stored)


@pytest.mark.parametrize("case", ["text-frame", "push-before-hello", "bad-hello",
                                  "bad-hello-skip", "unknown-type", "not-gzip"])
def test_malformed_frames_close_session_nothing_stored(server, devices, case):
    a = devices("a")
    s = a.connect()
    if case == "text-frame":
        s.ws.send('{"t": "hello", "cursor": 0, "n": 1}')
    elif case == "push-before-hello":
        s.send_push([new_event("early")], id=1)
    elif case == "bad-hello":
        s.send({"t": "hello", "cursor": "0"})
    elif case == "bad-hello-skip":
        s.send({"t": "hello", "cursor": 0, "skip": {"node_id": 5, "upto": "x"}})
    elif case == "not-gzip":   # framed as a body is (no attachments), its JSON part not gzip
        key = crypto.direction_key(s.master, C2S)
        junk = b"not gzip at all"
        s.ws.send_binary(crypto.seal(key, struct.pack(">II", 0, len(junk)) + junk,
                                     wire._frame_context(C2S, s.key_id, s.sid)))
    else:   # a well-formed push body under a frame type the server does not know
        s.hello(0)
        s.send(*push_frame(a.team, [new_event("unknown")], t="pull"))
    s.expect_closed({4400, 4401})
    assert server_events(server, a.team) == []
    assert_server_serves(a, [])


def test_session_is_scoped_to_the_team(server, devices):
    a, b, x = devices("a", "red"), devices("b", "red"), devices("x", "blue")
    sx = x.connect()
    assert sx.hello(0)[0] == []
    sa = a.connect()
    sa.hello(0)
    red = [new_event("red", i) for i in range(5)]
    assert {r["status"] for r in sa.push(red)} == {"accepted"}
    # the other team's device sees nothing: not in catch-up, not live
    sx.ws.settimeout(3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        sx.recv()
    sx.ws.settimeout(TIMEOUT)
    x2 = x.connect()
    assert x2.hello(0)[0] == []
    # while the same team's device gets all of them
    sb = b.connect()
    got, live = sb.hello(0)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in red] and live["cursor"] == 5
    # an event the blue device pushes stays in blue
    blue = new_event("blue")
    assert x2.push([blue])[0]["status"] == "accepted"
    assert server_events(server, x.team) == [blue["event_id"]]
    assert server_events(server, a.team) == [e["event_id"] for e in red]


# -- hardening: what a bad device or a big event must not do -------------------------
def test_one_device_cannot_hold_the_threads_rest_needs(server, devices):
    """Each session holds a server thread: a device gets at most 4, and REST keeps
    its threads however many sessions are open (0.3.0: 32 idle sessions of one
    device starved the REST API)."""
    a = devices("hog")
    held = [a.connect() for _ in range(4)]
    for s in held:
        assert s.hello(0)[1]["t"] == "live"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:   # refused before the upgrade
        a.connect()
    assert e.value.status_code == 503
    t0 = time.monotonic()
    assert a.client.hello()["device"] == a.name          # REST answers at once
    assert time.monotonic() - t0 < 2
    b = devices("other")
    assert b.connect().hello(0)[1]["t"] == "live"         # another device still gets one
    held[0].close()
    deadline = time.monotonic() + TIMEOUT
    while True:   # the server notices the session is gone, and the device may open one
        try:
            assert a.connect().hello(0)[1]["t"] == "live"
            break
        except websocket.WebSocketBadStatusException:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_revocation_closes_an_open_session_within_a_second(server, devices):
    """0.3.0 looked at the key every 20 s; revoking now closes the device's open
    sessions within a second, on every server (each looks at the store)."""
    from sk_server.devices import revoke
    a = devices("revoked-live")
    s = a.connect()
    s.hello(0)
    store = server.store()
    try:
        revoke(store, a.name)
        t0 = time.monotonic()
        s.expect_closed((4401,))
        assert time.monotonic() - t0 < 1.0
    finally:
        store.close()


def test_a_frame_that_inflates_to_a_bomb_is_refused_cheaply(server, devices):
    """A sealed push frame of {} objects: refused by shape before it is parsed."""
    a = devices("bomb")
    s = a.connect()
    s.hello(0)
    text = '{"t":"push","id":1,"n":' + str(s.n_out + 1) + ',"events":[' + ",".join(["{}"] * 400_000) + "]}"
    s.n_out += 1
    key = crypto.direction_key(s.master, C2S)
    blob = crypto.seal(key, wire.pack(text), wire._frame_context(C2S, s.key_id, s.sid))
    s.ws.send_binary(blob)
    _, code, reason = s.expect_closed((4400, 1009))
    assert code == 1009 or "JSON objects and arrays" in reason, reason   # refused by shape
    assert_server_serves(a, [])
