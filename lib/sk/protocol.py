"""The push/pull protocol, as both transports speak it: REST (sync.py) and the
WebSocket session (watch.py) cut batches, settle push answers and accept pages
with these functions, so the rules hold the same on both.

Divergence is a model, not a flag: an answer may say that the server's log is
not the one this device saw (ServerRestored: it was restored from an older copy,
or replaced), or that the device's key now belongs to another team's log
(TeamChanged). `healing()` turns the first into a Healed result: every event this
device holds is queued to push again, so the server gets back what it lost.
"""

import re
from collections import namedtuple

from . import sealed
from .errors import ConfigError, IntegrityError, SkError
from .event import EventError, check_stamped
from .wire import MAX_BATCH_BYTES, event_cost

PUSH_STATUSES = ("accepted", "duplicate", "rejected")
# a push answer says each event's status in one letter, in the batch's order
STATUS_LETTERS = {s[0]: s for s in PUSH_STATUSES}


# -- divergence -------------------------------------------------------------------
class Diverged(IntegrityError):
    """The device's view of its team's log no longer holds on the server."""


class ServerRestored(Diverged):
    """The server's log is not the one this device saw."""

    def __init__(self, reason, team=None):
        super().__init__(reason)
        self.reason, self.team = reason, team


class TeamChanged(Diverged):
    """This device's key now belongs to another team: it reads that team's log
    from its start, and the old team's events stay out of it."""

    def __init__(self, team):
        super().__init__(f"the key now belongs to team '{team}'")
        self.team = team


class NodeTaken(ConfigError):
    """The server refused this home's events: their node id is another device's,
    or another home stamped the same clock under it. A copied (or restored) home;
    `sk-stamp --new-node` gives this one its own node id."""

    def __init__(self, taken):
        reason = taken.get("reason") if isinstance(taken, dict) else None
        super().__init__(f"{reason or 'the server refused this node id'}; run 'sk-stamp"
                         " --new-node' to give this home a node id of its own (its unsent"
                         " events are stamped again; nothing is lost)")
        self.taken = taken


class Healed(namedtuple("Healed", "reason requeued resent restored")):
    """What healing a restored server did: why, how many events were queued again,
    and (once pushed) how many were re-sent and how many of those the server had
    lost. One description, wherever it is told."""

    __slots__ = ()

    def describe(self):
        if self.resent is None:
            return (f"{self.reason}; queued the {self.requeued} events this device holds to"
                    " push again")
        return (f"{self.reason}; healed it: re-sent {self.resent} events this device holds,"
                f" {self.restored} of them new to it")


def check_answer(store, answer):
    """Raise TeamChanged or ServerRestored if a push answer, pull page or frame says
    so. Every answer names the device's team; a changed team is noted first."""
    team = answer.get("team")
    if isinstance(team, str) and store.switch_team(team):
        raise TeamChanged(team)
    if isinstance(answer.get("diverged"), str):
        raise ServerRestored(answer["diverged"], team)
    if answer.get("node_taken") is not None:
        raise NodeTaken(answer["node_taken"])


def healing(store, attempt):
    """attempt(first=True); on a divergence, start over once: attempt(first=False),
    after queueing every event held here again if the server was restored. The
    counts then carry a Healed under "healed"."""
    try:
        return attempt(True)
    except Diverged as d:
        healed = None
        if isinstance(d, ServerRestored):
            healed = Healed(d.reason, store.heal(), None, None)
        try:
            counts = attempt(False)
        except Diverged as again:
            raise IntegrityError(f"{again}; and again after starting over: do servers with"
                                 " different databases answer at this URL?") from None
        if healed:
            counts["healed"] = healed
        return counts


def known_out(store):
    """The device's known point of the server's log, as the wire carries it."""
    known = store.known()
    return {"seq": known[0], "chain": known[1]} if known else None


