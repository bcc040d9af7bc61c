"""The server store's interface, and the rules every store shares.

Everything that must hold across requests lives behind this interface, never in
process memory: teams and their event sequences, devices, key material, seen
nonces, WebSocket tokens, failed-authentication counts. `sql.SQLStore` is the one
implementation; what differs between databases is its dialect (sqlite.py,
postgresql.py).
"""

import abc
import os
import time
from collections import namedtuple
from datetime import datetime, timezone

from sk import crypto, wire
from sk.sealed import GENESIS, chain_next  # noqa: F401 - the store's, from the one definition


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def now_ms():
    return int(time.time() * 1000)


class StoreError(Exception):
    """A store operation refused: unknown device, name taken, a database that is not
    an sk server's, ..."""


class Damaged(StoreError):
    """What the server stored cannot be read back as it was written (a cell altered
    at rest: text where bytes were, a word where a number was): the device is told
    so, sealed, and stops on it (exit 5) as on an event that fails authentication."""

    @classmethod
    def at(cls, after, e):
        why = str(e).split(" with text ")[0][:200]   # (SQLite quotes the cell's bytes)
        what = (f"the server's stored events after seq {after}" if type(after) is int
                else "what the server stored")
        return cls(f"{what} cannot be read as it was written (altered at rest?):"
                   f" {type(e).__name__}: {why}")


# what reading a cell altered at rest raises, on any database
UNREADABLE = (TypeError, ValueError, UnicodeError)


class StoreUnavailable(StoreError):
    """The database does not answer (PostgreSQL down, no pooled connection free):
    the caller should wait and retry (HTTP 503, exit 3)."""


class KeyRecord:
    __slots__ = ("key_id", "device", "team", "master", "retired", "retired_why", "revoked")

    def __init__(self, key_id, device, team, master, retired, retired_why, revoked):
        self.key_id, self.device, self.team, self.master = key_id, device, team, bytes(master)
        self.retired, self.retired_why, self.revoked = retired, retired_why, revoked


# Each team's log is a hash chain (sk.sealed.chain_next). A device keeps the (seq,
# chain) of the last point of the log it saw; if the server's log at that seq is not
# the same chain (the database was put back to an older copy, or replaced) every
# request that carries the point is told so, and the device heals the server.


# One device must not be able to push the team's Lamport clock to its end (2^63)
# and so stop everybody from stamping: a jump this far ahead is refused.
MAX_LAMPORT_JUMP = 2 ** 32

Pushed = namedtuple("Pushed", "results head chain diverged node_taken rekey refused",
                    defaults=(None, None, None))
Pushed.__doc__ = """What a push did: [(status, reason)] per event of the batch, the
team's (head, chain) after it; and why nothing was stored, if nothing was: the
device's known point is not on this log (diverged), a node id of its events is
not its own (node_taken), or the batch is not sealed under the team's current key
epoch, or a new epoch must begin first (rekey: {"epoch", "rotate"}), or the batch
is refused for what it says (refused: why; its request counted as seen all the
same)."""

Batch = namedtuple("Batch", "epoch manifest writer sealed")
Batch.__doc__ = """A sealed batch as a device pushes it (sk.sealed): its key epoch, the
manifest [(event_id, node_id, lamport_clock)], the writer's point (seq, chain hex),
and the sealed content, which the server keeps and cannot read."""


def node_taken(node, owner, device, clock=None):
    """The answer to events stamped under a node id that is not the pushing
    device's: {"node_id", "device" (its owner), "reason"}."""
    if clock is None:
        why = (f"node id {node} belongs to device '{owner}'; this device ('{device}') may not"
               " push events under it (a home copied from that device?)")
    else:
        why = (f"node id {node} stamped another event at Lamport clock {clock} already: two"
               " homes share this node id (a copied or restored home?)")
    return {"node_id": node, "device": owner, "reason": why}
Page = namedtuple("Page", "rows batches legacy next more chain diverged")
Page.__doc__ = """One pull page: rows [(seq, event_id, batch, idx)] (batch None for an
event the puller pushed itself and is left out, or one still in legacy), the
batches they are in {batch: (epoch, canonical manifest, sealed, device)}, the
legacy events among them {seq: (node_id, lamport_clock, event_type, aggregate_type,
aggregate_id, payload, timestamp)}, the next cursor and its chain value, whether more follow, and the
divergence reason (None if none)."""


def check_known(known, head, chain_at, after=0):
    """Why the device's known point (seq, chain) is not on this team's log of
    `head` events, or None if it is. chain_at(seq) reads the chain after seq. A
    pull cursor `after` past the head says the same, known point or not."""
    if after > head:
        return (f"the server's log holds {head} events, but this device has read up to"
                f" {after}: the server was restored from an older copy")
    if known is None:
        return None
    seq, chain = known
    if seq > head:
        return (f"the server's log holds {head} events, but this device saw {seq}:"
                " the server was restored from an older copy")
    if seq and chain_at(seq) != chain:
        return (f"event {seq} of the server's log is not the one this device saw:"
                " the server was restored from an older copy, or replaced")
    return None


