"""The sealed data format (protocol 2): what the server stores and can neither read
nor forge. One description, here; PROTOCOL.md says the same for other clients.

A batch is the events of one push, sealed together under the team's key of one
epoch (compress before encrypt, one AES-GCM call a batch):

manifest   what the server needs to route and de-duplicate, in the clear: for each
           event, in order, [event_id, node_id, lamport_clock]; and the writer's
           point, the (seq, chain) of the team's log the writing device had seen
           when it sealed them (seq 0 and no chain if none).
content    gzip(JSON {"events": [[event_type, aggregate_type, aggregate_id, payload,
           timestamp, extra], ...]}), in the manifest's order; extra is an object
           (keys it does not know are kept out of the state, never an error).
blob       crypto.seal_data(data_key(team key, team, "events"), content, ad)
ad         "sk/2 batch|<team>|<epoch>|" + hex SHA-256 of the canonical manifest:
           "sk/2 manifest\\n<writer seq>\\t<writer chain hex>\\n" then for each event
           "<event_id>\\t<node_id>\\t<lamport_clock>\\n".

So a body cannot move to another team (its key and its ad name the team), epoch,
event id, node or clock (the manifest is authenticated), and a reader can check
that the server placed each event after its writer's point, never before.
"""

import hashlib
import re
import zlib

from .crypto import data_key, open_data, seal_data
from .event import (MAX_LAMPORT, Event, EventError, check_extra, check_opened,
                    check_opened_text, dumps, loads, scan_value)

_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NODE_RE = re.compile(r"[^\t\n\x00]{1,64}")
MAX_CONTENT = 8 * 1024 * 1024    # a batch's content inflates to at most this (wire.MAX_PLAIN)

# Each team's log is a hash chain, git style: the chain value after event `seq` is
# sha256(chain before it + its event_id), from GENESIS. The server keeps it by seq;
# a device checks every page against it, and keeps the (seq, chain) it last saw.
GENESIS = bytes(32)


def chain_next(prev, event_id):
    """The log's chain value after `event_id`, from the one before it."""
    return hashlib.sha256(prev + event_id.encode()).digest()


class SealedError(ValueError):
    """A sealed batch that does not authenticate, or whose clear part is malformed."""


class Unauthentic(SealedError):
    """It does not authenticate under this team's key with this manifest: it was
    altered, or moved, or it is not what the server says it is."""


class Invalid(SealedError):
    """It authenticates, so a member sealed it, but what it holds is not valid
    events (a bad or broken client)."""


def check_manifest(manifest, writer):
    """Validate a manifest [[event_id, node_id, lamport]] and writer (seq, chain hex
    or "") from the wire; returns them as tuples. SealedError if malformed."""
    if not isinstance(manifest, list) or not manifest:
        raise SealedError("a batch's manifest must be a non-empty list")
    out = []
    for entry in manifest:
        if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
                or not _ID_RE.fullmatch(entry[0]) or not isinstance(entry[1], str)
                or not _NODE_RE.fullmatch(entry[1]) or not _utf8(entry[1])
                or type(entry[2]) is not int or not 1 <= entry[2] <= MAX_LAMPORT):
            raise SealedError(f"malformed manifest entry {ascii(entry)[:120]}")
        out.append((entry[0], entry[1], entry[2]))
    seq, chain = writer if writer is not None else (0, "")
    if (type(seq) is not int or not 0 <= seq < 2 ** 63 or not isinstance(chain, str)
            or (chain and not re.fullmatch(r"[0-9a-f]{64}", chain))):
        raise SealedError("malformed writer point")
    return out, (seq, chain)


def _utf8(text):
    try:
        text.encode("utf-8")    # a lone surrogate is not text
    except UnicodeEncodeError:
        return False
    return True


def canonical(manifest, writer):
    seq, chain = writer
    return ("sk/2 manifest\n" + f"{int(seq)}\t{chain}\n"
            + "".join(f"{e}\t{n}\t{int(c)}\n" for e, n, c in manifest)).encode("utf-8")


def batch_ad(team, epoch, manifest, writer):
    digest = hashlib.sha256(canonical(manifest, writer)).hexdigest()
    return f"sk/2 batch|{team}|{int(epoch)}|{digest}".encode("utf-8")


def _content(events, extras):
    """The content JSON text, built around each event's stored payload text (and its
    extra's, when the extra is text)."""
    parts = []
    for ev, extra in zip(events, extras):
        parts.append(f"[{dumps(ev.event_type)},{dumps(ev.aggregate_type)},"
                     f"{dumps(ev.aggregate_id)},{ev.payload},{dumps(ev.timestamp)},"
                     f"{extra if isinstance(extra, str) else dumps(extra or {})}]")
    return '{"events":[' + ",".join(parts) + "]}"


