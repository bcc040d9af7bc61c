"""The server's REST API through Flask's test client: sealed wire format, push/pull
semantics, team isolation, and refusal of every kind of bad, tampered, stale or
replayed request (always a 4xx JSON error, never a 500, never a change)."""

import base64
import itertools
import json
import os
import sys
import time
import uuid
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sk import PROTOCOL_VERSION, crypto, wire
from sk.client import Client
from sk_server import create_app
from sk_server.devices import register, revoke, rotate

from conftest import is_pg, query

HYPO = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers -------------------------------------------------------------------

def gz(raw):
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def jbytes(obj):
    # ensure_ascii: lone surrogates travel as \udXXX escapes, as any JSON client may send
    return json.dumps(obj).encode("ascii")


_clock = itertools.count(1)   # a node stamps each clock value once


def make_event(**kw):
    ev = {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
          "aggregate_type": "feature", "aggregate_id": "f-1", "lamport_clock": next(_clock),
          "node_id": "node-a", "payload": {"title": "x"}, "timestamp": "2026-01-31T12:00:00Z"}
    ev.update(kw)
    return ev


class Device:
    """A device talking to the app. Each node id belongs to one device: the events
    make_event() makes carry node-a, and a device other than dev-a pushes them
    under its own node id (rewritten in place, so a test's copy agrees)."""

    def __init__(self, client, name, team, api_key):
        self.client, self.name, self.team, self.api_key = client, name, team, api_key
        self.node = "node-a" if name == "dev-a" else f"node-{name}"
        self.key_id, self.secret = crypto.parse_api_key(api_key)
        self.master = crypto.derive_master(api_key)

    def headers(self, **over):
        h = {wire.PROTOCOL_HEADER: str(PROTOCOL_VERSION), wire.KEY_HEADER: self.key_id,
             "Content-Type": wire.CONTENT_TYPE}
        h.update(over)
        return {k: v for k, v in h.items() if v is not None}

    def seal_plain(self, endpoint, plain, ts=None, nonce=None, key_id=None):
        """Seal already-compressed bytes `plain` for `endpoint`; return (blob, nonce)."""
        key = crypto.direction_key(self.master, crypto.C2S)
        ctx = wire._context(crypto.C2S, key_id or self.key_id, endpoint)
        blob = crypto.seal(key, plain, ctx, timestamp_ms=ts, nonce=nonce)
        return blob, crypto.peek(blob)[1]

    def seal(self, endpoint, obj, ts=None):
        if endpoint == "push" and isinstance(obj, dict) and isinstance(obj.get("events"), list):
            for ev in obj["events"]:
                if isinstance(ev, dict) and ev.get("node_id") == "node-a":
                    ev["node_id"] = self.node
        return self.seal_plain(endpoint, gz(jbytes(obj)), ts=ts)

    def send(self, endpoint, blob, headers=None, opener=None):
        """POST blob; a sealed answer (200 or an error) is opened into r.sk_answer,
        with the key of `opener` (default this device: the one the headers name)."""
        r = self.client.post(f"/api/{endpoint}", data=blob,
                             headers=self.headers() if headers is None else headers)
        r.sk_answer = None
        if r.headers["Content-Type"].split(";")[0] == wire.CONTENT_TYPE:
            by = opener or self
            r.sk_answer = wire.open_response(by.master, by.key_id, endpoint,
                                             crypto.peek(blob)[1], r.data)
        return r

    def call(self, endpoint, obj):
        """Seal, send, and open the answer; (response, opened body or None)."""
        blob, nonce = self.seal(endpoint, obj)
        r = self.send(endpoint, blob)
        if r.status_code != 200:
            return r, None
        assert r.sk_answer is not None, r.headers["Content-Type"]
        return r, r.sk_answer

    def ok(self, endpoint, obj):
        r, body = self.call(endpoint, obj)
        assert r.status_code == 200, (r.status_code, r.data[:500])
        return body

    def push(self, events):
        return self.ok("push", {"events": events})["results"]

    def pull(self, after=0, limit=1000, skip=None):
        body = {"after": after, "limit": limit}
        if skip is not None:
            body["skip"] = {"node_id": skip[0], "upto": skip[1]}
        return self.ok("pull", body)

    def pull_all(self, after=0, limit=1000, skip=None):
        events, pages = [], 0
        while True:
            page = self.pull(after, limit, skip)
            pages += 1
            events += page["events"]
            assert page["next"] >= after
            after = page["next"]
            if not page["more"]:
                return events, after, pages
            assert pages < 10_000


