"""sk.event: the field rules for new and stamped events, NDJSON parsing, and the
never-sync rules."""

import json
import uuid

import pytest

from sk import event
from sk.event import EventError, NeverSync, check_new, check_stamped, parse_ndjson

EID = "0f8fad5b-d9cb-469f-a165-70867728950e"
TS = "2026-01-31T12:00:00Z"


def new(**kw):
    ev = {"event_type": "feature_created", "aggregate_type": "feature", "aggregate_id": "F-1"}
    ev.update(kw)
    return ev


def stamped(**kw):
    ev = {"event_id": EID, "event_type": "feature_created", "aggregate_type": "feature",
          "aggregate_id": "F-1", "lamport_clock": 5, "node_id": "node-a",
          "payload": {"title": "x"}, "timestamp": TS}
    ev.update(kw)
    return ev


# -- check_new -------------------------------------------------------------------------
def test_check_new_minimal_is_normalised():
    assert check_new(new()) == {
        "event_type": "feature_created", "aggregate_type": "feature", "aggregate_id": "F-1",
        "payload": "{}", "event_id": None, "timestamp": None}


def test_check_new_keeps_optional_fields_and_compacts_payload():
    out = check_new(new(payload={"title": "Ünïcode", "n": [1, 2]}, event_id=EID, timestamp=TS))
    assert out["payload"] == '{"title":"Ünïcode","n":[1,2]}'
    assert out["event_id"] == EID
    assert out["timestamp"] == TS


def test_check_new_allows_null_stamp_fields():
    assert check_new(new(lamport_clock=None, node_id=None, event_id=None))["event_id"] is None


@pytest.mark.parametrize("value", [
    "a", "x" * 64, "feature.created", "wp_status_changed", "0_9.z",
])
def test_check_new_accepts_valid_types(value):
    assert check_new(new(event_type=value, aggregate_type=value))["event_type"] == value


