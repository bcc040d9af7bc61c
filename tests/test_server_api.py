"""The server's REST API through Flask's test client (protocol 2): sealed wire
format with attachments, push/pull semantics on sealed batches (the server sees
only manifests), team isolation, key epochs, node ownership, and refusal of every
kind of bad, tampered, stale or replayed request (always a 4xx error, sealed once
the request authenticated, never a 500, never a change). Event content is sealed
under the team key: its validation is the devices' (tests/test_event.py), and the
server must never hold it in the clear."""

import base64
import hashlib
import itertools
import json
import os
import re
import struct
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

from conftest import (begin_epoch, is_pg, open_page, push_request, query, results, sealed_batch,
                      share_epochs)

HYPO = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers -------------------------------------------------------------------

def gz(raw):
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def jbytes(obj):
    # ensure_ascii: lone surrogates travel as \udXXX escapes, as any JSON client may send
    return json.dumps(obj).encode("ascii")


def frame(gzipped, attachments=()):
    """The framed plaintext of a body (PROTOCOL.md 3), written here independently of
    sk.wire: count(4) | n(4) | gzip(JSON) [n bytes] | count x (length(4) | bytes)."""
    return b"".join([struct.pack(">II", len(attachments), len(gzipped)), gzipped,
                     *(struct.pack(">I", len(a)) + bytes(a) for a in attachments)])


def chain_of(event_ids):
    """The hash chain after these events (PROTOCOL.md 6), hex."""
    chain = bytes(32)
    for eid in event_ids:
        chain = hashlib.sha256(chain + eid.encode()).digest()
    return chain.hex()


_clock = itertools.count(1)   # a node stamps each clock value once


def make_event(**kw):
    ev = {"event_id": str(uuid.uuid4()), "event_type": "feature_created",
          "aggregate_type": "feature", "aggregate_id": "f-1", "lamport_clock": next(_clock),
          "node_id": "node-a", "payload": {"title": "x"}, "timestamp": "2026-01-31T12:00:00Z"}
    ev.update(kw)
    return ev


def check_page(page, after):
    """A pull answer's shape (PROTOCOL.md 5): rows are every seq from after + 1 to
    next; one attachment per batch; every row of a sealed event names a batch sent,
    and every batch sent holds a row's event."""
    assert [row[0] for row in page["rows"]] == list(range(after + 1, page["next"] + 1)), page
    assert isinstance(page["more"], bool)
    assert len(page.get("attachments", [])) == len(page["batches"])
    used = {row[1] for row in page["rows"] if row[1] is not None}
    assert used == set(range(len(page["batches"]))), (used, page["batches"])
    for row in page["rows"]:
        if row[1] is None:
            assert isinstance(row[2], str)   # an own event: its id, no body
        else:
            assert type(row[2]) is int and row[2] >= 0
    return page


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

    def own(self, events):
        for ev in events:
            if isinstance(ev, dict) and ev.get("node_id") == "node-a":
                ev["node_id"] = self.node
        return events

    def push_request(self, events, epoch=1, **kw):
        """(body, attachments) of a push of event dicts, sealed under the team key
        of `epoch` as a member seals them (conftest.push_request)."""
        return push_request(self.team, self.own(events), epoch, **kw)

    def seal_plain(self, endpoint, plain, ts=None, nonce=None, key_id=None):
        """Seal framed plaintext bytes `plain` for `endpoint`; return (blob, nonce)."""
        key = crypto.direction_key(self.master, crypto.C2S)
        ctx = wire._context(crypto.C2S, key_id or self.key_id, endpoint)
        blob = crypto.seal(key, plain, ctx, timestamp_ms=ts, nonce=nonce)
        return blob, crypto.peek(blob)[1]

    def seal(self, endpoint, obj, attachments=(), ts=None):
        return self.seal_plain(endpoint, frame(gz(jbytes(obj)), attachments), ts=ts)

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

    def call(self, endpoint, obj, attachments=()):
        """Seal, send, and open the answer; (response, opened body or None)."""
        blob, _ = self.seal(endpoint, obj, attachments)
        r = self.send(endpoint, blob)
        if r.status_code != 200:
            return r, None
        assert r.sk_answer is not None, r.headers["Content-Type"]
        return r, r.sk_answer

    def ok(self, endpoint, obj, attachments=()):
        r, body = self.call(endpoint, obj, attachments)
        assert r.status_code == 200, (r.status_code, r.sk_answer or r.data[:500])
        return body

    def push_answer(self, events, epoch=1, **kw):
        return self.ok("push", *self.push_request(events, epoch, **kw))

    def push(self, events, epoch=1, **kw):
        answer = self.push_answer(events, epoch, **kw)
        assert "statuses" in answer, answer
        assert answer["team"] == self.team
        return results(answer, events)

    def pull(self, after=0, limit=1000, skip=None):
        body = {"after": after, "limit": limit}
        if skip is not None:
            body["skip"] = {"node_id": skip[0], "upto": skip[1]}
        return check_page(self.ok("pull", body), after)

    def read(self, after=0, limit=1000, skip=None):
        """The events of one page, opened as a member opens them."""
        return open_page(self.pull(after, limit, skip), self.team)

    def pull_all(self, after=0, limit=1000, skip=None):
        events, pages = [], 0
        while True:
            page = self.pull(after, limit, skip)
            pages += 1
            events += open_page(page, self.team)
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
        assert r.status_code == status, (r.status_code, getattr(r, "sk_answer", None) or r.data[:500])
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
    """A factory: a registered Device; the first device of a team begins its key
    epoch 1, as its first sync would (the key is conftest.team_key)."""
    def make(name="dev-a", team="team-a", epoch=True):
        d = Device(client, name, team, register(store, name, team))
        if epoch and store.keys(team, name)["epoch"] == 0:
            begin_epoch(store, team, name)
        elif epoch:   # a member's next sync shares the team key with it
            share_epochs(store, team)
        return d
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
    answer = dev.push_answer([ev])
    assert answer["statuses"] == "a" and "reasons" not in answer
    assert answer["head"] == 1 and answer["chain"] == chain_of([ev["event_id"]])
    assert count(store) == 1
    answer = dev.push_answer([ev])
    assert answer["statuses"] == "d" and "reasons" not in answer
    assert answer["head"] == 1 and answer["chain"] == chain_of([ev["event_id"]])
    assert count(store) == 1
    assert store.stats()["batches"] == 1     # a batch of duplicates is not kept
    page = dev.pull()
    assert page["rows"] == [[1, 0, 0]] and len(page["batches"]) == 1
    assert page["batches"][0]["epoch"] == 1 and page["batches"][0]["device"] == "dev-a"
    got = open_page(page, dev.team)
    assert len(got) == 1
    got = dict(got[0])
    assert got.pop("seq") == 1
    assert got == ev


def test_one_refused_event_never_blocks_the_others(dev, store):
    """What the server can refuse one event of a batch for (it sees only the
    manifest): an event id already used by another event (another clock or node),
    or a Lamport clock that jumps more than 2^32 past the team's; the others are
    stored, in order, each answered."""
    old = make_event()
    dev.push([old])
    good1, good2, good3 = make_event(), make_event(), make_event(aggregate_id="f-2")
    batch = [
        good1,
        dict(old, lamport_clock=next(_clock)),       # its id, another clock
        dict(old, node_id="node-other"),              # its id, another node
        make_event(lamport_clock=2 ** 62),            # jumps past the team's clock
        make_event(lamport_clock=2 ** 63 - 1),        # the largest clock: a jump too
        good2,
        dict(old),                                    # the same event again
        good3,
    ]
    results = dev.push(batch)
    assert len(results) == len(batch)
    assert [r["event_id"] for r in results] == [e["event_id"] for e in batch]
    statuses = [r["status"] for r in results]
    assert statuses == ["accepted"] + ["rejected"] * 4 + ["accepted", "duplicate", "accepted"]
    for r in results:
        if r["status"] == "rejected":
            assert isinstance(r.get("reason"), str) and r["reason"]
    assert "already used" in results[1]["reason"] and "already used" in results[2]["reason"]
    assert "2^32" in results[3]["reason"] and "2^32" in results[4]["reason"]
    assert count(store) == 4
    got = dev.read()
    assert [e["event_id"] for e in got] == [old["event_id"], good1["event_id"],
                                            good2["event_id"], good3["event_id"]]
    assert [{k: v for k, v in e.items() if k != "seq"} for e in got[1:]] == [good1, good2, good3]