def assert_refused(r, status=None, code=None, sealed=None):
    """A clear error: 4xx, {"error": {"code", "message"}}, never a 500; sealed for
    the device (opened by Device.send) once the request authenticated, plain JSON
    before. sealed=True/False says which it must be."""
    assert 400 <= r.status_code < 500, (r.status_code, r.data[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.data[:500])
    is_sealed = r.headers["Content-Type"].split(";")[0] == wire.CONTENT_TYPE
    if sealed is not None:
        assert is_sealed == sealed, r.headers["Content-Type"]
    if is_sealed:
        err = getattr(r, "sk_answer", None)
        assert err is not None, "a sealed error that no test device opened"
        err = err["error"]
    else:
        assert r.headers["Content-Type"].startswith("application/json"), r.headers["Content-Type"]
        err = r.get_json()["error"]
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture
def app(server_db):
    # the fuzzers fail authentication thousands of times from one address: the
    # slow-down has its own tests (test_server_secret.py)
    app = create_app({"DB": server_db, "TESTING": True, "AUTH_FAIL_LIMIT": 0})
    app.db = server_db
    yield app
    app.extensions["sk_store"].close()


@pytest.fixture
def store(app):
    return app.extensions["sk_store"]


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def new_device(client, store):
    def make(name="dev-a", team="team-a"):
        return Device(client, name, team, register(store, name, team))
    return make


@pytest.fixture
def dev(new_device):
    return new_device()


def count(store):
    return store.stats()["events"]


# -- basics --------------------------------------------------------------------

def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json() == {"ok": True, "protocol": PROTOCOL_VERSION}


def test_hello_is_sealed_and_binds_the_request_nonce(dev):
    blob, nonce = dev.seal("hello", {})
    r = dev.send("hello", blob)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == wire.CONTENT_TYPE
    body = wire.open_response(dev.master, dev.key_id, "hello", nonce, r.data)
    assert body["device"] == "dev-a" and body["team"] == "team-a"
    assert body["protocol"] == PROTOCOL_VERSION and body["head"] == 0
    assert abs(body["server_time"] - time.time() * 1000) < 60_000
    # the response cannot be opened for another request, endpoint, or direction
    with pytest.raises(crypto.CryptoError):
        wire.open_response(dev.master, dev.key_id, "hello", os.urandom(12), r.data)
    with pytest.raises(crypto.CryptoError):
        wire.open_response(dev.master, dev.key_id, "pull", nonce, r.data)
    with pytest.raises(crypto.CryptoError):
        wire.open_request(dev.master, dev.key_id, "hello", r.data)


def test_unknown_routes_and_methods_are_json_errors(client, dev):
    assert_refused(client.get("/api/push"), 405)
    assert_refused(client.post("/api/nope", data=b"x", headers=dev.headers()), 404)


# -- push ----------------------------------------------------------------------

def test_push_accepts_then_reports_duplicate(dev, store):
    ev = make_event()
    assert dev.push([ev]) == [{"event_id": ev["event_id"], "status": "accepted"}]
    assert count(store) == 1
    assert dev.push([ev]) == [{"event_id": ev["event_id"], "status": "duplicate"}]
    assert count(store) == 1
    page = dev.pull()
    assert len(page["events"]) == 1
    got = dict(page["events"][0])
    assert got.pop("seq") == 1
    assert got == ev


def test_one_bad_event_never_blocks_the_others(dev, store):
    good1, good2, good3 = make_event(), make_event(), make_event(aggregate_id="f-2")
    batch = [
        good1,
        {k: v for k, v in make_event().items() if k != "payload"},  # missing field
        make_event(lamport_clock=0),
        make_event(lamport_clock=2 ** 63),
        make_event(lamport_clock="7"),
        make_event(event_id="NOT-A-UUID"),
        make_event(event_id=str(uuid.uuid4()).upper()),
        good2,
        make_event(event_type="Bad Type"),
        make_event(aggregate_id=""),
        make_event(payload=[1, 2]),
        make_event(payload={"big": "x" * (256 * 1024 + 1)}),
        make_event(timestamp="yesterday"),
        "not an object",
        None,
        good3,
    ]
    results = dev.push(batch)
    assert len(results) == len(batch)
    statuses = [r["status"] for r in results]
    assert statuses == ["accepted"] + ["rejected"] * 6 + ["accepted"] + ["rejected"] * 7 + ["accepted"]
    for r in results:
        if r["status"] == "rejected":
            assert isinstance(r.get("reason"), str) and r["reason"]
    assert results[0]["event_id"] == good1["event_id"]
    assert results[7]["event_id"] == good2["event_id"]
    assert count(store) == 3
    ids = [e["event_id"] for e in dev.pull()["events"]]
    assert ids == [good1["event_id"], good2["event_id"], good3["event_id"]]


def test_event_id_reused_with_different_content_is_rejected(dev, store):
    ev = make_event(payload={"v": 1})
    assert dev.push([ev])[0]["status"] == "accepted"
    for change in ({"payload": {"v": 2}}, {"lamport_clock": 2}, {"node_id": "other"},
                   {"timestamp": "2026-02-01T00:00:00Z"}, {"aggregate_id": "f-9"},
                   {"event_type": "feature_deleted"}):
        res = dev.push([dict(ev, **change)])[0]
        assert res["status"] == "rejected", change
        assert res["event_id"] == ev["event_id"]
        assert res["reason"]
    assert count(store) == 1
    stored = dev.pull()["events"][0]
    assert stored["payload"] == {"v": 1} and stored["lamport_clock"] == ev["lamport_clock"]


def test_same_event_id_twice_in_one_batch(dev, store):
    ev = make_event()
    results = dev.push([ev, dict(ev), dict(ev, payload={"other": True})])
    assert [r["status"] for r in results] == ["accepted", "duplicate", "rejected"]
    assert count(store) == 1


def test_push_limit_is_1000_events(dev, store):
    results = dev.push([make_event() for _ in range(wire.MAX_BATCH)])
    assert len(results) == wire.MAX_BATCH
    assert {r["status"] for r in results} == {"accepted"}
    assert count(store) == wire.MAX_BATCH
    r, _ = dev.call("push", {"events": [make_event() for _ in range(wire.MAX_BATCH + 1)]})
    assert_refused(r, 413, "too_large")
    assert count(store) == wire.MAX_BATCH


@pytest.mark.parametrize("body", [{}, {"events": None}, {"events": {"a": 1}},
                                  {"events": "x"}, {"events": 3}])
def test_push_without_an_events_list_is_refused(dev, store, body):
    r, _ = dev.call("push", body)
    assert_refused(r, 400, "malformed")
    assert count(store) == 0


def test_push_empty_list(dev, store):
    assert dev.push([]) == []
    assert count(store) == 0


# -- pull ----------------------------------------------------------------------

def test_pull_pages_by_sequence_cursor(dev, store):
    sent = [make_event(lamport_clock=i + 1) for i in range(25)]
    for i in range(0, 25, 7):
        dev.push(sent[i:i + 7])
    p1 = dev.pull(0, 10)
    assert p1["more"] is True and len(p1["events"]) == 10
    assert [e["seq"] for e in p1["events"]] == list(range(1, 11))
    assert p1["next"] == 10
    events, cursor, pages = dev.pull_all(0, 10)
    assert pages == 3
    assert [e["seq"] for e in events] == list(range(1, 26))      # dense, in order
    assert [e["event_id"] for e in events] == [e["event_id"] for e in sent]
    assert cursor == 25 == store.head("team-a")
    # exactly `limit` left: no further page promised
    last = dev.pull(15, 10)
    assert len(last["events"]) == 10 and last["more"] is False and last["next"] == 25
    # at the head: nothing, cursor stays
    at_head = dev.pull(25, 10)
    assert at_head.pop("chain") == store.push("team-a", "dev-a", []).chain.hex()
    assert at_head == {"events": [], "next": 25, "more": False, "team": "team-a"}
    assert dev.ok("hello", {})["head"] == 25


def test_pull_defaults(dev):
    dev.push([make_event() for _ in range(3)])
    body = dev.ok("pull", {})
    assert len(body["events"]) == 3 and body["more"] is False and body["next"] == 3


def test_skip_leaves_out_own_events_but_cursor_reaches_head(new_device, store):
    a, b = new_device("a", "t"), new_device("b", "t")
    order, clock = [], 0
    for who, n in ((a, 5), (b, 3), (a, 2), (b, 1), (a, 4)):
        evs = []
        for _ in range(n):
            clock += 1
            evs.append(make_event(node_id=who.name, lamport_clock=clock))
        who.push(evs)
        order += [(who.name, e["event_id"], e["lamport_clock"]) for e in evs]
    head = store.head("t")
    assert head == 15
    for limit in (1, 2, 3, 1000):
        events, cursor, _ = a.pull_all(0, limit, skip=("a", clock))
        assert [e["event_id"] for e in events] == [i for w, i, _ in order if w == "b"]
        assert cursor == head, limit
    # the last events are all a's own: the cursor still moves past them
    page = a.pull(11, 1000, skip=("a", clock))
    assert page["events"] == [] and page["next"] == head and page["more"] is False
    # own events stamped above `upto` (lost by a restored log) do come back
    events, cursor, _ = a.pull_all(0, 4, skip=("a", 7))
    assert [e["event_id"] for e in events] == [i for w, i, lam in order if w == "b" or lam > 7]
    # without skip, everything
    events, cursor, _ = a.pull_all(0, 4)
    assert [e["event_id"] for e in events] == [i for _, i, _ in order] and cursor == head


@pytest.mark.parametrize("skip", [1, "a", [], {"node_id": "a"}, {"upto": 3},
                                  {"node_id": 1, "upto": 3}, {"node_id": "a", "upto": -1},
                                  {"node_id": "a", "upto": 2 ** 63}, {"node_id": "a", "upto": 1.5}])
def test_malformed_skip_is_refused(dev, skip):
    r = dev.send("pull", dev.seal("pull", {"after": 0, "skip": skip})[0])
    assert_refused(r, 400, "malformed", sealed=True)


@pytest.mark.parametrize("body", [
    {"after": -1}, {"after": "0"}, {"after": 1.5}, {"after": True}, {"after": None},
    {"limit": 0}, {"limit": wire.MAX_PAGE + 1}, {"limit": "10"}, {"limit": 2.0},
    {"limit": False}, {"limit": None}, {"after": [1]},
])
def test_pull_rejects_bad_cursor_or_limit(dev, body):
    r, _ = dev.call("pull", body)
    assert_refused(r, 400, "malformed")


@pytest.mark.parametrize("after", [2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30])
def test_pull_with_huge_cursor_is_not_a_500(dev, after):
    r, body = dev.call("pull", {"after": after})
    if r.status_code == 200:
        assert body["events"] == [] and body["more"] is False
    else:
        assert_refused(r, 400)


def test_team_isolation(new_device, store):
    a1, a2 = new_device("a1", "A"), new_device("a2", "A")
    b = new_device("b", "B")
    a_events = [make_event(payload={"secret": "team A only"}, node_id=n)
                for n in ["node-a1"] * 3 + ["node-a2"] * 3]
    a1.push(a_events[:3])
    b_events = [make_event() for _ in range(2)]
    b.push(b_events)
    a2.push(a_events[3:])
    got, cursor, _ = b.pull_all(0, 1)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in b_events]
    assert [e["seq"] for e in got] == [1, 2] and cursor == 2
    assert b.ok("hello", {})["head"] == 2
    # a cursor past B's head never reaches into A's sequence
    assert b.pull(2, 1000)["events"] == [] and b.pull(0, 5000, (b.node, 2 ** 62))["events"] == []
    got, cursor, _ = a1.pull_all(0, 2)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in a_events]
    assert [e["seq"] for e in got] == list(range(1, 7)) and cursor == 6
    # B pushing an event_id that exists only in A does not touch A's event
    res = b.push([dict(a_events[0], payload={"b": "overwrite"})])[0]
    assert res["status"] in ("accepted", "rejected")
    assert a2.pull(0, 1)["events"][0]["payload"] == {"secret": "team A only"}
    assert all(e["payload"] != {"secret": "team A only"} for e in b.pull_all()[0])