def seal_batch(team, epoch, team_key, events, writer=None, extras=None, nonce=None):
    """Seal Events: (manifest [[id, node, clock]], writer (seq, chain), blob)."""
    manifest = [(ev.event_id, ev.node_id, ev.lamport_clock) for ev in events]
    writer = writer or (0, "")
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    content = c.compress(_content(events, extras or [None] * len(events)).encode()) + c.flush()
    blob = seal_data(data_key(team_key, team, "events"), content,
                     batch_ad(team, epoch, manifest, writer), nonce)
    return [list(m) for m in manifest], writer, blob


def open_batch(team, epoch, team_key, manifest, writer, blob, payloads=False):
    """The events of a sealed batch, in the manifest's order: [(Event, extra)]
    (with payloads, [(Event, extra, payload dict, extra's JSON text or None)]).
    SealedError if it does not authenticate under this team's key of `epoch` with
    this manifest, or if what it holds is not valid events. The manifest and
    writer are as check_manifest returns them (their ids, nodes and clocks are
    taken as checked there)."""
    from .crypto import CryptoError
    try:
        content = open_data(data_key(team_key, team, "events"), blob,
                            batch_ad(team, epoch, manifest, writer), "sealed batch")
    except CryptoError as e:
        raise Unauthentic(str(e)) from None
    d = zlib.decompressobj(31)
    try:
        text = d.decompress(content, MAX_CONTENT)
        if d.unconsumed_tail or not d.eof:
            raise Invalid("a sealed batch's content is too large or truncated")
        text = text.decode("utf-8")
        rows = _rows(text)
        cut = rows is not None
        if not cut:   # not as sk writes it (spacing, another client): read it whole
            rows = loads(text)["events"]
    except (zlib.error, ValueError, KeyError, TypeError, RecursionError) as e:
        if isinstance(e, SealedError):
            raise
        raise Invalid(f"a sealed batch's content is not what it should be: {e}") from None
    if not isinstance(rows, list) or len(rows) != len(manifest):
        raise Invalid("a sealed batch holds another number of events than its manifest")
    out, names = [], set()
    for entry, row in zip(manifest, rows):
        eid = entry[0]
        if cut:
            etype, atype, aid, payload, text, ts, extra, extra_text = row
        elif isinstance(row, list) and len(row) == 6:
            (etype, atype, aid, payload, ts, extra), text, extra_text = row, None, None
        else:
            extra = None
        if not isinstance(extra, dict):
            raise Invalid(f"event {eid} in a sealed batch is malformed")
        try:
            if text is None:
                ev = check_opened(entry, (etype, atype, aid, payload, ts))
            else:
                ev = check_opened_text(entry, (etype, atype, aid, payload, text, ts), names)
            if extra and (extra_text is None or "\\u" in extra_text):
                extra_text = check_extra(extra)   # (the text as written may hide a surrogate)
        except EventError as e:
            raise Invalid(f"event {eid} in a sealed batch is invalid: {e}") from None
        if not payloads:
            out.append((ev, extra))
        else:
            out.append((ev, extra, payload, extra_text if extra else None))
    return out


_HEAD = '{"events":['
# a row's first three values, strings without an escape or a control character
_ROW_HEAD = re.compile(r'\["([^"\\\x00-\x1f]{1,256})","([^"\\\x00-\x1f]{1,256})",'
                       r'"([^"\\\x00-\x1f]{1,256})",')


def _rows(text):
    """The content's rows as sk writes it (no spacing between the values of a row):
    [[event_type, aggregate_type, aggregate_id, payload, payload's text, timestamp,
    extra, extra's text]], the two texts cut from the content as written; None if
    the content is written otherwise (it is then read whole, as JSON)."""
    if not text.startswith(_HEAD):
        return None
    scan, head, out, i = scan_value, _ROW_HEAD.match, [], len(_HEAD)

    def value(sep, i):   # the value after `sep` at text[i]: (value, its start, its end)
        if text[i] != sep:
            raise ValueError("not cut")
        got, end = scan(text, i + 1)
        return got, i + 1, end

    try:
        while True:
            m = head(text, i)
            if m is not None:   # the names without escapes, as they mostly are
                etype, atype, aid = m.groups()
                i = m.end() - 1
            else:
                etype, _, i = value("[", i)
                atype, _, i = value(",", i)
                aid, _, i = value(",", i)
            payload, start, i = value(",", i)
            payload_text = text[start:i]
            ts, _, i = value(",", i)
            extra, start, i = value(",", i)
            out.append([etype, atype, aid, payload, payload_text, ts, extra, text[start:i]])
            if text[i] != "]":
                return None
            if text[i + 1] == ",":
                i += 2
            elif text[i + 1:] == "]}":
                return out
            else:
                return None
    except (StopIteration, IndexError, ValueError):
        return None


__all__ = ["Event", "Invalid", "SealedError", "Unauthentic", "batch_ad", "canonical",
           "check_manifest", "open_batch", "seal_batch"]