MANIFEST_ID = "0190a8f0-0000-7000-8000-000000000001"


@pytest.mark.parametrize("entry", [
    pytest.param([MANIFEST_ID, "node-a"], id="two-fields"),
    pytest.param([MANIFEST_ID, "node-a", 5, "x"], id="four-fields"),
    pytest.param([], id="empty-entry"),
    pytest.param([MANIFEST_ID, "node-a", 0], id="clock-0"),
    pytest.param([MANIFEST_ID, "node-a", -1], id="clock-negative"),
    pytest.param([MANIFEST_ID, "node-a", 2 ** 63], id="clock-2^63"),
    pytest.param([MANIFEST_ID, "node-a", "7"], id="clock-text"),
    pytest.param([MANIFEST_ID, "node-a", 1.5], id="clock-float"),
    pytest.param([MANIFEST_ID, "node-a", 7.0], id="clock-whole-float"),
    pytest.param([MANIFEST_ID, "node-a", True], id="clock-bool"),
    pytest.param([MANIFEST_ID, "node-a", None], id="clock-null"),
    pytest.param(["NOT-A-UUID", "node-a", 5], id="id-not-uuid"),
    pytest.param([MANIFEST_ID.upper(), "node-a", 5], id="id-uppercase"),
    pytest.param([MANIFEST_ID.replace("-", ""), "node-a", 5], id="id-no-dashes"),
    pytest.param([MANIFEST_ID + "\n", "node-a", 5], id="id-newline"),
    pytest.param([" " + MANIFEST_ID, "node-a", 5], id="id-space"),
    pytest.param([123, "node-a", 5], id="id-number"),
    pytest.param([None, "node-a", 5], id="id-null"),
    pytest.param([MANIFEST_ID, "", 5], id="node-empty"),
    pytest.param([MANIFEST_ID, "n" * 65, 5], id="node-65-chars"),
    pytest.param([MANIFEST_ID, "a\tb", 5], id="node-tab"),
    pytest.param([MANIFEST_ID, "a\nb", 5], id="node-newline"),
    pytest.param([MANIFEST_ID, "a\x00b", 5], id="node-nul"),
    pytest.param([MANIFEST_ID, 7, 5], id="node-number"),
    pytest.param([MANIFEST_ID, None, 5], id="node-null"),
    pytest.param({"event_id": MANIFEST_ID, "node_id": "node-a", "lamport_clock": 5},
                 id="object"),
    pytest.param(make_event(), id="protocol-1-event"),
    pytest.param("not an entry", id="text"),
    pytest.param(None, id="null"),
])
def test_a_malformed_manifest_entry_refuses_the_whole_push(dev, store, entry):
    """The manifest is all the server can check of events; one that is not a list
    of [event_id, node_id, lamport_clock] is a broken client, and nothing of its
    push is stored (nor any node id bound)."""
    good1, good2 = make_event(), make_event()
    body, atts = dev.push_request([good1, make_event(), good2])
    body["events"][1] = entry
    r, _ = dev.call("push", body, atts)
    err = assert_refused(r, 400, "malformed", sealed=True)
    assert "manifest" in err["message"]
    assert count(store) == 0
    # the same events in a well-formed push go in: the refusal stamped nothing
    assert [r["status"] for r in dev.push([good1, good2])] == ["accepted"] * 2


def test_event_id_reused_by_a_different_event_is_rejected(dev, store):
    ev = make_event(payload={"v": 1})
    assert dev.push([ev])[0]["status"] == "accepted"
    for change in ({"lamport_clock": next(_clock)}, {"lamport_clock": 1},
                   {"node_id": "other"}, {"node_id": "node-a2"}):
        res = dev.push([dict(ev, **change)])[0]
        assert res["status"] == "rejected", change
        assert res["event_id"] == ev["event_id"]
        assert res["reason"] == "event_id already used by a different event", res
    # The server sees only (event_id, node_id, lamport_clock): another payload,
    # time, aggregate or type under the same id, node and clock is sealed content
    # it cannot compare, so it answers duplicate and keeps the first body. (A
    # device never stamps two events alike; the first sealed body is the event.)
    for change in ({"payload": {"v": 2}}, {"timestamp": "2026-02-01T00:00:00Z"},
                   {"aggregate_id": "f-9"}, {"event_type": "feature_deleted"}):
        res = dev.push([dict(ev, **change)])[0]
        assert res == {"event_id": ev["event_id"], "status": "duplicate"}, change
    assert count(store) == 1
    [stored] = dev.read()
    assert stored["payload"] == {"v": 1} and stored["lamport_clock"] == ev["lamport_clock"]
    assert {k: v for k, v in stored.items() if k != "seq"} == ev


def test_same_event_id_twice_in_one_batch(dev, store):
    ev = make_event()
    # the third differs only in sealed content, which the server cannot see
    results = dev.push([ev, dict(ev), dict(ev, payload={"other": True}),
                        dict(ev, lamport_clock=next(_clock))])
    assert [r["status"] for r in results] == ["accepted", "duplicate", "duplicate", "rejected"]
    assert count(store) == 1
    [stored] = dev.read()
    assert {k: v for k, v in stored.items() if k != "seq"} == ev


def test_one_stamp_twice_in_one_push_is_refused(dev, store):
    """A (node_id, lamport_clock) stamp holds one event id, within a push as across
    pushes: two events under one stamp are two homes sharing a node id, and the
    push is answered node_taken, storing nothing."""
    clock = next(_clock)
    first, second = make_event(lamport_clock=clock), make_event(lamport_clock=clock)
    answer = dev.push_answer([first, second])
    assert "node_taken" in answer, answer
    assert answer["node_taken"]["node_id"] == "node-a"
    assert count(store) == 0 and store.stats()["batches"] == 0
    # the stamp is still free for one of them
    assert [r["status"] for r in dev.push([first])] == ["accepted"]


def test_push_limit_is_1000_events(dev, store):
    results = dev.push([make_event() for _ in range(wire.MAX_BATCH)])
    assert len(results) == wire.MAX_BATCH
    assert {r["status"] for r in results} == {"accepted"}
    assert count(store) == wire.MAX_BATCH
    r, _ = dev.call("push", *dev.push_request([make_event() for _ in range(wire.MAX_BATCH + 1)]))
    assert_refused(r, 413, "too_large", sealed=True)
    assert count(store) == wire.MAX_BATCH
    # the limit is on events, whatever else the body holds
    body, atts = dev.push_request([make_event()])
    body["events"] = body["events"] * (wire.MAX_BATCH + 1)
    assert_refused(dev.call("push", body, atts)[0], 413, "too_large")
    assert count(store) == wire.MAX_BATCH


DROP = object()