@pytest.mark.parametrize("ev,field", [
    (new(event_type="Feature_created"), "event_type"),
    (new(event_type="feature-created"), "event_type"),
    (new(event_type="feature created"), "event_type"),
    (new(event_type=""), "event_type"),
    (new(event_type="x" * 65), "event_type"),
    (new(event_type=7), "event_type"),
    (new(event_type="é"), "event_type"),
    (new(aggregate_type="Feature"), "aggregate_type"),
    (new(aggregate_type=None), "aggregate_type"),
    (new(aggregate_id=""), "aggregate_id"),
    (new(aggregate_id="x" * 257), "aggregate_id"),
    (new(aggregate_id=12), "aggregate_id"),
    (new(payload=[1, 2]), "payload"),
    (new(payload="{}"), "payload"),
    (new(payload=None), "payload"),
    (new(event_id="0F8FAD5B-D9CB-469F-A165-70867728950E"), "event_id"),
    (new(event_id="{0f8fad5b-d9cb-469f-a165-70867728950e}"), "event_id"),
    (new(event_id="urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e"), "event_id"),
    (new(event_id="0f8fad5bd9cb469fa16570867728950e"), "event_id"),
    (new(event_id="not-a-uuid"), "event_id"),
    (new(event_id=1234), "event_id"),
    (new(timestamp="2026-01-31 12:00:00Z"), "timestamp"),
    (new(timestamp="2026-01-31T12:00:00"), "timestamp"),
    (new(timestamp="yesterday"), "timestamp"),
    (new(timestamp=1767225600), "timestamp"),
    (new(lamport_clock=3), "lamport_clock"),
    (new(node_id="me"), "node_id"),
    (new(colour="red"), "colour"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_check_new_rejects_and_names_the_field(ev, field):
    with pytest.raises(EventError, match=field):
        check_new(ev)


@pytest.mark.parametrize("field,value", [
    ("event_type", "feature_created\n"),
    ("aggregate_type", "feature\n"),
    ("timestamp", TS + "\n"),
])
def test_trailing_newline_is_refused(field, value):
    """The patterns end in '$', which also matches before a final newline."""
    with pytest.raises(EventError, match=field):
        check_new(new(**{field: value}))
    stamped_ev = stamped(**{field: value})
    with pytest.raises(EventError, match=field):
        check_stamped(stamped_ev)


@pytest.mark.parametrize("missing", ["event_type", "aggregate_type", "aggregate_id"])
def test_check_new_names_a_missing_field(missing):
    ev = new()
    del ev[missing]
    with pytest.raises(EventError, match=f"missing {missing}"):
        check_new(ev)


@pytest.mark.parametrize("value", [None, [], "x", 5])
def test_check_new_refuses_non_objects(value):
    with pytest.raises(EventError, match="JSON object"):
        check_new(value)


def test_aggregate_id_length_boundaries():
    assert check_new(new(aggregate_id="x"))["aggregate_id"] == "x"
    assert check_new(new(aggregate_id="é" * 256))["aggregate_id"] == "é" * 256


@pytest.mark.parametrize("ts", [
    "2026-01-31T12:00:00Z", "2026-01-31T12:00:00.123Z", "2026-01-31T12:00:00.123456789Z",
    "2026-01-31T12:00:00+00:00",
])
def test_valid_timestamps(ts):
    assert event.check_timestamp(ts) == ts


@pytest.mark.parametrize("ts", [
    "2026-01-31T12:00:00+02:00", "2026-01-31T12:00:00-05:30",   # UTC only
    "2026-13-45T99:00:00Z", "2026-02-30T12:00:00Z", "2026-01-31T24:00:00Z",
    "2026-01-31 12:00:00Z", "2026-01-31T12:00Z", "yesterday",
])
def test_invalid_timestamps(ts):
    with pytest.raises(event.EventError):
        event.check_timestamp(ts)


# -- payload size and content ------------------------------------------------------------
def test_payload_limit_is_256_kib_encoded():
    limit = event.MAX_PAYLOAD_BYTES
    assert limit == 256 * 1024
    overhead = len('{"a":""}')
    exact = {"a": "x" * (limit - overhead)}
    assert len(event.check_payload(exact).encode()) == limit
    with pytest.raises(EventError, match="over the"):
        event.check_payload({"a": "x" * (limit - overhead + 1)})


def test_payload_limit_counts_utf8_bytes_not_characters():
    payload = {"a": "é" * (event.MAX_PAYLOAD_BYTES // 2)}   # under the limit in characters
    assert len(json.dumps(payload, ensure_ascii=False)) < event.MAX_PAYLOAD_BYTES
    with pytest.raises(EventError, match="bytes encoded"):
        check_new(new(payload=payload))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_ndjson_payload_must_be_real_json(literal):
    """NaN/Infinity are not JSON (RFC 8259): the log, sk-log's NDJSON and the wire
    must only ever carry JSON that any parser reads."""
    line = json.dumps(new(payload={})).replace('"payload": {}', f'"payload": {{"x": {literal}}}')
    assert literal in line
    with pytest.raises(EventError, match="line 1"):
        list(parse_ndjson([line]))


@pytest.mark.parametrize("field", ["payload", "aggregate_id"])
def test_lone_surrogate_is_an_event_error_not_a_crash(field):
    """'\\ud800' is valid JSON escape syntax but not encodable text; it must be refused
    with an EventError naming the line (sk-append exit 2), never a UnicodeEncodeError."""
    value = {"x": "\\ud800"} if field == "payload" else "\\ud800"
    ev = new(**{field: "PLACEHOLDER"})
    line = json.dumps(ev).replace('"PLACEHOLDER"', json.dumps(value).replace("\\\\", "\\"))
    assert "\\ud800" in line
    with pytest.raises(EventError, match="line 1"):
        list(parse_ndjson([line]))


# -- check_stamped -----------------------------------------------------------------------
def test_check_stamped_returns_fields_in_order():
    row = check_stamped(stamped())
    assert row == (EID, "feature_created", "feature", "F-1", 5, "node-a", '{"title":"x"}', TS)
    assert len(row) == len(event.FIELDS)
    assert row.to_dict() == stamped()
    assert event.loads(row.to_json()) == stamped()   # the text built around the payload


@pytest.mark.parametrize("clock", [1, 2 ** 63 - 1])
def test_check_stamped_lamport_bounds_accepted(clock):
    assert check_stamped(stamped(lamport_clock=clock))[4] == clock


@pytest.mark.parametrize("clock", [0, -1, 2 ** 63, 2 ** 64, True, False, 1.0, "5", None])
def test_check_stamped_lamport_bounds_refused(clock):
    with pytest.raises(EventError, match="lamport_clock"):
        check_stamped(stamped(lamport_clock=clock))


@pytest.mark.parametrize("field", event.FIELDS)
def test_check_stamped_requires_every_field(field):
    ev = stamped()
    del ev[field]
    with pytest.raises(EventError, match=f"missing {field}"):
        check_stamped(ev)


@pytest.mark.parametrize("ev,field", [
    (stamped(node_id=""), "node_id"),
    (stamped(node_id="n" * 65), "node_id"),
    (stamped(node_id=5), "node_id"),
    (stamped(event_id=EID.upper()), "event_id"),
    (stamped(event_id=None), "event_id"),
    (stamped(payload=[]), "payload"),
    (stamped(timestamp=None), "timestamp"),
    (stamped(timestamp="2026-01-31"), "timestamp"),
    (stamped(event_type="BAD"), "event_type"),
    (stamped(aggregate_id=""), "aggregate_id"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_check_stamped_refuses(ev, field):
    with pytest.raises(EventError, match=field):
        check_stamped(ev)


def test_check_stamped_refuses_non_objects():
    with pytest.raises(EventError):
        check_stamped([EID])


# -- parse_ndjson ------------------------------------------------------------------------
def test_parse_ndjson_reads_lines_and_skips_blank_ones():
    lines = [json.dumps(new(aggregate_id="A")) + "\n", "\n", "   \n",
             json.dumps(new(aggregate_id="B", payload={"k": 1})).encode() + b"\n"]
    out = list(parse_ndjson(lines))
    assert [e["aggregate_id"] for e in out] == ["A", "B"]
    assert out[1]["payload"] == '{"k":1}'


@pytest.mark.parametrize("bad,message", [
    ("{not json", "line 3: malformed JSON"),
    ("[1, 2]", "line 3: an event must be a JSON object"),
    (json.dumps(new(event_type="BAD")), "line 3: event_type"),
    (b"\xff\xfe{}", "line 3: not UTF-8"),
    (json.dumps(new(lamport_clock=1)), "line 3: lamport_clock"),
])
def test_parse_ndjson_names_the_bad_line(bad, message):
    good = json.dumps(new())
    gen = parse_ndjson([good, "", bad, good])
    assert next(gen)["aggregate_id"] == "F-1"
    with pytest.raises(EventError) as info:
        next(gen)
    assert str(info.value).startswith(message)


def test_parse_ndjson_accepts_crlf_and_utf8_bytes():
    raw = json.dumps(new(aggregate_id="Ä-1"), ensure_ascii=False).encode("utf-8") + b"\r\n"
    assert [e["aggregate_id"] for e in parse_ndjson([raw])] == ["Ä-1"]


# -- never-sync --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "smtp_password", "db.password", "x.tokens", "secrets", "github_pat", "GITHUB_PAT",
    "openai_api_key", "my_api_key_2", "SMTP_Password", "token", "access_token",
    "client_secret", "password", "Api_Key",
])
def test_default_never_sync_matches_credentials(name):
    assert NeverSync().matches("setting", name)
    assert NeverSync().matches("Setting", name)


@pytest.mark.parametrize("name", [
    "theme", "editor.font_size", "my_pattern", "pat", "patch_level", "language", "smtp_host",
])
def test_default_never_sync_leaves_ordinary_settings(name):
    assert not NeverSync().matches("setting", name)


def test_never_sync_is_scoped_to_setting_aggregates_by_default():
    ns = NeverSync()
    assert not ns.matches("feature", "password_reset")
    assert not ns.matches("project", "secret_plan")
    assert not ns.matches("work_package", "token_refresh")


def test_never_sync_extra_rules():
    ns = NeverSync(["project:*private*", " ", "*:*.key"])
    assert ns.matches("project", "my_PRIVATE_notes")
    assert not ns.matches("feature", "my_private_notes")
    assert ns.matches("feature", "deploy.KEY")
    assert ns.matches("anything", "x.key")
    assert ns.matches("setting", "smtp_password")       # defaults still apply
    assert len(ns.rules) == len(event.DEFAULT_NEVER_SYNC) + 2


@pytest.mark.parametrize("rule", ["nocolon", ":glob", "setting:", "*"])
def test_never_sync_rejects_malformed_rules(rule):
    with pytest.raises(EventError, match="TYPE:GLOB"):
        NeverSync([rule])


# -- small helpers -----------------------------------------------------------------------
def test_dumps_is_compact_and_keeps_unicode():
    assert event.dumps({"a": [1, {"b": "ü"}]}) == '{"a":[1,{"b":"ü"}]}'


@pytest.mark.parametrize("etype,deleted", [
    ("feature_deleted", True), ("wp.feature_deleted", True), ("deleted", False),
    ("feature_deleted_not", False), ("feature_undeleted", False), ("feature_created", False),
])
def test_is_deletion(etype, deleted):
    assert event.is_deletion(etype) is deleted


def test_check_event_id_roundtrip_of_fresh_uuids():
    for _ in range(20):
        u = str(uuid.uuid4())
        assert event.check_event_id(u) == u


def test_nul_in_text_is_refused_for_new_events_but_pulled_ones_pass():
    """PostgreSQL keeps no NUL in text, so a server refuses one in an event; an
    sk 0.2.0 server may have stored such an event, and devices must still pull it."""
    from sk.event import EventError, check_stamped
    ev = {"event_id": "01234567-89ab-7def-8123-456789abcdef", "event_type": "x",
          "aggregate_type": "t", "aggregate_id": "a\x00b", "lamport_clock": 1,
          "node_id": "n", "payload": {"s": "\x00 in JSON is escaped"},
          "timestamp": "2026-01-31T12:00:00Z"}
    with pytest.raises(EventError, match="NUL"):
        check_stamped(ev)
    assert check_stamped(ev, new=False)[3] == "a\x00b"