# -- keys and secrets ----------------------------------------------------------

class _RecordingTransport:
    """Stands in for sk.client.Transport: routes the client's POSTs into the test
    client and records every byte that would have crossed the wire."""

    def __init__(self, client):
        self.client, self.sent = client, []

    def post(self, path, headers, body, timeout, limit):
        self.sent.append((path, dict(headers), bytes(body)))
        r = self.client.post(path, data=body, headers=headers)
        self.sent.append(("response", dict(r.headers), r.data))
        return r.status_code, r.status, {k.lower(): v for k, v in r.headers.items()}, r.data

    def close(self):
        pass


def test_api_key_never_crosses_the_wire(client, dev, store):
    c = Client("http://sk.test", dev.api_key)
    c.transport = _RecordingTransport(client)
    assert c.hello()["device"] == "dev-a"
    ev = make_event()
    assert c.push([ev])["results"][0]["status"] == "accepted"
    assert c.pull(0, 10)["events"][0]["event_id"] == ev["event_id"]
    secret_text = dev.api_key.split(".")[2]
    needles = [dev.api_key.encode(), secret_text.encode(), dev.secret, dev.master,
               base64.b64encode(dev.secret), dev.secret.hex().encode()]
    assert len(c.transport.sent) == 6
    for url, headers, body in c.transport.sent:
        blob = url.encode() + repr(sorted(headers.items())).encode() + body
        for needle in needles:
            assert needle not in blob


