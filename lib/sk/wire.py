"""The wire format, shared by client and server.

Every request that carries data is ``POST /api/<endpoint>`` with headers
``X-SK-Protocol: 2`` and ``X-SK-Key-Id: <key_id>`` and a body sealed under the
device's client-to-server key (see crypto). The sealed context binds the
protocol, direction, key id and endpoint; an answer's context also binds the
nonce of the request it answers. Once a request authenticates, its answer is
sealed, errors included; before that, errors are plain JSON
``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status.

Inside a seal, a body is framed: count(4) | length(4) | gzip(JSON) | then `count`
attachments, each length(4) | bytes (big-endian lengths). Attachments carry what
must not be compressed again or turned into text: sealed batches. Opened, they
are the list under the body's reserved key "attachments".
"""

import struct
import zlib

from . import PROTOCOL_VERSION, crypto
from .event import dumps, loads

PROTOCOL_HEADER = "X-SK-Protocol"
KEY_HEADER = "X-SK-Key-Id"
CONTENT_TYPE = "application/vnd.sk.sealed"
# The protocol's limits, in one place. A push batch and a pull page (or frame) are
# cut by count and by bytes: MAX_BATCH_BYTES of events (payload text, plus
# EVENT_OVERHEAD for each envelope), one event over that travelling alone, so no
# valid event can ever block a push or a pull. A body inflates to at most MAX_PLAIN,
# is at most MAX_BODY sealed, and a request holds at most MAX_CONTAINERS JSON
# objects and arrays (refused before it is parsed: a body of {} is a bomb).
MAX_BATCH = 1000                     # events in one push
MAX_PAGE = 5000                      # events in one pull page
MAX_BATCH_BYTES = 4 * 1024 * 1024    # event bytes in one push, page or frame
EVENT_OVERHEAD = 300                 # an envelope's bytes, beside its payload
MAX_PLAIN = 8 * 1024 * 1024          # bytes a body may inflate to
MAX_BODY = MAX_PLAIN + 64 * 1024     # sealed, compressed bytes of a body
MAX_CONTAINERS = 300_000             # JSON objects and arrays in a request
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000    # requests older or newer than this are stale
WS_TOKEN_TTL_MS = 5 * 60 * 1000      # a WebSocket token opens one session within this
WS_PATH = "/api/ws"


def event_cost(payload):
    """The bytes one event counts for in a batch or page: its payload's UTF-8
    bytes and an envelope's."""
    return (len(payload) if payload.isascii() else len(payload.encode("utf-8"))) + EVENT_OVERHEAD


class WireError(ValueError):
    """A body that is not what the protocol says: malformed, oversize, a bomb."""

    def __init__(self, message, status=400, code="malformed"):
        super().__init__(message)
        self.status = status
        self.code = code


def compress(obj):
    """gzip of the JSON of obj; a str is taken as JSON text encoded already."""
    c = zlib.compressobj(5, zlib.DEFLATED, 31)
    text = obj if isinstance(obj, str) else dumps(obj)
    return c.compress(text.encode("utf-8")) + c.flush()


