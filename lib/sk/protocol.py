"""The push/pull protocol, as both transports speak it: REST (sync.py) and the
WebSocket session (watch.py) cut batches, settle push answers and accept pages
with these functions, so the rules hold the same on both.

Divergence is a model, not a flag: an answer may say that the server's log is
not the one this device saw (ServerRestored: it was restored from an older copy,
or replaced), or that the device's key now belongs to another team's log
(TeamChanged). `healing()` turns the first into a Healed result: every event this
device holds is queued to push again, so the server gets back what it lost.
"""

from collections import namedtuple

from .errors import ConfigError, IntegrityError
from .wire import MAX_BATCH_BYTES, event_cost
from .event import EventError, check_stamped, dumps

PUSH_STATUSES = ("accepted", "duplicate", "rejected")


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


def push_body(batch, known=None):
    """A push body as JSON text, built around each event's stored payload text
    (validated when it was appended) instead of parsing and re-encoding it. An
    event this home did not stamp (given back to a restored server) says so."""
    parts = [ev.to_json()[:-1] + ',"relay":true}' if relay else ev.to_json()
             for _, ev, relay in batch]
    tail = f',"known":{dumps(known)}' if known else ""
    return '{"events":[' + ",".join(parts) + "]" + tail + "}"


def settle_push(store, batch, answer, counts, on_event=None):
    """Apply the server's answer to a pushed batch, atomically: every event must
    have a known status, in order; accepted and duplicate ones are sent, a rejected
    one is set aside with its reason. counts[status] move by what was settled."""
    check_answer(store, answer)
    results = answer.get("results")
    ids = [item[1].event_id for item in batch]
    if (not isinstance(results, list) or len(results) != len(ids)
            or any(not isinstance(r, dict) or r.get("event_id") != i for r, i in zip(results, ids))):
        raise IntegrityError("server's push answer does not match the events sent")
    out = []
    for r in results:
        status = r.get("status")
        if status not in PUSH_STATUSES:
            raise IntegrityError(f"server answered unknown push status {str(status)[:40]!r}")
        reason = r.get("reason") if status == "rejected" else None
        if reason is not None and not isinstance(reason, str):
            reason = str(reason)
        out.append((r["event_id"], status, reason))
    store.mark_pushed(out, point_in(answer, "head"))
    for eid, status, reason in out:
        counts[status] += 1
        if on_event:
            on_event(status, eid, reason)
    return out


# -- pull -------------------------------------------------------------------------
Accepted = namedtuple("Accepted", "events new next more")


def accept_page(store, page, cursor, moves_cursor=True):
    """Check a pull page or events frame that follows `cursor` and store its
    events, advancing the cursor (if moves_cursor) and the known point in the same
    transaction. Nothing is stored from a page that is malformed or holds an
    invalid event."""
    check_answer(store, page)
    events, nxt, more = page.get("events"), page.get("next"), page.get("more")
    if (not isinstance(events, list) or type(nxt) is not int or nxt < cursor
            or not isinstance(more, bool) or (more and nxt == cursor)):
        raise IntegrityError("malformed pull page from server")
    try:
        rows = [check_stamped(ev, new=False) for ev in events]
    except EventError as e:
        raise IntegrityError(f"server sent an invalid event: {e}") from None
    new = store.receive(rows, nxt if moves_cursor else 0, point_in(page, "next"))
    return Accepted(rows, new, nxt, more)