@pytest.mark.parametrize("field,value", [
    ("events", DROP), ("events", None), ("events", {"a": 1}), ("events", "x"), ("events", 3),
    pytest.param("events", [], id="events-empty"),
    ("epoch", DROP), ("epoch", None), ("epoch", 0), ("epoch", -1), ("epoch", "1"),
    ("epoch", 1.0), ("epoch", True), ("epoch", 2 ** 31), ("epoch", [1]),
    ("writer", "x"), ("writer", []), ("writer", 0), ("writer", {}), ("writer", {"seq": -1}),
    ("writer", {"seq": "0", "chain": ""}), ("writer", {"seq": True, "chain": ""}),
    ("writer", {"seq": 1.0, "chain": ""}), ("writer", {"seq": 2 ** 63, "chain": ""}),
    ("writer", {"seq": 1, "chain": "zz" * 32}), ("writer", {"seq": 1, "chain": "ab" * 31}),
    ("writer", {"seq": 1, "chain": "AB" * 32}), ("writer", {"seq": 1, "chain": 7}),
    ("writer", {"seq": 1, "chain": "ab" * 32 + "\n"}),
    ("relay", "x"), ("relay", None), ("relay", {"0": 1}), ("relay", [1]), ("relay", [-1]),
    ("relay", [True]), ("relay", [0.0]), ("relay", [None]), ("relay", ["0"]),
    ("known", "x"), ("known", {}), ("known", {"seq": 0}), ("known", {"seq": 0, "chain": "00"}),
    ("known", {"seq": -1, "chain": "00" * 32}), ("known", {"seq": "0", "chain": "00" * 32}),
    ("known", {"seq": 0, "chain": "zz" * 32}),
    pytest.param("attachments", (), id="no-attachment"),
    pytest.param("attachments", "two", id="two-attachments"),
    pytest.param("protocol-1", None, id="protocol-1-body"),
])
def test_malformed_push_bodies_are_refused(dev, store, field, value):
    """The shape of a push: {epoch, writer, events: manifest, relay, known?} and
    exactly one attachment, its sealed batch. Anything else stores nothing."""
    body, atts = dev.push_request([make_event()])
    if field == "attachments":
        atts = atts * 2 if value == "two" else []
    elif field == "protocol-1":
        body, atts = {"events": [make_event()]}, []
    elif value is DROP:
        del body[field]
    else:
        body[field] = value
    r, _ = dev.call("push", body, atts)
    assert_refused(r, 400, "malformed", sealed=True)
    assert count(store) == 0


def test_push_under_another_epoch_is_told_to_rekey_and_stores_nothing(new_device, store):
    a = new_device("a", "T", epoch=False)
    ev = make_event()
    # no epoch yet: a member must begin one
    answer = a.push_answer([ev])
    assert answer == {"rekey": {"epoch": 0, "rotate": True}, "head": 0, "team": "T"}
    begin_epoch(store, "T", "a")
    for wrong in (2, 7, 2 ** 31 - 1):
        answer = a.push_answer([ev], epoch=wrong)
        assert answer == {"rekey": {"epoch": 1, "rotate": False}, "head": 0, "team": "T"}
    assert count(store) == 0 and store.stats()["batches"] == 0
    assert a.push([ev])[0]["status"] == "accepted"
    begin_epoch(store, "T", "a", epoch=2)
    later = make_event()
    answer = a.push_answer([later], epoch=1)      # the old epoch no longer writes
    assert answer == {"rekey": {"epoch": 2, "rotate": False}, "head": 1, "team": "T"}
    assert count(store) == 1
    assert a.push([later], epoch=2)[0]["status"] == "accepted"
    page = a.pull()
    assert [b["epoch"] for b in page["batches"]] == [1, 2]
    assert [e["event_id"] for e in open_page(page, "T")] == [ev["event_id"], later["event_id"]]


def test_node_ids_belong_to_the_device_that_first_pushed_under_them(new_device, store):
    a, b, c = new_device("dev-a", "T"), new_device("b", "T"), new_device("c", "T")
    mine = make_event()
    a.push([mine])                                       # node-a is dev-a's from here
    b_own, stolen = make_event(node_id="node-b"), make_event(node_id="node-a")
    answer = b.ok("push", *push_request("T", [b_own, stolen]))
    assert set(answer) == {"node_taken", "head", "team"}, answer
    taken = answer["node_taken"]
    assert taken["node_id"] == "node-a" and taken["device"] == "dev-a" and taken["reason"]
    assert answer["head"] == 1 and count(store) == 1
    # nothing of that push was stored, not even the binding of node-b to b
    c_own = make_event(node_id="node-b")
    assert c.ok("push", *push_request("T", [c_own]))["statuses"] == "a"
    assert count(store) == 2
    # a stamp (node, clock) holds one event: dev-a's own node, a clock it used
    answer = a.push_answer([make_event(lamport_clock=mine["lamport_clock"])])
    assert answer["node_taken"]["node_id"] == "node-a", answer
    assert str(mine["lamport_clock"]) in answer["node_taken"]["reason"]
    assert count(store) == 2
    # an event already stored is a duplicate, whoever pushes it again
    assert results(b.ok("push", *push_request("T", [dict(mine)])), [mine]) == [
        {"event_id": mine["event_id"], "status": "duplicate"}]
    # another device's events given back to a (restored) server travel as relay
    body, atts = push_request("T", [stolen], relay=[0])
    assert results(b.ok("push", body, atts), [stolen]) == [
        {"event_id": stolen["event_id"], "status": "accepted"}]
    assert count(store) == 3
    got = [{k: v for k, v in e.items() if k != "seq"} for e in a.read()]
    assert got == [mine, c_own, stolen]
    assert [b_["device"] for b_ in a.pull()["batches"]] == ["dev-a", "c", "b"]


def test_push_answered_with_an_error_commits_nothing(new_device, store):
    """If a push is answered with an error, the client will never learn its events
    were stored; the server must not have stored them, nor bound their node ids."""
    a = new_device()
    good = make_event()
    body, atts = a.push_request([good, make_event()])
    body["events"][1][0] = "\ud800"
    r = a.send("push", a.seal_plain("push", frame(gz(jbytes(body)), atts))[0])
    assert_refused(r, 400, "malformed")
    assert count(store) == 0
    # node-a is still nobody's: another device may take it
    b = new_device("b")
    assert b.ok("push", *push_request("team-a", [good]))["statuses"] == "a"
    assert [e["node_id"] for e in b.read()] == ["node-a"]


# -- pull ----------------------------------------------------------------------

def test_pull_pages_by_sequence_cursor(dev, store):
    sent = [make_event(lamport_clock=i + 1) for i in range(25)]
    for i in range(0, 25, 7):
        dev.push(sent[i:i + 7])
    ids = [e["event_id"] for e in sent]
    p1 = dev.pull(0, 10)
    assert p1["more"] is True and len(p1["rows"]) == 10
    assert [row[0] for row in p1["rows"]] == list(range(1, 11))
    assert p1["next"] == 10 and p1["chain"] == chain_of(ids[:10])
    # rows point into the batches they were pushed in: seqs 1-7 and 8-14
    assert [row[1:] for row in p1["rows"]] == [[0, i] for i in range(7)] + [[1, i] for i in range(3)]
    assert [e["event_id"] for e in open_page(p1, dev.team)] == ids[:10]
    events, cursor, pages = dev.pull_all(0, 10)
    assert pages == 3
    assert [e["seq"] for e in events] == list(range(1, 26))      # dense, in order
    assert [{k: v for k, v in e.items() if k != "seq"} for e in events] == sent
    assert cursor == 25 == store.head("team-a")
    # exactly `limit` left: no further page promised
    last = dev.pull(15, 10)
    assert len(last["rows"]) == 10 and last["more"] is False and last["next"] == 25
    assert last["chain"] == chain_of(ids)
    # at the head: nothing, cursor stays
    at_head = dev.pull(25, 10)
    assert at_head == {"team": "team-a", "rows": [], "batches": [], "next": 25, "more": False,
                       "chain": chain_of(ids)}
    assert dev.ok("hello", {})["head"] == 25