ROW_BYTES = 64   # what a page row costs on the wire, beside its batch


def cut_page(rows, limit, max_bytes=wire.MAX_BATCH_BYTES):
    """The rows a page takes from rows (seq, event_id, batch, idx, chain, cost) in
    seq order, read lazily: at most `limit` and `max_bytes` (each batch counted
    once, at the first of its rows; cost is its size, or a legacy event's), but
    always at least one, so nothing that was accepted can block a pull. Returns
    (rows taken, more follow)."""
    out, size, seen = [], 0, set()
    for r in rows:
        cost = ROW_BYTES
        fresh = r[2] is None or r[2] not in seen   # a row that brings a body of its own
        if fresh:
            cost += r[5] or 0
        if out and (len(out) == limit or (fresh and size + cost > max_bytes)):
            return out, True
        size += cost
        if r[2] is not None:
            seen.add(r[2])
        out.append(r)
    return out, False


def plan_push(manifest, existing, lamport):
    """The merge rule of a push, on what the server can see: which events of a
    batch's manifest [(event_id, node_id, lamport_clock)] are new, duplicates or
    refused. existing maps event_id -> the stored (event_id, node_id,
    lamport_clock). Returns ([(status, reason)], [(idx, entry)] new, the team's new
    lamport)."""
    results, new = [], []
    for i, entry in enumerate(manifest):
        old = existing.get(entry[0])
        if old is None and entry[2] > lamport + MAX_LAMPORT_JUMP:
            results.append(("rejected", "lamport_clock jumps more than 2^32 past the"
                                        " team's highest clock"))
        elif old is None:
            lamport = max(lamport, entry[2])
            new.append((i, entry))
            existing[entry[0]] = entry
            results.append(("accepted", None))
        elif tuple(old) == tuple(entry):
            results.append(("duplicate", None))
        else:
            results.append(("rejected", "event_id already used by a different event"))
    return results, new, lamport


def number(new, head, chain):
    """Give new events [(idx, entry)] their dense sequence numbers and chain
    values, in order: [(seq, chain, idx, entry)], and the team's new (head, chain)."""
    out = []
    for idx, entry in new:
        head += 1
        chain = chain_next(chain, entry[0])
        out.append((head, chain, idx, entry))
    return out, head, chain


def follow(team, head, lamport, chain, rows):
    """Check that exported rows (STORED_COLUMNS) continue a team's log at (head,
    chain): dense seq and the chain recomputed. Returns the new (head, lamport,
    chain)."""
    for r in rows:
        seq, eid = r[0], r[1]
        chain = chain_next(chain, eid)
        if seq != head + 1 or bytes(r[6]) != chain:
            raise StoreError(f"team '{team}': event {seq} of the source does not follow event"
                             f" {head} of the target's log, which is not the start of the"
                             " source's")
        head, lamport = seq, max(lamport, r[3])
    return head, lamport, chain


def rekey_needed(team_row, epoch):
    """Why a batch sealed under `epoch` may not be written to a team whose row is
    (current epoch, rekey flag), or None: the answer a device needs to go on."""
    current, rekey = team_row
    if current == 0 or rekey or epoch != current:
        return {"epoch": current, "rotate": bool(rekey) or current == 0}
    return None


def secret_check(secret):
    """The fingerprint of a server secret that the database keeps, so a server
    started with another secret is refused at start."""
    import hmac
    return hmac.new(secret, b"sk server secret check", "sha256").hexdigest()[:32]


def unwrap(secret, key_id, blob):
    try:
        return crypto.unwrap_key(secret, key_id, bytes(blob))
    except crypto.CryptoError as e:
        raise StoreError(f"key '{key_id}': {e} (wrong secret file for this database?)") from None


def token_refusal(row, now):
    """Why a WebSocket token row (key_id, expires, used) can't open a session."""
    if row is None:
        return "unknown token"
    if row[2] is not None:
        return "token already used"
    if row[1] < now:
        return "token expired"
    return None


def usable_key(key):
    return key if key is not None and not key.revoked and not key.retired else \
        "key revoked or rotated"


def redact(url):
    """A database URL without its password, for messages."""
    import re
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", os.fspath(url))


