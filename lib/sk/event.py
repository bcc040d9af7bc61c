"""The event: its fields, their rules, and the never-sync rules.

Shared by the client (sk-append, sk-pull) and the server (push validation), so a
rule lives here once.
"""

import fnmatch
import functools
import json
import re
from collections import namedtuple

FIELDS = ("event_id", "event_type", "aggregate_type", "aggregate_id",
          "lamport_clock", "node_id", "payload", "timestamp")
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_DEPTH = 32          # objects and arrays nested in a payload, the payload itself counted
MAX_LAMPORT = 2 ** 63 - 1
_TYPE_RE = re.compile(r"[a-z0-9_.]{1,64}")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FIELD_SET = frozenset(FIELDS)
_TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|\+00:00)")

# aggregate_type:glob, matched case-insensitively against aggregate_id
DEFAULT_NEVER_SYNC = ("setting:*_pat", "setting:*token*", "setting:*password*",
                      "setting:*secret*", "setting:*api_key*")


class EventError(ValueError):
    """An event breaks a rule; the message names the field."""


class Event(namedtuple("Event", FIELDS)):
    """One stamped event, as every store keeps it and the wire carries it: the
    fields in FIELDS order, the payload as its compact JSON text. A row read from
    a store's columns in FIELDS order is Event(*row)."""

    __slots__ = ()

    def to_dict(self):
        """The event as a JSON object (the wire's and sk-log's form)."""
        ev = self._asdict()
        ev["payload"] = loads(self.payload)
        return ev

    def to_json(self):
        """to_dict() as compact JSON text, built around the payload text as stored."""
        return (f'{{"event_id":{dumps(self.event_id)},"event_type":{dumps(self.event_type)},'
                f'"aggregate_type":{dumps(self.aggregate_type)},'
                f'"aggregate_id":{dumps(self.aggregate_id)},'
                f'"lamport_clock":{int(self.lamport_clock)},"node_id":{dumps(self.node_id)},'
                f'"payload":{self.payload},"timestamp":{dumps(self.timestamp)}}}')


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


# Built once (json.dumps/loads with options build a new coder on every call):
# dumps is compact JSON, the one encoding used for payloads and on the wire;
# loads is strict JSON, refusing NaN and Infinity.
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_decode = json.JSONDecoder(parse_constant=_no_constants).decode


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is too large")
    return value


# One JSON value of a text from an index, as loads reads it but for a number too large
# for a float (ValueError: loads reads 1e999 as infinity, which dumps then refuses):
# (value, the index after it); StopIteration if no value starts there.
scan_value = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite).scan_once


_SCALARS = {str: json.encoder.encode_basestring, int: int.__repr__,
            bool: lambda b: "true" if b else "false", type(None): lambda _: "null"}


def dumps_value(value):
    """dumps(value), without the encoder's set-up for a string, integer, boolean or
    null (a payload's values mostly are: the fold writes one for each)."""
    enc = _SCALARS.get(type(value))
    return enc(value) if enc is not None else dumps(value)


def loads(text):
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")   # UnicodeDecodeError is a ValueError
    return _decode(text)


def _utf8(name, value):
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError(f"{name} is not valid Unicode text (lone surrogate)") from None
    return value


def new_event_id():
    """A new event id: a version-7 UUID (RFC 9562), time-ordered, so the logs'
    unique indexes grow at their end instead of at random places."""
    import os
    import time
    value = (int(time.time() * 1000) & (2 ** 48 - 1)) << 80
    value |= int.from_bytes(os.urandom(10), "big") & (2 ** 80 - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)          # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)          # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_event_id(value):
    if not isinstance(value, str):
        raise EventError("event_id must be a string")
    if not _UUID_RE.fullmatch(value):
        raise EventError(f"event_id {value[:80]!r} is not a UUID in canonical lowercase text")
    return value


def _check_str(ev, name, pattern=None, maxlen=256, nul_ok=False):
    value = ev.get(name)
    if not isinstance(value, str):
        raise EventError(f"{name} must be a string" if name in ev else f"missing {name}")
    _utf8(name, value)
    if not nul_ok and "\x00" in value:  # PostgreSQL keeps no NUL in text
        raise EventError(f"{name} must not contain a NUL character")
    if pattern is not None and not pattern.fullmatch(value):
        raise EventError(f"{name} {value!r} must be 1-64 chars of [a-z0-9_.]")
    if not 1 <= len(value) <= maxlen:
        raise EventError(f"{name} must be 1-{maxlen} characters")
    return value


def depth(value, limit=MAX_DEPTH):
    """How deeply objects and arrays nest in value (a scalar is 0), level by level
    without recursion, and only up to limit + 1: deep enough is too deep."""
    level, d = [value], 0
    containers = (dict, list)
    while level:
        level = [v for v in level if isinstance(v, containers)]
        if not level:
            return d
        d += 1
        if d > limit:
            return d
        nxt = []
        for v in level:
            nxt.extend(v.values() if type(v) is dict else v)
        level = nxt
    return d