def test_pull_defaults(dev):
    dev.push([make_event() for _ in range(3)])
    body = check_page(dev.ok("pull", {}), 0)
    assert len(body["rows"]) == 3 and body["more"] is False and body["next"] == 3
    assert len(open_page(body, dev.team)) == 3


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
        assert [e["seq"] for e in events] == list(range(1, head + 1)), limit
        # a's own events come as their ids only, no body; b's are opened
        assert [e["event_id"] for e in events if not e.get("own")] == [
            i for w, i, _ in order if w == "b"]
        assert [e for e in events if e.get("own")] == [
            {"seq": s + 1, "event_id": i, "own": True} for s, (w, i, _) in enumerate(order)
            if w == "a"]
        assert cursor == head, limit
    # the last events are all a's own: the cursor still moves past them, and no
    # sealed batch travels for them
    page = a.pull(11, 1000, skip=("a", clock))
    assert page["rows"] == [[s, None, i] for s, (_, i, _) in enumerate(order, 1) if s > 11]
    assert page["batches"] == [] and "attachments" not in page
    assert page["next"] == head and page["more"] is False
    # own events stamped above `upto` (lost by a restored log) do come back
    events, cursor, _ = a.pull_all(0, 4, skip=("a", 7))
    assert [e["event_id"] for e in events if not e.get("own")] == [
        i for w, i, lam in order if w == "b" or lam > 7]
    # skip names the device's own node: b's node, or one a never pushed, skips nothing
    for node in ("b", "zz"):
        events, _, _ = a.pull_all(0, 1000, skip=(node, clock))
        assert not any(e.get("own") for e in events), node
    # without skip, everything
    events, cursor, _ = a.pull_all(0, 4)
    assert [e["event_id"] for e in events] == [i for _, i, _ in order] and cursor == head
    assert not any(e.get("own") for e in events)


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
    {"known": "x"}, {"known": {"seq": 0, "chain": "00"}},
])
def test_pull_rejects_bad_cursor_or_limit(dev, body):
    r, _ = dev.call("pull", body)
    assert_refused(r, 400, "malformed", sealed=True)


@pytest.mark.parametrize("after", [2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30])
def test_pull_with_huge_cursor_is_not_a_500(dev, after):
    r, body = dev.call("pull", {"after": after})
    if after < 2 ** 63:
        # a cursor past the head: this log is not the one the device read
        assert r.status_code == 200, r.sk_answer
        assert body["rows"] == [] and body["more"] is False and body["diverged"]
        assert body["next"] == after and "chain" not in body
    else:
        assert_refused(r, 400, "malformed")


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
    # a cursor at B's head never reaches into A's sequence; skipping its own
    # node, B is given only its own ids
    assert b.pull(2, 1000)["rows"] == []
    assert b.read(0, 5000, (b.node, 2 ** 62)) == [
        {"seq": i + 1, "event_id": e["event_id"], "own": True} for i, e in enumerate(b_events)]
    got, cursor, _ = a1.pull_all(0, 2)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in a_events]
    assert [e["seq"] for e in got] == list(range(1, 7)) and cursor == 6
    # B pushing an event_id that exists only in A does not touch A's event
    res = b.push([dict(a_events[0], payload={"b": "overwrite"})])[0]
    assert res["status"] in ("accepted", "rejected")
    assert a2.read(0, 1)[0]["payload"] == {"secret": "team A only"}
    assert all(e["payload"] != {"secret": "team A only"} for e in b.pull_all()[0])
    # nor does any of A's sealed content travel to B
    for page_after in (0, 1, 2):
        page = b.pull(page_after)
        assert all(bt["device"] == "b" for bt in page["batches"])


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
    ev = make_event(event_type="wire_needle_type", aggregate_id="wire-needle-aggregate",
                    payload={"note": "wire needle payload text"})
    body, atts = dev.push_request([ev])
    assert c.call("push", body, atts)["statuses"] == "a"
    page = c.pull(0, 10)
    assert open_page(page, dev.team) == [{**ev, "seq": 1}]
    secret_text = dev.api_key.split(".")[2]
    needles = [dev.api_key.encode(), secret_text.encode(), dev.secret, dev.master,
               base64.b64encode(dev.secret), dev.secret.hex().encode()]
    assert len(c.transport.sent) == 6
    for url, headers, body in c.transport.sent:
        blob = url.encode() + repr(sorted(headers.items())).encode() + body
        for needle in needles:
            assert needle not in blob
    # and what the server opens of the transport seal holds no event content:
    # only the manifest, and the batch sealed under the team key
    content = [b"wire_needle_type", b"wire-needle-aggregate", b"wire needle payload text",
               b"feature", b"2026-01-31"]
    for (url, _, request), (_, _, response) in zip(c.transport.sent[::2], c.transport.sent[1::2],
                                                   strict=True):
        endpoint = url.rsplit("/", 1)[1]
        _, nonce, asked = wire.open_request(dev.master, dev.key_id, endpoint, request)
        answered = wire.open_response(dev.master, dev.key_id, endpoint, nonce, response)
        seen = b"".join([jbytes({k: v for k, v in obj.items() if k != "attachments"}).lower()
                         + b"".join(obj.get("attachments", [])) for obj in (asked, answered)])
        for needle in content:
            assert needle not in seen, (endpoint, needle)
    assert ev["event_id"].encode() in seen   # sanity: the pull answer names the event


def _database_bytes(app, store, tmp_path):
    """Every byte the server's database holds: the SQLite files (and a backup),
    or every value of every row of every table on PostgreSQL."""
    if is_pg(app.db):
        tables = [t for (t,) in query(app.db, "SELECT table_name FROM information_schema.tables"
                                              " WHERE table_schema = current_schema()")]
        assert {"events", "batches", "keys", "devices"} <= set(tables)
        return b"".join(
            v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
            for t in tables for r in query(app.db, f'SELECT * FROM "{t}"') for v in r)
    db_files = [p for p in tmp_path.iterdir() if p.name.startswith("server.db")]
    assert any(p.name == "server.db" for p in db_files)
    store.backup(tmp_path / "backup.db")
    return b"".join(p.read_bytes() for p in [*db_files, tmp_path / "backup.db"])


def _columns(db, table):
    if is_pg(db):
        return {c for (c,) in query(db, "SELECT column_name FROM information_schema.columns"
                                        " WHERE table_schema = current_schema() AND"
                                        " table_name = ?", (table,))}
    return {c for (c,) in query(db, f"SELECT name FROM pragma_table_info('{table}')")}


def test_server_db_never_holds_an_api_key_or_event_content(tmp_path, app, client, store,
                                                           new_device):
    devs = [new_device(f"d{i}", "T") for i in range(3)]
    secret_events = [
        make_event(event_type="needle_type_one", aggregate_type="needle_agg_type",
                   aggregate_id="NEEDLE-AGGREGATE-1", node_id=devs[0].node,
                   payload={"needle_key_one": "needle payload text one"},
                   timestamp="2019-03-04T05:06:07.891234Z"),
        make_event(event_type="needle_type_two", aggregate_type="needle_agg_type",
                   aggregate_id="NEEDLE-AGGREGATE-2", node_id=devs[0].node,
                   payload={"needle_key_two": ["needle payload text two", 314159265]},
                   timestamp="2019-03-04T05:06:08Z"),
    ]
    devs[0].push(secret_events[:1])
    rotated = rotate(store, "d1")
    revoke(store, "d2")
    begin_epoch(store, "T", "d0", epoch=2)
    devs[0].push(secret_events[1:], epoch=2)
    # sanity: members read back every needle (the server holds the content sealed)
    got = [{k: v for k, v in e.items() if k != "seq"} for e in devs[0].read()]
    assert got == secret_events
    keys = [d.api_key for d in devs] + [rotated]
    data = _database_bytes(app, store, tmp_path)
    assert len(data) > 0
    for key in keys:
        key_id, secret = crypto.parse_api_key(key)
        secret_text = key.split(".")[2]
        assert key_id.encode() in data          # sanity: we are looking at the right bytes
        for needle in (key.encode(), secret_text.encode(), secret, secret.hex().encode(),
                       base64.b64encode(secret)):
            assert needle not in data
    # end-to-end encryption: the server keeps ids, nodes and clocks, never content
    for ev in secret_events:
        assert ev["event_id"].encode() in data   # sanity: the routing data is there
        for needle in (ev["event_type"], ev["aggregate_type"], ev["aggregate_id"],
                       *ev["payload"], json.dumps(ev["payload"]),
                       json.dumps(ev["payload"], separators=(",", ":")), ev["timestamp"]):
            for form in (needle.encode(), needle.encode("utf-16-le")):
                assert form not in data, needle
    for needle in (b"needle payload text one", b"needle payload text two", b"314159265"):
        assert needle not in data
    assert _columns(app.db, "events") == {"team", "seq", "event_id", "node_id", "lamport_clock",
                                          "batch", "idx", "chain", "device", "received"}
    assert _columns(app.db, "batches") == {"team", "batch", "epoch", "manifest", "sealed",
                                           "size", "device", "received"}
    assert store.stats()["legacy"] == 0
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
    blob, nonce = dev.seal("push", *dev.push_request([make_event()]))
    assert len(blob) < 600
    codes = _flip_all(dev, store, "push", blob, range(len(blob)))
    assert "bad_key" in codes
    assert count(store) == 0
    # no tampered copy burned the genuine request's nonce
    r = dev.send("push", blob)
    assert r.status_code == 200
    res = wire.open_response(dev.master, dev.key_id, "push", nonce, r.data)
    assert res["statuses"] == "a"
    assert count(store) == 1