def test_server_db_never_holds_an_api_key(tmp_path, app, client, store, new_device):
    devs = [new_device(f"d{i}", "T") for i in range(3)]
    devs[0].push([make_event()])
    rotated = rotate(store, "d1")
    revoke(store, "d2")
    keys = [d.api_key for d in devs] + [rotated]
    if is_pg(app.db):   # every value of every row, as bytes
        data = b"".join(
            v if isinstance(v, bytes) else str(v).encode()
            for t in ("meta", "teams", "devices", "keys", "events", "nonces", "ws_tokens")
            for r in query(app.db, f"SELECT * FROM {t}") for v in r)
    else:
        db_files = [p for p in tmp_path.iterdir() if p.name.startswith("server.db")]
        assert any(p.name == "server.db" for p in db_files)
        store.backup(tmp_path / "backup.db")
        data = b"".join(p.read_bytes() for p in [*db_files, tmp_path / "backup.db"])
    assert len(data) > 0
    for key in keys:
        key_id, secret = crypto.parse_api_key(key)
        secret_text = key.split(".")[2]
        assert key_id.encode() in data          # sanity: we are looking at the right bytes
        for needle in (key.encode(), secret_text.encode(), secret, secret.hex().encode(),
                       base64.b64encode(secret)):
            assert needle not in data
    # and the keys table holds nothing that looks like a key
    for row in query(app.db, "SELECT * FROM keys"):
        for col in row:
            if isinstance(col, str):
                assert not col.startswith("sk1.")


# -- tampering, staleness, replays ---------------------------------------------

def _flip_all(dev, store, endpoint, blob, positions):
    before = count(store)
    codes = set()
    for i in positions:
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        r = dev.send(endpoint, bytes(bad))
        codes.add(assert_refused(r)["code"])
        assert count(store) == before, f"byte {i} flipped changed the store"
    return codes


def test_every_flipped_byte_of_a_small_request_is_refused(dev, store):
    blob, nonce = dev.seal("push", {"events": [make_event()]})
    assert len(blob) < 400
    codes = _flip_all(dev, store, "push", blob, range(len(blob)))
    assert "bad_key" in codes
    assert count(store) == 0
    # no tampered copy burned the genuine request's nonce
    r = dev.send("push", blob)
    assert r.status_code == 200
    res = wire.open_response(dev.master, dev.key_id, "push", nonce, r.data)
    assert res["results"][0]["status"] == "accepted"
    assert count(store) == 1