def point_in(answer, seq_key):
    """(seq, chain) from a push answer or pull page, if it carries a valid one."""
    seq, chain = answer.get(seq_key), answer.get("chain")
    if type(seq) is int and isinstance(chain, str) and len(chain) == 64:
        return seq, chain
    return None


# -- push -------------------------------------------------------------------------
def batches(rows, max_bytes=MAX_BATCH_BYTES):
    """Cut queued [(seq, Event, relay)] so that no batch holds more than max_bytes
    of events (wire.event_cost; an event larger than that travels alone)."""
    batch, size = [], 0
    for item in rows:
        n = event_cost(item[1].payload)
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


class Rekey(Exception):
    """The server wants the batch sealed under another key epoch (a device was
    revoked or rotated, and a member must begin the next one first)."""


def push_body(batch, keyring, known=None, queued=None):
    """A push: (body, attachments), its events sealed in one batch under the team's
    current key (sk.sealed), the writer's point being this device's known point.
    An event this home did not stamp (given back to a restored server) is listed
    under "relay"; `queued`, how many events this device has queued (this batch's
    among them), is told the server for its admin (sk-admin status, metrics)."""
    epoch, key = keyring.current()
    writer = (known["seq"], known["chain"]) if known else None
    manifest, point, blob = sealed.seal_batch(keyring.team, epoch, key,
                                              [item[1] for item in batch], writer,
                                              [item[3] if len(item) > 3 else None
                                               for item in batch])
    body = {"epoch": epoch, "writer": {"seq": point[0], "chain": point[1]} if writer else None,
            "events": manifest, "relay": [i for i, item in enumerate(batch) if item[2]]}
    if known:
        body["known"] = known
    if queued is not None:
        body["queued"] = queued
    return body, [blob]


def settle_push(store, batch, answer, counts, on_event=None):
    """Apply the server's answer to a pushed batch, atomically: every event must
    have a known status, in order; accepted and duplicate ones are sent, a rejected
    one is set aside with its reason. counts[status] move by what was settled;
    on_event(status, Event, reason) for each."""
    check_answer(store, answer)
    if answer.get("rekey") is not None:
        raise Rekey(answer["rekey"])
    statuses, reasons = answer.get("statuses"), answer.get("reasons", {})
    if not isinstance(statuses, str) or len(statuses) != len(batch) or not isinstance(
            reasons, dict):
        raise IntegrityError("server's push answer does not match the events sent")
    unknown = statuses.strip("adr")
    if unknown:
        raise IntegrityError(f"server answered unknown push status {unknown[:1]!r}")
    out = []
    for i, (item, letter) in enumerate(zip(batch, statuses)):
        status, reason = STATUS_LETTERS[letter], None
        if letter == "r":
            reason = reasons.get(str(i))
            if reason is not None and not isinstance(reason, str):
                reason = str(reason)
        out.append((item[1].event_id, status, reason))
    store.mark_pushed(out, point_in(answer, "head"), [item[0] for item in batch])
    for (eid, status, reason), item in zip(out, batch):
        counts[status] += 1
        if on_event:
            on_event(status, item[1], reason)
    return out


# -- pull -------------------------------------------------------------------------
Accepted = namedtuple("Accepted", "events new next more chain")


class NeedKey(Exception):
    """A page holds a batch of a key epoch this device does not hold (yet); `where`
    names its first event (Keyring.need says why it cannot be read, if it cannot)."""

    def __init__(self, epoch, where=""):
        super().__init__(f"no team key of epoch {epoch}")
        self.epoch, self.where = epoch, where


class WaitingForSeal(SkError):
    """The server still holds events of this team in plaintext, from before end-to-
    end encryption, and this device never read them then (exit 1)."""

    exit_code = 1