def test_flipped_bytes_of_a_large_request_are_refused(dev, store):
    events = [make_event(payload={"n": i, "text": os.urandom(24).hex()}) for i in range(600)]
    blob, _ = dev.seal("push", *dev.push_request(events))
    n = len(blob)
    assert n > 20_000
    positions = sorted(set(range(40)) | set(range(40, n - 40, max(1, n // 150)))
                       | set(range(n - 40, n)))
    _flip_all(dev, store, "push", blob, positions)
    assert count(store) == 0
    assert dev.send("push", blob).status_code == 200
    assert count(store) == 600
    assert [e["event_id"] for e in dev.read()] == [e["event_id"] for e in events]


def test_truncated_and_extended_requests_are_refused(dev, store):
    blob, _ = dev.seal("push", *dev.push_request([make_event()]))
    for bad in (blob[:-1], blob[:-16], blob[:37], blob[:36], blob[:21], b"", blob + b"\0",
                blob[:21] + blob[22:]):
        assert_refused(dev.send("push", bad))
    assert count(store) == 0
    assert dev.send("push", blob).status_code == 200


def test_request_bound_to_key_and_endpoint(new_device, store):
    a, b = new_device("a", "T"), new_device("b", "T")
    body, atts = a.push_request([make_event()])
    blob, _ = a.seal("push", body, atts)
    # same bytes under another registered key id, or to another endpoint
    assert_refused(a.send("push", blob, headers=b.headers(), opener=b), 401, "bad_key")
    assert_refused(a.send("pull", blob), 401, "bad_key")
    assert_refused(a.send("hello", blob), 401, "bad_key")
    assert_refused(a.send("reseal", blob), 401, "bad_key")
    # sealed for b's key id but with a's key
    blob2, _ = a.seal_plain("push", frame(gz(jbytes(body)), atts), key_id=b.key_id)
    assert_refused(a.send("push", blob2, headers=b.headers(), opener=b), 401, "bad_key")
    assert count(store) == 0
    assert a.send("push", blob).status_code == 200
    assert count(store) == 1


@pytest.mark.parametrize("offset_ms", [-10 * 60 * 1000, 10 * 60 * 1000, -(wire.MAX_CLOCK_SKEW_MS + 5000)])
def test_stale_request_is_refused(dev, store, offset_ms):
    ts = int(time.time() * 1000) + offset_ms
    blob, _ = dev.seal("push", *dev.push_request([make_event()]), ts=ts)
    assert_refused(dev.send("push", blob), 400, "stale")
    assert count(store) == 0
    blob, _ = dev.seal("hello", {}, ts=ts)
    assert_refused(dev.send("hello", blob), 400, "stale")


def test_replayed_request_is_refused_and_changes_nothing(dev, store):
    blob, _ = dev.seal("push", *dev.push_request([make_event(), make_event()]))
    assert dev.send("push", blob).status_code == 200
    assert count(store) == 2
    assert_refused(dev.send("push", blob), 400, "replay")
    assert count(store) == 2
    # a replay of a request that was refused for its content is still a replay
    body, atts = dev.push_request([make_event()])
    for bad_body, bad_atts in (({**body, "events": "nope"}, atts), (body, []),
                               ({**body, "epoch": "1"}, atts),
                               ({**body, "known": {"seq": "x"}}, atts)):
        blob, _ = dev.seal("push", bad_body, bad_atts)
        assert_refused(dev.send("push", blob), 400, "malformed")
        assert_refused(dev.send("push", blob), 400, "replay")
    # and so is one answered rekey or node_taken (it stored nothing; it was seen)
    blob, _ = dev.seal("push", *dev.push_request([make_event()], epoch=2))
    assert "rekey" in dev.send("push", blob).sk_answer
    assert_refused(dev.send("push", blob), 400, "replay")
    for endpoint, body, status in (("hello", {}, 200), ("pull", {"after": 0}, 200),
                                   ("pull", {"after": "x"}, 400), ("keys", {}, 200)):
        blob, _ = dev.seal(endpoint, body)
        assert dev.send(endpoint, blob).status_code == status, endpoint
        assert_refused(dev.send(endpoint, blob), 400, "replay")
    assert count(store) == 2


def test_same_nonce_new_request_is_a_replay(dev, store):
    nonce = os.urandom(12)
    (body1, atts1), (body2, atts2) = (dev.push_request([make_event()]),
                                      dev.push_request([make_event()]))
    blob1, _ = dev.seal_plain("push", frame(gz(jbytes(body1)), atts1), nonce=nonce)
    blob2, _ = dev.seal_plain("push", frame(gz(jbytes(body2)), atts2), nonce=nonce)
    assert dev.send("push", blob1).status_code == 200
    assert_refused(dev.send("push", blob2), 400, "replay")
    assert count(store) == 1


# -- malformed bodies ----------------------------------------------------------

def _trailing(raw):
    return gz(raw) + b"garbage"


GOOD_GZ = gz(b'{"after": 0}')


@pytest.mark.parametrize("plain", [
    # the framing
    pytest.param(b'{"events": []}', id="unframed-json"),
    pytest.param(GOOD_GZ, id="unframed-gzip"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\0" * 7, id="too-short-to-frame"),
    pytest.param(struct.pack(">II", 0, len(GOOD_GZ) + 1) + GOOD_GZ, id="length-past-end"),
    pytest.param(struct.pack(">II", wire.MAX_BATCH + 1, len(GOOD_GZ)) + GOOD_GZ
                 + struct.pack(">I", 0) * (wire.MAX_BATCH + 1), id="too-many-attachments"),
    pytest.param(struct.pack(">II", 1, len(GOOD_GZ)) + GOOD_GZ, id="attachment-missing"),
    pytest.param(struct.pack(">II", 1, len(GOOD_GZ)) + GOOD_GZ + b"\0\0", id="attachment-cut-length"),
    pytest.param(struct.pack(">II", 1, len(GOOD_GZ)) + GOOD_GZ + struct.pack(">I", 10) + b"abc",
                 id="attachment-past-end"),
    pytest.param(frame(GOOD_GZ) + b"x", id="trailing-after-json"),
    pytest.param(frame(GOOD_GZ, [b"abc"]) + b"x", id="trailing-after-attachments"),
    pytest.param(frame(gz(b'{"attachments": [], "after": 0}')), id="attachments-field"),
    # the gzip and JSON inside it
    pytest.param(frame(b'{"events": []}'), id="not-gzip"),
    pytest.param(frame(gz(b"not json at all")), id="gzip-not-json"),
    pytest.param(frame(gz(b"[1, 2, 3]")), id="json-array"),
    pytest.param(frame(gz(b'"text"')), id="json-string"),
    pytest.param(frame(gz(b"null")), id="json-null"),
    pytest.param(frame(gz(b'{"events": [}')), id="broken-json"),
    pytest.param(frame(gz(b'{"events": []}')[:-5]), id="truncated-gzip"),
    pytest.param(frame(_trailing(b'{"events": []}')), id="trailing-bytes"),
    pytest.param(frame(gz(b'{"events": ["\xff\xfe"]}')), id="not-utf8"),
    pytest.param(frame(gz(b"")), id="empty-plaintext"),
    pytest.param(frame(b""), id="empty-gzip"),
    pytest.param(frame(gz(b'{"events": [' + b"1" * 5000 + b"]}")), id="int-too-long"),
    pytest.param(frame(gz(b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
                 id="deep-nesting"),
    pytest.param(frame(gz(b'{"events": [' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]}")),
                 id="deep-objects"),
    pytest.param(frame(gz(b'{"events": [' + b"[]," * 310_000 + b"[]]}")), id="too-many-arrays"),
])
def test_malformed_sealed_bodies_are_refused(dev, store, plain):
    """Correctly sealed, but what is inside is not a framed body: refused, sealed,
    on every endpoint (hello too: every body is read before it is served)."""
    for endpoint in ("push", "pull", "hello", "keys", "reseal"):
        blob, _ = dev.seal_plain(endpoint, plain)
        r = dev.send(endpoint, blob)
        assert_refused(r, sealed=True)
        assert r.status_code in (400, 413), (endpoint, r.sk_answer)
    assert count(store) == 0


@pytest.mark.parametrize("blob", [b"", b"\x01", b"x" * 36, b"\x02" + os.urandom(60),
                                  os.urandom(200), b"{}", b'{"events": []}'],
                         ids=["empty", "one", "x36", "v2-random", "random", "obj", "events"])
def test_unsealed_garbage_is_refused(dev, store, blob):
    r = dev.send("push", blob)
    assert_refused(r)
    assert count(store) == 0


def _surrogate_in(where):
    def change(body):
        if where == "event_id":
            body["events"][1][0] = "\ud800"
        elif where == "node_id":
            body["events"][1][1] = "x\udfff"
        elif where == "node_id_alone":
            body["events"][1][1] = "\udc00"
        elif where == "writer":
            body["writer"] = {"seq": 0, "chain": "\ud800" * 64}
        elif where == "known":
            body["known"] = {"seq": 0, "chain": "\ud800" * 64}
        elif where == "epoch":
            body["epoch"] = "\ud800"
    return change


@pytest.mark.parametrize("where", ["event_id", "node_id", "node_id_alone", "writer", "known",
                                   "epoch"])
def test_lone_surrogates_in_a_push_are_refused_not_500(dev, store, where):
    """A lone surrogate is not text: where the server reads one (the manifest and
    the points it is given) the push is refused as malformed, whole, never a 500."""
    good = make_event()
    body, atts = dev.push_request([good, make_event()])
    _surrogate_in(where)(body)
    r = dev.send("push", dev.seal_plain("push", frame(gz(jbytes(body)), atts))[0])
    assert r.status_code != 500, r.data[:300]
    assert_refused(r, 400, "malformed", sealed=True)
    assert count(store) == 0
    assert dev.push([good])[0]["status"] == "accepted"     # and the server is fine


def test_lone_surrogates_where_the_server_does_not_look(dev, store):
    """A field the server does not read, or a skip node that matches nothing, may
    hold anything: it is never a 500."""
    body, atts = dev.push_request([make_event()])
    body["x"] = "\ud800"
    r = dev.send("push", dev.seal_plain("push", frame(gz(jbytes(body)), atts))[0])
    assert r.status_code == 200 and r.sk_answer["statuses"] == "a"
    r = dev.send("pull", dev.seal_plain("pull", frame(gz(jbytes(
        {"after": 0, "skip": {"node_id": "\ud800", "upto": 5}}))))[0])
    assert r.status_code != 500, r.data[:300]
    if r.status_code == 200:
        assert [row[0] for row in r.sk_answer["rows"]] == [1]
    else:
        assert_refused(r, 400, "malformed", sealed=True)
    assert count(store) == 1


@pytest.mark.parametrize("depth", [50, 400, 800, 950])
def test_deep_payload_never_poisons_pull(dev, store, depth, request):
    """The server never parses sealed content: a payload nested deeply (which the
    server cannot see) is stored and served as it was sealed, and opens."""
    # this test's own json calls need the stack (a pytest-xdist worker's is deeper)
    limit = sys.getrecursionlimit()
    request.addfinalizer(lambda: sys.setrecursionlimit(limit))
    sys.setrecursionlimit(max(limit, 3000))
    payload = json.loads('{"a":' * depth + "1" + "}" * depth)
    ev = make_event(payload=payload)
    body, atts = dev.push_request([ev])
    blob, nonce = dev.seal("push", body, atts)
    r = dev.send("push", blob)
    assert r.status_code == 200, r.data[:300]
    res = results(wire.open_response(dev.master, dev.key_id, "push", nonce, r.data), [ev])[0]
    assert res == {"event_id": ev["event_id"], "status": "accepted"}
    page = dev.pull()
    assert page["attachments"] == atts        # byte for byte as it was sealed
    got = open_page(page, dev.team)
    assert len(got) == 1 and got[0]["event_id"] == ev["event_id"]
    assert json.dumps(got[0]["payload"]) == json.dumps(payload)


# -- headers, keys, devices ----------------------------------------------------

def _blob(dev):
    return dev.seal("push", *dev.push_request([make_event()]))[0]


def test_protocol_version_mismatch_names_both_versions(dev, store):
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: "1"})),
                         400, "protocol_version")
    assert "'1'" in err["message"] and str(PROTOCOL_VERSION) in err["message"]
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: "99"})),
                         400, "protocol_version")
    assert "99" in err["message"] and str(PROTOCOL_VERSION) in err["message"]
    err = assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: None})),
                         400, "protocol_version")
    assert str(PROTOCOL_VERSION) in err["message"]
    for value in ("", "abc", "2.0", "02", "+2", " 1", "3", "2" * 500):
        assert_refused(dev.send("push", _blob(dev), dev.headers(**{wire.PROTOCOL_HEADER: value})),
                       400, "protocol_version", sealed=False)
    assert count(store) == 0