def test_flipped_bytes_of_a_large_request_are_refused(dev, store):
    events = [make_event(payload={"n": i, "text": os.urandom(24).hex()}) for i in range(600)]
    blob, _ = dev.seal("push", {"events": events})
    n = len(blob)
    assert n > 20_000
    positions = sorted(set(range(0, 40)) | set(range(40, n - 40, max(1, n // 150)))
                       | set(range(n - 40, n)))
    _flip_all(dev, store, "push", blob, positions)
    assert count(store) == 0
    assert dev.send("push", blob).status_code == 200
    assert count(store) == 600


def test_truncated_and_extended_requests_are_refused(dev, store):
    blob, _ = dev.seal("push", {"events": [make_event()]})
    for bad in (blob[:-1], blob[:-16], blob[:37], blob[:36], blob[:21], b"", blob + b"\0",
                blob[:21] + blob[22:]):
        assert_refused(dev.send("push", bad))
    assert count(store) == 0
    assert dev.send("push", blob).status_code == 200


def test_request_bound_to_key_and_endpoint(new_device, store):
    a, b = new_device("a", "T"), new_device("b", "T")
    blob, _ = a.seal("push", {"events": [make_event()]})
    # same bytes under another registered key id, or to another endpoint
    assert_refused(a.send("push", blob, headers=b.headers(), opener=b), 401, "bad_key")
    assert_refused(a.send("pull", blob), 401, "bad_key")
    assert_refused(a.send("hello", blob), 401, "bad_key")
    # sealed for b's key id but with a's key
    blob2, _ = a.seal_plain("push", gz(jbytes({"events": [make_event()]})), key_id=b.key_id)
    assert_refused(a.send("push", blob2, headers=b.headers(), opener=b), 401, "bad_key")
    assert count(store) == 0
    assert a.send("push", blob).status_code == 200
    assert count(store) == 1


@pytest.mark.parametrize("offset_ms", [-10 * 60 * 1000, 10 * 60 * 1000, -(wire.MAX_CLOCK_SKEW_MS + 5000)])
def test_stale_request_is_refused(dev, store, offset_ms):
    ts = int(time.time() * 1000) + offset_ms
    blob, _ = dev.seal("push", {"events": [make_event()]}, ts=ts)
    assert_refused(dev.send("push", blob), 400, "stale")
    assert count(store) == 0
    blob, _ = dev.seal("hello", {}, ts=ts)
    assert_refused(dev.send("hello", blob), 400, "stale")


def test_replayed_request_is_refused_and_changes_nothing(dev, store):
    blob, _ = dev.seal("push", {"events": [make_event(), make_event()]})
    assert dev.send("push", blob).status_code == 200
    assert count(store) == 2
    assert_refused(dev.send("push", blob), 400, "replay")
    assert count(store) == 2
    # a replay of a request that was refused for its content is still a replay
    blob, _ = dev.seal("push", {"events": "nope"})
    assert_refused(dev.send("push", blob), 400, "malformed")
    assert_refused(dev.send("push", blob), 400, "replay")
    for endpoint, body in (("hello", {}), ("pull", {"after": 0})):
        blob, _ = dev.seal(endpoint, body)
        assert dev.send(endpoint, blob).status_code == 200
        assert_refused(dev.send(endpoint, blob), 400, "replay")
    assert count(store) == 2


def test_same_nonce_new_request_is_a_replay(dev, store):
    nonce = os.urandom(12)
    blob1, _ = dev.seal_plain("push", gz(jbytes({"events": [make_event()]})), nonce=nonce)
    blob2, _ = dev.seal_plain("push", gz(jbytes({"events": [make_event()]})), nonce=nonce)
    assert dev.send("push", blob1).status_code == 200
    assert_refused(dev.send("push", blob2), 400, "replay")
    assert count(store) == 1


# -- malformed bodies ----------------------------------------------------------

def _trailing(raw):
    return gz(raw) + b"garbage"


@pytest.mark.parametrize("plain", [
    pytest.param(b'{"events": []}', id="not-gzip"),
    pytest.param(gz(b"not json at all"), id="gzip-not-json"),
    pytest.param(gz(b"[1, 2, 3]"), id="json-array"),
    pytest.param(gz(b'"text"'), id="json-string"),
    pytest.param(gz(b"null"), id="json-null"),
    pytest.param(gz(b'{"events": [}'), id="broken-json"),
    pytest.param(gz(b'{"events": []}')[:-5], id="truncated-gzip"),
    pytest.param(_trailing(b'{"events": []}'), id="trailing-bytes"),
    pytest.param(gz(b'{"events": ["\xff\xfe"]}'), id="not-utf8"),
    pytest.param(gz(b""), id="empty-plaintext"),
    pytest.param(b"", id="empty-gzip"),
    pytest.param(gz(b'{"events": [' + b"1" * 5000 + b"]}"), id="int-too-long"),
    pytest.param(gz(b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), id="deep-nesting"),
    pytest.param(gz(b'{"events": [' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]}"),
                 id="deep-objects"),
])
def test_malformed_sealed_bodies_are_refused(dev, store, plain):
    for endpoint in ("push", "pull", "hello"):
        blob, _ = dev.seal_plain(endpoint, plain)
        r = dev.send(endpoint, blob)
        if endpoint == "hello" and r.status_code == 200:
            continue  # hello ignores its body; it just must not fail
        assert_refused(r, 400)
    assert count(store) == 0


@pytest.mark.parametrize("blob", [b"", b"\x01", b"x" * 36, b"\x02" + os.urandom(60),
                                  os.urandom(200), b"{}", b'{"events": []}'],
                         ids=["empty", "one", "x36", "v2-random", "random", "obj", "events"])
def test_unsealed_garbage_is_refused(dev, store, blob):
    r = dev.send("push", blob)
    assert_refused(r)
    assert count(store) == 0


@pytest.mark.parametrize("field,value", [
    ("event_id", "\ud800"), ("aggregate_id", "\ud800"), ("node_id", "x\udfff"),
    ("payload", {"k": "\ud800"}), ("payload", {"\udc00": 1}), ("event_type", "\ud800"),
])
def test_lone_surrogates_in_an_event_are_rejected_not_500(dev, store, field, value):
    good = make_event()
    bad = make_event(**{field: value})
    r, body = dev.call("push", {"events": [good, bad]})
    assert r.status_code == 200, (r.status_code, r.data[:300])
    results = body["results"]
    assert results[0] == {"event_id": good["event_id"], "status": "accepted"}
    assert results[1]["status"] == "rejected" and results[1]["reason"]
    assert count(store) == 1


def test_push_answered_with_an_error_commits_nothing(dev, store):
    """If a push is answered with an error, the client will never learn its events
    were stored; the server must not have stored them."""
    good = make_event()
    r, _ = dev.call("push", {"events": [good, make_event(event_id="\ud800")]})
    if r.status_code != 200:
        assert count(store) == 0, f"HTTP {r.status_code} yet the batch was committed"
    assert r.status_code == 200


@pytest.mark.parametrize("depth", [50, 400, 800, 950])
def test_deep_payload_never_poisons_pull(dev, store, depth, request):
    # this test's own json calls need the stack (a pytest-xdist worker's is deeper)
    limit = sys.getrecursionlimit()
    request.addfinalizer(lambda: sys.setrecursionlimit(limit))
    sys.setrecursionlimit(max(limit, 3000))
    payload = json.loads('{"a":' * depth + "1" + "}" * depth)
    ev = make_event(payload=payload)
    blob, nonce = dev.seal_plain("push", gz(b'{"events": [' + jbytes(ev) + b"]}"))
    r = dev.send("push", blob)
    assert r.status_code != 500, r.data[:300]
    if r.status_code != 200:
        assert_refused(r)
        return
    res = wire.open_response(dev.master, dev.key_id, "push", nonce, r.data)["results"][0]
    if res["status"] == "accepted":
        got = dev.pull()["events"]
        assert len(got) == 1 and got[0]["event_id"] == ev["event_id"]
        assert json.dumps(got[0]["payload"]) == json.dumps(payload)


# -- headers, keys, devices ----------------------------------------------------

def _blob(dev):
    return dev.seal("push", {"events": [make_event()]})[0]


def test_protocol_version_mismatch_names_both_versions(dev, store):
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: "2"})),
                         400, "protocol_version")
    assert "2" in err["message"] and str(PROTOCOL_VERSION) in err["message"]
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: "99"})),
                         400, "protocol_version")
    assert "99" in err["message"] and str(PROTOCOL_VERSION) in err["message"]
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: None})),
                         400, "protocol_version")
    assert str(PROTOCOL_VERSION) in err["message"]
    for value in ("", "abc", "1.0", "01", " 2", "1" * 500):
        assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: value})),
                       400, "protocol_version")
    assert count(store) == 0