class Store(abc.ABC):
    """The interface every server store implements. The server's tests run each
    against SQLite and PostgreSQL."""

    # devices and keys (sk-register)
    @abc.abstractmethod
    def create_device(self, name, team, key_id, master): ...
    @abc.abstractmethod
    def rotate_key(self, name, key_id, master): ...
    @abc.abstractmethod
    def revoke_device(self, name): ...
    @abc.abstractmethod
    def list_devices(self): ...

    # requests
    @abc.abstractmethod
    def get_key(self, key_id):
        """KeyRecord for key_id, or None."""
    @abc.abstractmethod
    def key_valid(self, key_id):
        """True if key_id is registered, not rotated away, its device not revoked."""
    @abc.abstractmethod
    def admit(self, key_id, device, nonce, expires_ms):
        """Record a request nonce; False if already seen (a replay)."""
    @abc.abstractmethod
    def push(self, team, device, batch, ticket=None, known=None, relay=()):
        """Store a sealed Batch's new events as one transaction, durable before it
        returns: a Pushed. ticket=(key_id, device, nonce, expires_ms) admits the
        request in the same transaction; None (and nothing stored) if that nonce
        was seen before. known=(seq, chain): the device's last point of the log;
        if it is not on this log nothing is stored and Pushed.diverged says why.
        A batch sealed under another than the team's current key epoch, or while a
        new epoch must begin, stores nothing (Pushed.rekey). Each node id belongs
        to the device that first pushed under it: events under another device's
        node id, or under a (node, clock) stamp another event has, store nothing
        (Pushed.node_taken), except those at the manifest indexes in `relay` (the
        events of others a device gives back to a restored server)."""
    @abc.abstractmethod
    def pull(self, team, after, limit, skip=None, known=None):
        """A Page after cursor `after`, from one consistent snapshot.
        skip=(device, node_id, upto) leaves the bodies out of the events that
        device pushed under that node, stamped at or below upto (the page still
        lists them, and the cursor moves past them); known as for push."""
    @abc.abstractmethod
    def keys(self, team, device):
        """The team key's state for a device (see SQLStore.keys)."""
    @abc.abstractmethod
    def put_keys(self, team, device, identity=None, epoch=None, grants=(), approval=None,
                 approvals=()):
        """Store a member's identity, new epoch, grants and approvals; why not, or None."""
    @abc.abstractmethod
    def reseal(self, team, device, first, batch):
        """Seal legacy events in place; how many."""
    @abc.abstractmethod
    def put_snapshot(self, team, device, seq, chain, epoch, blob, keep=3):
        """Keep a sealed snapshot as of a point of the team's log (the newest `keep`)."""
    @abc.abstractmethod
    def snapshot(self, team):
        """The team's newest snapshot, or None."""
    @abc.abstractmethod
    def snapshot_due(self, team, every, wait_ms=60_000):
        """Whether to ask the device at hand for a snapshot now."""
    @abc.abstractmethod
    def seen(self, key_id, nonce):
        """True if the request nonce was admitted before (a replay)."""
    @abc.abstractmethod
    def ping(self):
        """Ask the database something; StoreError (StoreUnavailable) if it cannot answer."""
    @abc.abstractmethod
    def head(self, team):
        """The number of events in the team's log."""
    @abc.abstractmethod
    def auth_failures(self, addr, window_ms):
        """How many failed authentications came from addr in the current window."""
    @abc.abstractmethod
    def note_auth_failure(self, addr, window_ms):
        """Count one failed authentication from addr; return the window's count."""
    @abc.abstractmethod
    def add_ws_token(self, token_hash, key_id, expires_ms):
        """Remember a WebSocket token (by hash) for key_id until expires_ms."""
    @abc.abstractmethod
    def consume_ws_token(self, token_hash):
        """Use a token once: its KeyRecord, or a reason string why it is refused."""
    @abc.abstractmethod
    def prune(self):
        """Delete what has expired: nonces, WebSocket tokens, old failure counts."""

    def listen(self, callback):
        """Call callback(team) in a thread of this process whenever any process
        stores events of that team (callback(None): anything may have changed).
        False if the store cannot tell: then only the process that stored them
        wakes its sessions at once. (Sessions also look every second regardless.)"""
        return False

    # upkeep and moving (sk-admin)
    @abc.abstractmethod
    def stats(self): ...
    @abc.abstractmethod
    def backup(self, path): ...
    @abc.abstractmethod
    def export_meta(self):
        """{"teams": [(team, head, lamport, chain, created)], "devices": [(name, team,
        created, last_seen, revoked)], "keys": [(key_id, device, master (plain),
        created, retired, retired_why)], "nonces": [(key_id, nonce, expires)]}."""
    @abc.abstractmethod
    def import_meta(self, meta):
        """Add what export_meta gave (teams with an empty log; devices, keys and
        unexpired nonces), keeping what is already here."""
    @abc.abstractmethod
    def export_events(self, team, after, limit):
        """Up to limit stored rows after seq `after` (STORED_COLUMNS)."""
    @abc.abstractmethod
    def import_events(self, team, rows):
        """Append exported rows as they are (same seq and chain); they must follow
        the team's head, and the chain must check out."""

    def same_database(self, other):
        """True if `other` is a store on this very database."""
        return False

    def reset(self):
        """Forget connections after the database went away (a no-op for SQLite)."""

    def close(self):
        pass