@pytest.mark.parametrize("key_id", [None, "", "abc", "0123456789ABCDEF", "0123456789abcdeg",
                                    "0123456789abcdef0", "../../etc/passwd", "0" * 16,
                                    "'; DROP TABLE keys; --"])
def test_bad_or_unknown_key_id(dev, store, key_id):
    r = dev.send("push", _blob(dev), dev.headers(**{wire.KEY_HEADER: key_id}))
    assert_refused(r, 401, "unknown_key", sealed=False)
    assert count(store) == 0
    assert store.get_key(dev.key_id) is not None


def test_revoked_device_is_refused(new_device, store):
    a, b = new_device("a", "T"), new_device("b", "T")
    a.push([make_event()])
    revoke(store, "a")
    for endpoint, (body, atts) in (("hello", ({}, [])),
                                   ("push", a.push_request([make_event()])),
                                   ("pull", ({}, [])), ("keys", ({}, []))):
        r, _ = a.call(endpoint, body, atts)
        err = assert_refused(r, 401, "revoked", sealed=True)
        assert "a" in err["message"]
    assert count(store) == 1
    # the team writes nothing more until a member begins the next key epoch,
    # which the revoked device never gets
    assert b.push_answer([make_event()]) == {"rekey": {"epoch": 1, "rotate": True}, "head": 1,
                                             "team": "T"}
    assert count(store) == 1
    begin_epoch(store, "T", "b", epoch=2)
    assert b.push([make_event()], epoch=2)[0]["status"] == "accepted"    # others unaffected
    assert count(store) == 2


def test_rotated_out_key_is_refused_and_new_key_works(new_device, client, store):
    old = new_device("a", "T")
    old.push([make_event()])
    new = Device(client, "a", "T", rotate(store, "a"))
    assert new.key_id != old.key_id
    r, _ = old.call("push", *old.push_request([make_event()]))
    assert_refused(r, 401, "rotated", sealed=True)
    assert count(store) == 1
    # the old key may have leaked: nothing is written until a new key epoch
    assert "rekey" in new.push_answer([make_event()])
    begin_epoch(store, "T", "a", epoch=2)
    assert new.push([make_event()], epoch=2)[0]["status"] == "accepted"
    assert [e["seq"] for e in new.read()] == [1, 2]
    # rotating again retires the second key too
    newer = Device(client, "a", "T", rotate(store, "a"))
    assert_refused(new.call("hello", {})[0], 401, "rotated")
    assert newer.ok("hello", {})["device"] == "a"