@pytest.mark.parametrize("key_id", [None, "", "abc", "0123456789ABCDEF", "0123456789abcdeg",
                                    "0123456789abcdef0", "../../etc/passwd", "0" * 16,
                                    "'; DROP TABLE keys; --"])
def test_bad_or_unknown_key_id(dev, store, key_id):
    r = dev.send("push", _blob(dev), dev.headers(**{wire.KEY_HEADER: key_id}))
    assert_refused(r, 401, "unknown_key")
    assert count(store) == 0
    assert store.get_key(dev.key_id) is not None


def test_revoked_device_is_refused(new_device, store):
    a, b = new_device("a", "T"), new_device("b", "T")
    a.push([make_event()])
    revoke(store, "a")
    for endpoint, body in (("hello", {}), ("push", {"events": [make_event()]}), ("pull", {})):
        r, _ = a.call(endpoint, body)
        err = assert_refused(r, 401, "revoked")
        assert "a" in err["message"]
    assert count(store) == 1
    assert b.push([make_event()])[0]["status"] == "accepted"    # others unaffected


def test_rotated_out_key_is_refused_and_new_key_works(new_device, client, store):
    old = new_device("a", "T")
    old.push([make_event()])
    new = Device(client, "a", "T", rotate(store, "a"))
    assert new.key_id != old.key_id
    r, _ = old.call("push", {"events": [make_event()]})
    assert_refused(r, 401, "rotated")
    assert count(store) == 1
    assert new.push([make_event()])[0]["status"] == "accepted"
    assert [e["seq"] for e in new.pull()["events"]] == [1, 2]
    # rotating again retires the second key too
    newer = Device(client, "a", "T", rotate(store, "a"))
    assert_refused(new.call("hello", {})[0], 401, "rotated")
    assert newer.ok("hello", {})["device"] == "a"