def _manifest(text):
    """(entries [(event_id, node_id, clock)], writer (seq, chain hex)) of a canonical
    manifest (sk.sealed.canonical); IntegrityError if it is not one."""
    try:
        lines = text.split("\n")
        if lines[0] != "sk/2 manifest" or lines[-1] != "":
            raise ValueError
        seq, chain = lines[1].split("\t")
        entries = [(e, n, int(c)) for e, n, c in (line.split("\t") for line in lines[2:-1])]
        manifest, writer = sealed.check_manifest([list(x) for x in entries], (int(seq), chain))
    except (ValueError, sealed.SealedError, AttributeError):
        raise IntegrityError("malformed batch manifest from the server") from None
    return manifest, writer


def accept_page(store, page, cursor, keyring, moves_cursor=True, chain=None, warn=None,
                applied=False, fold=None):
    """Check a pull page or events frame that follows `cursor` (check_page) and
    store its events, advancing the cursor (if moves_cursor, with its chain value)
    and the known point in the same transaction. fold: a sk.resolve.Folder that
    folds the page into the state as it is stored (not with applied). A page
    chained from the cursor's known chain also settles what the server claimed of
    the log (store.claims): nothing else is taken to show it."""
    got = check_page(store, page, cursor, keyring, chain, warn)
    events, payloads, parsed = got.events, got.payloads, got.parsed
    try:
        new = store.receive(events, got.next if moves_cursor else 0, got.point, got.extras,
                            got.chain, applied,
                            fold and (lambda db: fold(db, events, payloads, parsed)),
                            got.own if moves_cursor and chain is not None else None)
    except BaseException:
        if fold:
            fold.forget()   # what it folded was rolled back
        raise
    if fold:
        fold.commit()
    return Accepted(events, new, got.next, got.more, got.chain)


# a page checked and opened (check_page): its events and their payloads, extras
# (text, parsed), where it ends, the chain there, the server's point, and the ids of
# this device's events it showed by id only
Checked = namedtuple("Checked", "events payloads extras parsed next more chain point own")


def _first(rows, n, manifest):
    """'event ID (seq N)': the first event of a page's batch number n, as its rows place it."""
    seq = next((r[0] for r in rows if isinstance(r, list) and len(r) == 3
                and type(r[1]) is int and r[1] == n), None)
    return f"event {manifest[0][0]}" + (f" (seq {seq})" if seq is not None else "")