def test_old_key_cannot_open_a_request_for_the_new_key(new_device, client, store):
    old = new_device("a", "T")
    new = Device(client, "a", "T", rotate(store, "a"))
    body, atts = old.push_request([make_event()])
    blob, _ = old.seal_plain("push", frame(gz(jbytes(body)), atts), key_id=new.key_id)
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
    blob, _ = dev.seal("push", *dev.push_request([make_event()]))
    blob = blob + os.urandom(wire.MAX_BODY - len(blob))
    assert_refused(dev.send("push", blob), 401, "bad_key")


def test_a_large_sealed_batch_travels(dev, store):
    """A batch the server cannot look into is stored and served whole, up to the
    body's limit: a big payload of random text (it does not compress)."""
    ev = make_event(payload={"blob": base64.b64encode(os.urandom(180 * 1024)).decode()})
    body, atts = dev.push_request([ev])
    assert len(atts[0]) > 180 * 1024
    assert dev.ok("push", body, atts)["statuses"] == "a"
    page = dev.pull()
    assert page["attachments"] == atts
    assert open_page(page, dev.team)[0]["payload"] == ev["payload"]


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
    blob, _ = dev.seal_plain(endpoint, frame(bomb, [b"\x02" + os.urandom(40)]))
    r = dev.send(endpoint, blob)
    assert_refused(r, 413, "too_large", sealed=True)
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
    st.uuids().map(lambda u: str(u).upper()),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.", min_size=0, max_size=70),
    st.integers(min_value=-2, max_value=2 ** 64),
    st.sampled_from(["\ud800", "x\udfff", "", "a\tb", "a\nb", "a\x00b", "n" * 64, "n" * 65,
                     2 ** 63 - 1, 2 ** 63, 0, 1.0, True]),
)
def fresh_entry():
    """A manifest entry no earlier example used: a new id, node-a, a new clock."""
    return [str(uuid.uuid4()), "node-a", next(_clock)]


id_values = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                      st.text(max_size=40), json_values,
                      st.sampled_from(["\ud800", "0190a8f0-0000-7000-8000-00000000000\ud800",
                                       "0190a8f0-0000-7000-8000-000000000001\n", ""]))
node_values = st.one_of(st.text(max_size=70), json_values,
                        st.sampled_from(["", "a\tb", "a\nb", "a\x00b", "n" * 64, "n" * 65,
                                         "\ud800", "x\udfff", "\udc00y", "nöde-ü", "\U0001f600"]))
clock_values = st.one_of(st.integers(-2, 2 ** 64), json_values,
                         st.sampled_from([0, 1, 2, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 1.0, True, "7"]))
KNOWN = [None, {"seq": 0, "chain": "00" * 32}, {"seq": 2 ** 62, "chain": "00" * 32},
         "x", {"seq": 0}, {"seq": -1, "chain": "00" * 32}, {"seq": 0, "chain": "0"}]
NONE = object()
PARTS = ("entry", "events", "epoch", "writer", "relay", "known", "attachments")


@st.composite
def push_cases(draw):
    """(body, attachments) of a push, mostly well formed: about a third of them
    break one or two of its parts (an entry of the manifest, the manifest, the
    epoch, the writer point, relay, known, the attachments) at random."""
    broken = draw(st.one_of(st.just(frozenset()), st.just(frozenset()),
                            st.frozensets(st.sampled_from(PARTS), min_size=1, max_size=2)))
    n = draw(st.integers(1, 5))
    events = [fresh_entry() for _ in range(n)]
    if "entry" in broken:
        i, how = draw(st.integers(0, n - 1)), draw(st.sampled_from(
            ["id", "node", "node", "clock", "drop", "extra", "event", "json"]))
        if how == "id":
            events[i][0] = draw(id_values)
        elif how == "node":
            events[i][1] = draw(node_values)
        elif how == "clock":
            events[i][2] = draw(clock_values)
        elif how == "drop":
            del events[i][draw(st.integers(0, 2))]
        elif how == "extra":
            events[i].append(draw(json_values))
        elif how == "event":
            events[i] = make_event()                   # a protocol 1 event
        else:
            events[i] = draw(json_values)
    body = {"events": draw(st.one_of(st.just([]), json_values)) if "events" in broken else events}
    epoch = (draw(st.one_of(st.just(NONE), field_values)) if "epoch" in broken
             else draw(st.sampled_from([1, 1, 1, 2])))
    if epoch is not NONE:
        body["epoch"] = epoch
    if "writer" in broken:
        body["writer"] = draw(st.one_of(json_values, st.fixed_dictionaries(
            {"seq": field_values, "chain": st.one_of(st.just("ab" * 32), field_values)})))
    else:
        writer = draw(st.sampled_from([NONE, None, {"seq": 0, "chain": ""},
                                       {"seq": 3, "chain": "ab" * 32}]))
        if writer is not NONE:
            body["writer"] = writer
    if "relay" in broken:
        body["relay"] = draw(st.one_of(json_values, st.lists(
            st.one_of(st.integers(-2, 9), field_values), min_size=1, max_size=3)))
    elif draw(st.booleans()):
        body["relay"] = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    if "known" in broken:
        body["known"] = draw(st.sampled_from(KNOWN[3:]))
    else:
        known = draw(st.sampled_from([NONE, *KNOWN[:3]]))
        if known is not NONE:
            body["known"] = known
    attachments = (draw(st.lists(st.one_of(st.just("genuine"), st.binary(max_size=64)),
                                 max_size=3)) if "attachments" in broken else ["genuine"])
    return body, attachments


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _text(value):
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _uint(value, end=2 ** 63):
    return type(value) is int and 0 <= value < end


def entry_ok(e):
    """PROTOCOL.md 4 and the brief of the server: [event_id (canonical lowercase
    UUID), node_id (1-64 characters, no tab, newline or NUL), clock 1..2^63-1]."""
    return (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
            and _UUID.fullmatch(e[0]) is not None and _text(e[1]) and 1 <= len(e[1]) <= 64
            and not {"\t", "\n", "\x00"} & set(e[1]) and _uint(e[2]) and e[2] >= 1)


def push_ok(body, attachments):
    """Whether a push body is well formed, as PROTOCOL.md 5 describes one."""
    events = body.get("events")
    if not isinstance(events, list) or not events or not all(map(entry_ok, events)):
        return False
    epoch, writer = body.get("epoch", NONE), body.get("writer")
    if not (type(epoch) is int and 1 <= epoch < 2 ** 31):
        return False
    if writer is not None and not (isinstance(writer, dict) and _uint(writer.get("seq")) and (
            writer.get("chain", "") == "" or (isinstance(writer.get("chain"), str) and re.fullmatch(
                "[0-9a-f]{64}", writer["chain"])))):
        return False
    relay = body.get("relay", [])
    if not isinstance(relay, list) or not all(type(i) is int and 0 <= i < len(events)
                                              for i in relay):
        return False
    return body.get("known") in (None, KNOWN[1], KNOWN[2]) and len(attachments) == 1


def _check_answer(dev, store, endpoint, r, nonce, before):
    assert r.status_code != 500 and r.status_code < 500, (r.status_code, r.data[:300])
    if r.status_code == 200:
        body = wire.open_response(dev.master, dev.key_id, endpoint, nonce, r.data)
        accepted = body.get("statuses", "").count("a")
        assert count(store) == before + accepted
        return body
    assert_refused(r)
    assert count(store) == before
    return None


@HYPO
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_body(dev, store, data):
    before = count(store)
    for endpoint in ("push", "pull", "keys"):
        assert_refused(dev.send(endpoint, data))
    assert count(store) == before


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@HYPO
@given(proto=st.one_of(st.none(), header_text, st.just("1"), st.just(str(PROTOCOL_VERSION))),
       key=st.one_of(st.none(), header_text, st.text("0123456789abcdef", min_size=16, max_size=16)),
       extra=st.dictionaries(st.sampled_from(["Content-Type", "Content-Encoding", "X-Forwarded-For",
                                              "Transfer-Encoding-X", "X-SK-Other"]),
                             header_text, max_size=3))