def test_old_key_cannot_open_a_request_for_the_new_key(new_device, client, store):
    old = new_device("a", "T")
    new = Device(client, "a", "T", rotate(store, "a"))
    blob, _ = old.seal_plain("push", gz(jbytes({"events": [make_event()]})), key_id=new.key_id)
    assert_refused(old.send("push", blob, headers=new.headers(), opener=new), 401, "bad_key")
    assert count(store) == 0


# -- size limits ---------------------------------------------------------------

def test_oversize_body_is_413(dev, store):
    blob = os.urandom(wire.MAX_BODY + 1)
    r = dev.send("push", blob)
    assert_refused(r, 413, "too_large")
    assert count(store) == 0


def test_body_at_the_limit_is_not_413(dev, store):
    # a sealed body exactly MAX_BODY long passes the size check (and fails auth: 401)
    blob, _ = dev.seal("push", {"events": []})
    blob = blob + os.urandom(wire.MAX_BODY - len(blob))
    assert_refused(dev.send("push", blob), 401, "bad_key")


def _bomb(size):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out, chunk = [c.compress(b'{"events": [')], b" " * (1 << 20)
    left = size
    while left > 0:
        out.append(c.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    out.append(c.compress(b"]}"))
    out.append(c.flush())
    return b"".join(out)


@pytest.mark.parametrize("endpoint", ["push", "pull"])
def test_decompression_bomb_is_413(dev, store, endpoint):
    bomb = _bomb(wire.MAX_PLAIN + 1)
    assert len(bomb) < wire.MAX_BODY // 100
    blob, _ = dev.seal_plain(endpoint, bomb)
    r = dev.send(endpoint, blob)
    assert_refused(r, 413, "too_large")
    assert count(store) == 0
    assert dev.push([make_event()])[0]["status"] == "accepted"   # server still fine


# -- fuzzing -------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20))
json_values = st.recursive(json_scalars,
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
field_values = st.one_of(
    json_values,
    st.uuids().map(str),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.", min_size=0, max_size=70),
    st.integers(min_value=-2, max_value=2 ** 64),
    st.sampled_from(["2026-01-31T12:00:00Z", "2026-01-31T12:00:00.123+02:00", "\ud800", ""]),
)
events_strategy = st.lists(
    st.one_of(
        st.builds(make_event),
        st.builds(lambda ev, k, v: dict(ev, **{k: v}), st.builds(make_event),
                  st.sampled_from(["event_id", "event_type", "aggregate_type", "aggregate_id",
                                   "lamport_clock", "node_id", "payload", "timestamp"]),
                  field_values),
        st.builds(lambda ev, k: {f: v for f, v in ev.items() if f != k},
                  st.builds(make_event), st.sampled_from(list(make_event()))),
        json_values,
    ),
    max_size=8,
)


def _check_answer(dev, store, endpoint, r, nonce, before):
    assert r.status_code != 500 and r.status_code < 500, (r.status_code, r.data[:300])
    if r.status_code == 200:
        body = wire.open_response(dev.master, dev.key_id, endpoint, nonce, r.data)
        accepted = sum(1 for x in body.get("results", []) if x["status"] == "accepted")
        assert count(store) == before + accepted
        return body
    assert_refused(r)
    assert count(store) == before
    return None


@HYPO
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_body(dev, store, data):
    before = count(store)
    for endpoint in ("push", "pull"):
        assert_refused(dev.send(endpoint, data))
    assert count(store) == before


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@HYPO
@given(proto=st.one_of(st.none(), header_text, st.just("1")),
       key=st.one_of(st.none(), header_text, st.text("0123456789abcdef", min_size=16, max_size=16)),
       extra=st.dictionaries(st.sampled_from(["Content-Type", "Content-Encoding", "X-Forwarded-For",
                                              "Transfer-Encoding-X", "X-SK-Other"]),
                             header_text, max_size=3))
def test_fuzz_random_headers(dev, store, proto, key, extra):
    before = count(store)
    blob, nonce = dev.seal("push", {"events": [make_event()]})
    headers = dict(extra)
    if proto is not None:
        headers[wire.PROTOCOL_HEADER] = proto
    if key is not None:
        headers[wire.KEY_HEADER] = key
    r = dev.send("push", blob, headers=headers)
    body = _check_answer(dev, store, "push", r, nonce, before)
    if body is not None:    # only the genuine headers can succeed
        assert proto == "1" and key == dev.key_id


@HYPO
@given(events=events_strategy)
def test_fuzz_sealed_push_events(dev, store, events):
    before = count(store)
    blob, nonce = dev.seal("push", {"events": events})
    r = dev.send("push", blob)
    body = _check_answer(dev, store, "push", r, nonce, before)
    assert body is not None, r.data[:300]
    if "node_taken" in body:   # a (node, clock) stamp that an earlier example stored
        assert count(store) == before and body["node_taken"]["node_id"] == "node-a"
        return
    assert len(body["results"]) == len(events)
    for res in body["results"]:
        assert res["status"] in ("accepted", "duplicate", "rejected")
        if res["status"] == "rejected":
            assert res["reason"]


@HYPO
@given(body=st.one_of(json_values,
                      st.dictionaries(st.sampled_from(["events", "after", "limit", "skip", "x"]),
                                      st.one_of(json_values, field_values, events_strategy),
                                      max_size=4)),
       endpoint=st.sampled_from(["push", "pull", "hello"]))
def test_fuzz_sealed_random_bodies(dev, store, body, endpoint):
    before = count(store)
    blob, nonce = dev.seal(endpoint, body)
    r = dev.send(endpoint, blob)
    got = _check_answer(dev, store, endpoint, r, nonce, before)
    if got is not None and endpoint == "pull":
        assert isinstance(got["events"], list) and isinstance(got["more"], bool)
        assert got["next"] >= 0


@HYPO
@example(after=2 ** 64, limit=10, skip=None)
@example(after=3, limit=2, skip={"node_id": "node-a", "upto": 0})
@given(after=st.integers(min_value=-5, max_value=2 ** 70), limit=st.integers(-5, 10_000),
       skip=st.one_of(st.none(), json_values,
                      st.fixed_dictionaries({"node_id": st.just("node-a"),
                                             "upto": st.integers(-2, 2 ** 64)})))
def test_fuzz_pull_cursor(dev, store, after, limit, skip):
    if count(store) == 0:
        dev.push([make_event() for _ in range(5)])   # node-a
    body = {"after": after, "limit": limit}
    if skip is not None:
        body["skip"] = skip
    blob, nonce = dev.seal("pull", body)
    r = dev.send("pull", blob)
    got = _check_answer(dev, store, "pull", r, nonce, count(store))
    valid_skip = skip is None or (isinstance(skip, dict) and isinstance(skip.get("node_id"), str)
                                  and type(skip.get("upto")) is int and 0 <= skip["upto"] < 2 ** 63)
    if not valid_skip or not 0 <= after < 2 ** 63 or not 1 <= limit <= wire.MAX_PAGE:
        assert got is None and r.status_code == 400
    elif skip is not None and skip["node_id"] == "node-a" and skip["upto"] >= max(
            e["lamport_clock"] for e in dev.pull()["events"]):
        # every stored event is node-a's, pushed by this device, stamped at or below upto
        assert got["events"] == [] and got["next"] == max(after, 5)
    else:
        assert got is not None
        expect = list(range(after + 1, 6))[:limit]
        assert [e["seq"] for e in got["events"]] == expect
        assert got["more"] == (after + limit < 5)


@HYPO
@given(cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_compressed_plaintext(dev, store, cuts):
    """Correctly sealed, but the gzip inside is corrupted at random places."""
    plain = bytearray(gz(jbytes({"events": [make_event(), make_event()]})))
    for pos, val in cuts:
        plain[pos % len(plain)] = val
    before = count(store)
    blob, nonce = dev.seal_plain("push", bytes(plain))
    r = dev.send("push", blob)
    _check_answer(dev, store, "push", r, nonce, before)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_refuse_the_whole_body(dev, store, constant):
    before = count(store)
    raw = b'{"events": [{"payload": {"x": ' + constant + b'}}]}'
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    blob, _ = dev.seal_plain("push", c.compress(raw) + c.flush())
    r = dev.send("push", blob)
    assert_refused(r, 400, "malformed", sealed=True)
    assert count(store) == before


def test_revoked_is_told_only_to_key_holders(tmp_path):
    """A device revoked: its key holder learns so; someone with the key id but not
    the key learns nothing (the answer is sealed for the key the server holds, and
    says only that the request did not authenticate)."""
    app = create_app({"DB": str(tmp_path / "s.db"), "TESTING": True})
    try:
        store = app.extensions["sk_store"]
        client = app.test_client()
        name = "secret-laptop-7"
        real = Device(client, name, "T", register(store, name, "T"))
        revoke(store, name)
        _, other = crypto.new_api_key()
        wrong_key = f"sk1.{real.key_id}.{other.split('.')[2]}"
        assert wrong_key != real.api_key
        imp = Device(client, name, "T", wrong_key)
        assert imp.key_id == real.key_id
        for endpoint, body in (("hello", {}), ("push", {"events": [make_event()]}),
                               ("pull", {"after": 0, "limit": 10})):
            blob, _ = imp.seal(endpoint, body)
            r = imp.send(endpoint, blob, opener=real)
            err = assert_refused(r, 401, "bad_key", sealed=True)
            assert name not in err["message"], err
            assert "revoked" not in err["message"].lower(), err
            assert name.encode() not in r.get_data()
            with pytest.raises(crypto.CryptoError):   # and the impostor cannot open even that
                wire.open_response(imp.master, imp.key_id, endpoint, crypto.peek(blob)[1],
                                   r.get_data())
            r, _ = real.call(endpoint, body)
            err = assert_refused(r, 401, "revoked", sealed=True)
            assert name in err["message"]
        assert store.stats()["events"] == 0
    finally:
        app.extensions["sk_store"].close()