def check_payload(payload, max_depth=MAX_DEPTH):
    """Return the payload's compact JSON text, or raise EventError. A payload
    nested deeper than max_depth is refused (None: any depth, for events a server
    accepted long ago)."""
    if not isinstance(payload, dict):
        raise EventError("payload must be a JSON object")
    if max_depth is not None and depth(payload, max_depth) > max_depth:
        raise EventError(f"payload nests objects and arrays more than {max_depth} deep")
    try:
        text = _utf8("payload", dumps(payload))
    except (ValueError, RecursionError) as e:
        if isinstance(e, EventError):
            raise
        raise EventError(f"payload is not encodable JSON: {str(e)[:80]}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_PAYLOAD_BYTES:
        raise EventError(f"payload is {size} bytes encoded, over the {MAX_PAYLOAD_BYTES} limit")
    return text


def check_new(ev):
    """Validate an event to be appended (unstamped). Returns a normalised dict.

    Required: event_type, aggregate_type, aggregate_id. Optional: payload ({}),
    event_id (assigned at stamping if absent), timestamp. Stamp fields given here
    (lamport_clock, node_id) are refused: the device assigns them.
    """
    if not isinstance(ev, dict):
        raise EventError("an event must be a JSON object")
    unknown = ev.keys() - _FIELD_SET
    if unknown:
        raise EventError(f"unknown field {sorted(unknown)[0]!r}")
    for name in ("lamport_clock", "node_id"):
        if ev.get(name) is not None:
            raise EventError(f"{name} is assigned by sk-stamp; leave it out")
    out = {
        "event_type": _check_str(ev, "event_type", _TYPE_RE, 64),
        "aggregate_type": _check_str(ev, "aggregate_type", _TYPE_RE, 64),
        "aggregate_id": _check_str(ev, "aggregate_id"),
        "payload": check_payload(ev.get("payload", {})),
        "event_id": None,
        "timestamp": None,
    }
    if ev.get("event_id") is not None:
        out["event_id"] = check_event_id(ev["event_id"])
    if ev.get("timestamp") is not None:
        out["timestamp"] = check_timestamp(ev["timestamp"])
    return out


def check_timestamp(value):
    if not isinstance(value, str) or not _TS_RE.fullmatch(value):
        raise EventError("timestamp must be RFC 3339 UTC text such as 2026-01-31T12:00:00Z")
    if not _real_time(value[:19]):
        raise EventError(f"timestamp {value!r} is not a real date and time")
    return value


@functools.lru_cache(maxsize=1024)   # a batch's timestamps share their seconds
def _real_time(text):
    from datetime import datetime
    try:
        datetime(int(text[0:4]), int(text[5:7]), int(text[8:10]),
                 int(text[11:13]), int(text[14:16]), int(text[17:19]))
    except ValueError:
        return False
    return True


def check_stamped(ev, new=True):
    """Validate a complete, stamped event (push, pull). Returns an Event (payload
    as compact JSON text). new=False (pulled events) lets through a NUL in text
    fields, which sk 0.2.0 servers stored."""
    if not isinstance(ev, dict):
        raise EventError("an event must be a JSON object")
    missing = [f for f in FIELDS if f not in ev]
    if missing:
        raise EventError(f"missing {missing[0]}")
    clock = ev["lamport_clock"]
    if type(clock) is not int or not 1 <= clock <= MAX_LAMPORT:
        raise EventError("lamport_clock must be an integer >= 1 and < 2^63")
    event_id = check_event_id(ev["event_id"])
    etype, atype, aid = _check_names(ev, new)
    return Event(event_id, etype, atype, aid, clock,
                 _check_str(ev, "node_id", maxlen=64, nul_ok=not new),
                 check_payload(ev["payload"], MAX_DEPTH if new else None),
                 check_timestamp(ev["timestamp"]))


def _check_names(ev, new):
    """(event_type, aggregate_type, aggregate_id) of an event, checked."""
    return (_check_str(ev, "event_type", _TYPE_RE, 64),
            _check_str(ev, "aggregate_type", _TYPE_RE, 64),
            _check_str(ev, "aggregate_id", nul_ok=not new))


def check_opened(entry, row):
    """An event opened from a sealed batch: its manifest entry (event_id, node_id,
    lamport_clock), which sealed.check_manifest has checked, and its content row
    [event_type, aggregate_type, aggregate_id, payload, timestamp, ...], checked as
    check_stamped(new=False) checks them. Returns an Event."""
    etype, atype, aid = _check_names(
        {"event_type": row[0], "aggregate_type": row[1], "aggregate_id": row[2]}, new=False)
    return Event(entry[0], etype, atype, aid, entry[2], entry[1], check_payload(row[3], None),
                 check_timestamp(row[4]))


def check_opened_text(entry, row, names):
    """check_opened for a content row read with its payload's JSON text as the
    writer wrote it: row (event_type, aggregate_type, aggregate_id, payload dict,
    payload text, timestamp). The text is kept as it is (it is JSON of the same
    value, read by scan_value, so no number in it is too large for a float) unless
    it holds an escape (\\u...: a lone surrogate hides there) or may be over the
    size limit: then check_payload writes it again, and refuses what it refuses.
    `names`: a set of (event_type, aggregate_type) pairs checked already, kept up to
    date (a batch repeats them). Returns an Event."""
    etype, atype, aid, payload, text, ts = row
    if type(etype) is not str or type(atype) is not str or (etype, atype) not in names:
        _check_names({"event_type": etype, "aggregate_type": atype, "aggregate_id": aid},
                     new=False)
        names.add((etype, atype))
    elif type(aid) is not str or not 1 <= len(aid) <= 256 or not aid.isascii():
        _check_str({"aggregate_id": aid}, "aggregate_id", nul_ok=True)   # as _check_names
    if type(payload) is not dict or "\\u" in text or len(text) > MAX_PAYLOAD_BYTES // 4:
        text = check_payload(payload, None)
    return Event(entry[0], etype, atype, aid, entry[2], entry[1], text, check_timestamp(ts))


def check_extra(extra):
    """The compact JSON text of an event's extra (an object), or EventError: a
    number too large for a float, a lone surrogate."""
    try:
        text = dumps(extra)
    except (ValueError, RecursionError) as e:
        raise EventError(f"extra is not encodable JSON: {str(e)[:80]}") from None
    return _utf8("extra", text)


def is_deletion(event_type):
    return event_type.endswith("_deleted")


_GLOB_TYPE_RE = re.compile(r"[a-z0-9_.*?\[\]!-]{1,64}")


class NeverSync:
    """The never-sync rules (their syntax: sk.commands.NEVER_SYNC_SYNTAX): `aggregate_type:glob` patterns on
    aggregate_id, and `type=glob` patterns on the event type."""

    def __init__(self, extra=()):
        self.rules = []          # (aggregate type or "*", glob over the aggregate id)
        self.type_rules = []     # globs over the event type
        for rule in tuple(DEFAULT_NEVER_SYNC) + tuple(extra):
            rule = rule.strip()
            if not rule:
                continue
            self._add(rule)
        # one compiled pattern per aggregate type ("*": every type)
        by_type = {}
        for agg, glob in self.rules:
            by_type.setdefault(agg, []).append(fnmatch.translate(glob))
        self._any = by_type.pop("*", [])
        self._patterns = {agg: re.compile("|".join(globs + self._any))
                          for agg, globs in by_type.items()}
        self._default = re.compile("|".join(self._any)) if self._any else None
        self._types = (re.compile("|".join(fnmatch.translate(g) for g in self.type_rules))
                       if self.type_rules else None)

    def _add(self, rule):
        form, eq, rest = rule.partition("=")
        if eq and form.strip().lower() == "type":
            glob = rest.strip().lower()
            if not glob:
                raise EventError(f"never-sync rule {rule!r}: no event type glob after 'type='")
            if not _GLOB_TYPE_RE.fullmatch(glob):
                raise EventError(f"never-sync rule {rule!r} can never match: event types are"
                                 " 1-64 characters of [a-z0-9_.]")
            self.type_rules.append(glob)
            return
        if eq and form.strip().lower() == "aggregate":
            rule = rest.strip()
        elif eq and ":" not in form:
            raise EventError(f"never-sync rule {rule!r}: unknown form {form.strip()!r}= (the"
                             " forms are TYPE:GLOB, aggregate=TYPE:GLOB and type=GLOB)")
        agg, sep, glob = rule.partition(":")
        agg = agg.strip().lower()
        if not sep or not agg or not glob:
            raise EventError(f"never-sync rule {rule!r} must look like TYPE:GLOB (an"
                             " aggregate type, and a glob over the aggregate id) or type=GLOB")
        if agg != "*" and not _TYPE_RE.fullmatch(agg):
            hint = (f"; for events of type {agg!r} say type={agg}" if _GLOB_TYPE_RE.fullmatch(agg)
                    else "")
            raise EventError(f"never-sync rule {rule!r} can never match: an aggregate type is"
                             f" 1-64 characters of [a-z0-9_.] (or * for any){hint}")
        if "\x00" in glob or len(glob) > 256:
            raise EventError(f"never-sync rule {rule!r} can never match: aggregate ids are"
                             " 1-256 characters without NUL")
        self.rules.append((agg, glob.lower()))

    def matches(self, aggregate_type, aggregate_id, event_type=None):
        if (event_type is not None and self._types is not None
                and self._types.match(event_type.lower())):
            return True
        pattern = self._patterns.get(aggregate_type.lower(), self._default)
        return pattern is not None and pattern.match(aggregate_id.lower()) is not None


def parse_ndjson(lines):
    """Yield validated new events from NDJSON lines; EventError names the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise EventError(f"line {n}: not UTF-8 text") from None
        try:
            obj = loads(line)
        except (ValueError, RecursionError) as e:
            raise EventError(f"line {n}: malformed JSON: {getattr(e, 'msg', e)}") from None
        try:
            yield check_new(obj)
        except EventError as e:
            raise EventError(f"line {n}: {e}") from None