def test_fuzz_random_headers(dev, store, proto, key, extra):
    before = count(store)
    blob, nonce = dev.seal("push", *dev.push_request([make_event()]))
    headers = dict(extra)
    if proto is not None:
        headers[wire.PROTOCOL_HEADER] = proto
    if key is not None:
        headers[wire.KEY_HEADER] = key
    r = dev.send("push", blob, headers=headers)
    body = _check_answer(dev, store, "push", r, nonce, before)
    if body is not None:    # only the genuine headers can succeed
        assert proto == str(PROTOCOL_VERSION) and key == dev.key_id
        assert body["statuses"] == "a"


@HYPO
@example(case=({"events": [["0190a8f0-0000-7000-8000-0000000000aa", "x\udfff", 1]], "epoch": 1},
               ["genuine"]))
@given(case=push_cases())
def test_fuzz_sealed_push_manifests(dev, store, case):
    """Pushes of every shape: manifests, epochs, writer points, relays, known
    points, attachments. A well-formed one is answered (results for every event
    of its manifest, or why nothing was stored); anything else is refused; never
    a 500, and the log grows by exactly the events accepted."""
    body, attachments = case
    genuine = sealed_batch(dev.team, [make_event()]).sealed
    attachments = [genuine if a == "genuine" else a for a in attachments]
    before = count(store)
    blob, nonce = dev.seal_plain("push", frame(gz(jbytes(body)), attachments))
    r = dev.send("push", blob)
    got = _check_answer(dev, store, "push", r, nonce, before)
    if not push_ok(body, attachments):
        assert got is None and r.status_code == 400, (body, got)
        return
    writer = body.get("writer") or {"seq": 0}
    if body.get("known") != KNOWN[2] and writer["seq"] != 0:   # a writer point this log
        assert got is None and r.status_code == 400, (body, got)   # does not hold: refused
        assert "writer point" in r.sk_answer["error"]["message"], r.sk_answer
        return
    assert got is not None, (body, r.sk_answer)
    assert got["team"] == dev.team and got["head"] == count(store)
    if body.get("known") == KNOWN[2]:   # a point this log never reached
        assert set(got) == {"diverged", "head", "team"} and got["diverged"]
    elif body["epoch"] != 1:
        assert got["rekey"] == {"epoch": 1, "rotate": False}, got
    elif "node_taken" in got:           # a (node, clock) stamp that an earlier example stored
        assert count(store) == before and got["node_taken"]["reason"]
        assert got["node_taken"]["node_id"] in {e[1] for e in body["events"]}
    else:
        assert len(got["statuses"]) == len(body["events"])
        for res in results(got):
            assert res["status"] in ("accepted", "duplicate", "rejected")
            if res["status"] == "rejected":
                assert res["reason"]


@HYPO
@given(body=st.one_of(json_values,
                      st.dictionaries(st.sampled_from(["events", "epoch", "writer", "relay",
                                                       "known", "after", "limit", "skip",
                                                       "first", "identity", "grants", "x"]),
                                      st.one_of(json_values, field_values, st.lists(
                                          st.one_of(st.builds(fresh_entry), json_values),
                                          max_size=4)),
                                      max_size=5)),
       attachments=st.lists(st.binary(max_size=64), max_size=2),
       endpoint=st.sampled_from(["push", "pull", "hello", "keys", "reseal", "ws-token"]))
def test_fuzz_sealed_random_bodies(dev, store, body, attachments, endpoint):
    before = count(store)
    blob, nonce = dev.seal_plain(endpoint, frame(gz(jbytes(body)), attachments))
    r = dev.send(endpoint, blob)
    got = _check_answer(dev, store, endpoint, r, nonce, before)
    if got is not None and endpoint == "pull":
        check_page(got, body.get("after", 0))
        assert isinstance(got["rows"], list) and isinstance(got["more"], bool)
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
    clocks = [e["lamport_clock"] for e in dev.read()]
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
        return
    assert got is not None
    check_page(got, after)
    if after > 5:    # past the head: not the log this device read
        assert got["diverged"] and got["rows"] == [] and got["next"] == after
        return
    expect = list(range(after + 1, 6))[:limit]
    assert [row[0] for row in got["rows"]] == expect
    assert got["next"] == (expect[-1] if expect else after)
    assert got["more"] == (after + limit < 5)
    events = open_page(got, dev.team)
    if skip is not None and skip["node_id"] == "node-a":
        # every stored event is node-a's, pushed by this device: those stamped at
        # or below upto come as their ids only
        assert [e.get("own", False) for e in events] == [
            clocks[s - 1] <= skip["upto"] for s in expect]
    else:
        assert not any(e.get("own") for e in events)


@HYPO
@given(cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_framed_plaintext(dev, store, cuts):
    """Correctly sealed, but the framed plaintext (framing, gzip, manifest, the
    sealed batch) is corrupted at random places."""
    body, atts = dev.push_request([make_event(), make_event()])
    plain = bytearray(frame(gz(jbytes(body)), atts))
    for pos, val in cuts:
        plain[pos % len(plain)] = val
    before = count(store)
    blob, nonce = dev.seal_plain("push", bytes(plain))
    r = dev.send("push", blob)
    _check_answer(dev, store, "push", r, nonce, before)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("where", ["clock", "epoch", "extra"])
def test_non_json_constants_refuse_the_whole_body(dev, store, constant, where):
    before = count(store)
    body, atts = dev.push_request([make_event()])
    entry = body["events"][0]
    raw = {"clock": b'{"epoch": 1, "events": [["%s", "%s", ' % (entry[0].encode(), entry[1].encode())
                    + constant + b"]]}",
           "epoch": b'{"epoch": ' + constant + b', "events": ' + jbytes(body["events"]) + b"}",
           "extra": b'{"epoch": 1, "x": ' + constant + b', "events": ' + jbytes(body["events"])
                    + b"}"}[where]
    blob, _ = dev.seal_plain("push", frame(gz(raw), atts))
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
        begin_epoch(store, "T", name)
        revoke(store, name)
        _, other = crypto.new_api_key()
        wrong_key = f"sk1.{real.key_id}.{other.split('.')[2]}"
        assert wrong_key != real.api_key
        imp = Device(client, name, "T", wrong_key)
        assert imp.key_id == real.key_id
        for endpoint, (body, atts) in (("hello", ({}, [])),
                                       ("push", real.push_request([make_event()])),
                                       ("pull", ({"after": 0, "limit": 10}, [])),
                                       ("keys", ({}, []))):
            blob, _ = imp.seal(endpoint, body, atts)
            r = imp.send(endpoint, blob, opener=real)
            err = assert_refused(r, 401, "bad_key", sealed=True)
            assert name not in err["message"], err
            assert "revoked" not in err["message"].lower(), err
            assert name.encode() not in r.get_data()
            with pytest.raises(crypto.CryptoError):   # and the impostor cannot open even that
                wire.open_response(imp.master, imp.key_id, endpoint, crypto.peek(blob)[1],
                                   r.get_data())
            r, _ = real.call(endpoint, body, atts)
            err = assert_refused(r, 401, "revoked", sealed=True)
            assert name in err["message"]
        assert store.stats()["events"] == 0
    finally:
        app.extensions["sk_store"].close()


def test_keys_and_reseal_refuse_what_the_store_cannot_take_as_400_not_500(dev):
    """An approval naming its device by a list, and a reseal's 'first' past a
    64-bit integer, are malformed requests (found from outside as 500s)."""
    r, _ = dev.call("keys", {"approvals": [{"device": ["x"], "identity": "00" * 32,
                                            "record": "00" * 32}]})
    assert_refused(r, 400, "malformed")
    r, _ = dev.call("reseal", {"first": 2 ** 70, "epoch": 1, "events": [], "writer": None})
    assert_refused(r, 400, "malformed")