def check_page(store, page, cursor, keyring, chain=None, warn=None):
    """Check a pull page or events frame that follows `cursor` and open its events,
    storing nothing: Checked. Every sealed batch must authenticate
    under the team key with its manifest, every row must be where its manifest
    says, after its writer's point, the sequence dense, and (when the chain at
    `cursor` is known) the hash chain the page ends on must be the one its rows
    make. Anything else is an IntegrityError (exit 5) naming the event and seq,
    and nothing of the page is stored. A batch that authenticates but holds
    invalid events (a bad member's) is skipped with a warning: it blocks no one."""
    check_answer(store, page)
    rows, batches, nxt, more = (page.get("rows"), page.get("batches"), page.get("next"),
                                page.get("more"))
    blobs = page.get("attachments", [])
    if (not isinstance(rows, list) or not isinstance(batches, list) or type(nxt) is not int
            or nxt < cursor or not isinstance(more, bool) or (more and nxt == cursor)
            or len(blobs) != len(batches)):
        raise IntegrityError("malformed pull page from server")
    opened = []
    for n, (b, blob) in enumerate(zip(batches, blobs)):
        if not isinstance(b, dict) or type(b.get("epoch")) is not int or not isinstance(
                b.get("manifest"), str):
            raise IntegrityError("malformed batch in a pull page from server")
        manifest, writer = _manifest(b["manifest"])
        key = keyring.get(b["epoch"])
        if key is None:
            raise NeedKey(b["epoch"], _first(rows, n, manifest))
        try:
            opened.append((manifest, writer, sealed.open_batch(keyring.team, b["epoch"], key,
                                                               manifest, writer, blob, True)))
        except sealed.Unauthentic:
            raise IntegrityError(f"{_first(rows, n, manifest)}"
                                 + f" (batch of {len(manifest)}) failed authentication under the"
                                 " team key: altered on the server or on the way; nothing of"
                                 " the page was applied") from None
        except sealed.Invalid as e:
            opened.append((manifest, writer, e))
    events, extras, at, legacy = [], [], cursor, 0
    payloads, parsed = [], []   # for the fold: what was opened, not parsed again
    own = []   # this device's events, shown by id only (it holds them)
    for row in rows:
        if not isinstance(row, list) or len(row) != 3 or type(row[0]) is not int:
            raise IntegrityError("malformed row in a pull page from server")
        seq = row[0]
        if seq != at + 1:
            raise IntegrityError(f"the server's page skips or repeats events at seq {at + 1}")
        at = seq
        if row[1] is None:              # this device's own, left out: the id for the chain
            eid = row[2]
            if isinstance(eid, str):
                own.append(eid)
        elif row[1] == "legacy":
            if store.meta("legacy_trust") != "1":
                raise WaitingForSeal(
                    "waiting for a member of this team to seal the events the server holds"
                    " from before end-to-end encryption; run 'sk sync' on a device that synced"
                    " before the upgrade")
            try:
                le = row[2]
                ev = check_stamped({"event_id": le[0], "node_id": le[1], "lamport_clock": le[2],
                                    "event_type": le[3], "aggregate_type": le[4],
                                    "aggregate_id": le[5], "payload": le[6],
                                    "timestamp": le[7]}, new=False)
            except (EventError, TypeError, IndexError, KeyError) as e:
                raise IntegrityError(f"server sent an invalid event at seq {seq}: {e}") from None
            eid = ev.event_id
            events.append(ev)
            extras.append(None)
            payloads.append(le[6])
            parsed.append(None)
            legacy += 1
        else:
            if (type(row[1]) is not int or not 0 <= row[1] < len(opened) or type(row[2]) is not int
                    or not 0 <= row[2] < len(opened[row[1]][0])):
                raise IntegrityError(f"malformed row at seq {seq} in a pull page from server")
            manifest, writer, got = opened[row[1]]
            eid = manifest[row[2]][0]
            if writer[0] >= seq:
                raise IntegrityError(f"event {eid} (seq {seq}) is placed before its writer's"
                                     f" point (seq {writer[0]}): moved on the server")
            epoch = batches[row[1]]["epoch"]
            later = keyring.starts().get(epoch + 1)
            # (an epoch this device holds the key of began there for sure: one it was
            # only told of, and never given, cannot end the one before)
            if later is not None and seq > later and keyring.get(epoch + 1) is not None:
                raise IntegrityError(f"event {eid} (seq {seq}) is sealed under key epoch {epoch},"
                                     f" which ended at seq {later} (a revoked device's key?):"
                                     " refused")
            if isinstance(got, Exception):
                if warn:
                    warn(f"event {eid} (seq {seq}) authenticates but is invalid, skipped: {got}")
            else:
                ev, extra, payload, extra_text = got[row[2]]
                events.append(ev)
                extras.append(extra_text)
                payloads.append(payload)
                parsed.append(extra or None)
        if chain is not None:
            chain = sealed.chain_next(chain, str(eid))
    if at != nxt:   # the log is dense: a page holds every event up to where it ends
        raise IntegrityError("the server's page does not end where it says")
    claimed = page.get("chain")
    if chain is not None and claimed != chain.hex():
        raise IntegrityError(f"the server's hash chain at seq {nxt} is not the one its events"
                             " make: events were altered, dropped or moved on the server")
    if chain is None and isinstance(claimed, str) and re.fullmatch(r"[0-9a-f]{64}", claimed):
        chain = bytes.fromhex(claimed)   # (a log from before protocol 2: checked from here on)
    return Checked(events, payloads, extras, parsed, nxt, more, chain, point_in(page, "next"),
                   own)