def decompress(data, limit=MAX_PLAIN, containers=None):
    """Inflate gzip `data` to at most `limit` bytes and parse it as a JSON object;
    with `containers`, refuse (before parsing) a body of more JSON objects and
    arrays than that."""
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(data, limit)
        if d.unconsumed_tail:
            raise WireError(f"body inflates past {limit} bytes", 413, "too_large")
        if not d.eof:
            raise WireError("body is truncated gzip")
        if d.unused_data:
            raise WireError("trailing bytes after gzip body")
        if containers is not None and out.count(b"{") + out.count(b"[") > containers:
            raise WireError(f"body holds more than {containers} JSON objects and arrays",
                            413, "too_large")
        obj = loads(out)
    except RecursionError:
        raise WireError("body nests too deeply") from None
    except zlib.error as e:
        raise WireError(f"body is not gzip: {e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("body must be a JSON object")
    return obj


def pack(obj, attachments=()):
    """The framed plaintext of a body: obj (JSON text, or an object) and attachments."""
    gz = compress(obj)
    return b"".join([struct.pack(">II", len(attachments), len(gz)), gz,
                     *(struct.pack(">I", len(a)) + bytes(a) for a in attachments)])


def unpack(plain, limit=MAX_PLAIN, containers=None):
    """The object of a framed plaintext, its attachments under "attachments"."""
    if len(plain) < 8:
        raise WireError("body is too short to be framed")
    count, n = struct.unpack_from(">II", plain)
    if count > MAX_BATCH or 8 + n > len(plain):
        raise WireError("body's framing is malformed")
    obj = decompress(plain[8:8 + n], limit, containers)
    at, attachments = 8 + n, []
    for _ in range(count):
        if at + 4 > len(plain):
            raise WireError("body's attachments are truncated")
        (size,) = struct.unpack_from(">I", plain, at)
        if at + 4 + size > len(plain):
            raise WireError("body's attachments are truncated")
        attachments.append(bytes(plain[at + 4:at + 4 + size]))
        at += 4 + size
    if at != len(plain):
        raise WireError("trailing bytes after the body's attachments")
    if "attachments" in obj:
        raise WireError("'attachments' is not a field a body may carry")
    if attachments:
        obj["attachments"] = attachments
    return obj


def _context(direction, key_id, endpoint, request_nonce=b""):
    return f"sk/{PROTOCOL_VERSION}|{direction}|{key_id}|{endpoint}|".encode() + request_nonce


def seal_request(master, key_id, endpoint, obj, attachments=()):
    """Return (sealed body, nonce) for a request from device `key_id`."""
    key = crypto.direction_key(master, crypto.C2S)
    blob = crypto.seal(key, pack(obj, attachments), _context(crypto.C2S, key_id, endpoint))
    return blob, crypto.peek(blob)[1]


def open_request_seal(master, key_id, endpoint, blob):
    """Server side: (timestamp_ms, nonce, framed plaintext); CryptoError if not
    authentic. unpack() the plaintext once the sender is known to be allowed."""
    key = crypto.direction_key(master, crypto.C2S)
    return crypto.open_sealed(key, blob, _context(crypto.C2S, key_id, endpoint))


def open_request(master, key_id, endpoint, blob):
    """Server side: return (timestamp_ms, nonce, obj). CryptoError if not authentic."""
    ts, nonce, plain = open_request_seal(master, key_id, endpoint, blob)
    return ts, nonce, unpack(plain)


def seal_response(master, key_id, endpoint, request_nonce, obj, attachments=()):
    key = crypto.direction_key(master, crypto.S2C)
    return crypto.seal(key, pack(obj, attachments),
                       _context(crypto.S2C, key_id, endpoint, request_nonce))


def open_response(master, key_id, endpoint, request_nonce, blob):
    key = crypto.direction_key(master, crypto.S2C)
    _, _, plain = crypto.open_sealed(key, blob, _context(crypto.S2C, key_id, endpoint, request_nonce))
    return unpack(plain)


# -- WebSocket frames ----------------------------------------------------------
# A session opens with a single-use token obtained over REST (POST /api/ws-token);
# the session id is the token's SHA-256. Every frame is a binary message,
# gzip(JSON) sealed like a REST body, its context binding the session and the
# direction; the JSON carries "n", a per-direction counter that must rise by one
# each frame, so a frame can be neither replayed nor reordered nor moved to
# another session.

def token_hash(token):
    import hashlib
    return hashlib.sha256(token.encode()).hexdigest()


def _frame_context(direction, key_id, session):
    return f"sk/{PROTOCOL_VERSION}|{direction}|{key_id}|ws|{session}|".encode()


def seal_frame(master, key_id, direction, session, obj, attachments=()):
    key = crypto.direction_key(master, direction)
    return crypto.seal(key, pack(obj, attachments), _frame_context(direction, key_id, session))


def open_frame(master, key_id, direction, session, blob, limit=MAX_PLAIN, containers=None):
    key = crypto.direction_key(master, direction)
    _, _, plain = crypto.open_sealed(key, blob, _frame_context(direction, key_id, session))
    return unpack(plain, limit, containers)
