"""The sync operations every command composes: stamp, push, pull, and the
porcelain run, status and setup. Commands only parse and print."""

import contextlib
import json
import os
import time

from . import wire
from .errors import (AuthError, ConfigError, IntegrityError, ServerError, SkError, Unreachable,
                     UsageError)
from .event import EventError, NeverSync, check_stamped
from .keyring import Keyring
from .protocol import (NeedKey, Rekey, accept_page, batches, check_page, healing, known_out,
                       push_body, settle_push)
from .store import open_store

def open_client(cfg):
    from .client import Client
    return Client(cfg.server, cfg.api_key, cfg.timeout)


@contextlib.contextmanager
def device_lock(cfg):
    """One network sync at a time per device; a second one waits its turn."""
    import fcntl
    cfg.home.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.home / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def tracked(store):
    """Record the outcome of a network run, for `sk sync status`."""
    try:
        yield
    except SkError as e:
        store.record_outcome(False, str(e))
        raise
    except KeyboardInterrupt as e:   # Ctrl-C, SIGTERM or SIGHUP (errors.Interrupted)
        from .errors import Interrupted
        store.record_outcome(False, Interrupted.describe(getattr(e, "signum", 2)))
        raise
    store.record_outcome(True)


def never_sync(cfg):
    """The device's never-sync rules (event.NeverSync); ConfigError (exit 2) naming a
    rule that is malformed or could never match."""
    try:
        return NeverSync(cfg.never_sync_rules)
    except EventError as e:
        raise ConfigError(f"SK_NEVER_SYNC: {e}") from None


def stamp(store, cfg, on_event=None, dry_run=False):
    """Stamp every unstamped event (store.stamp) under the never-sync rules;
    on_event(kind, Event, reason) for each ("stamped"); dry_run changes nothing."""
    rules = never_sync(cfg)
    tell = None
    if on_event:
        def tell(kind, ev, status):
            on_event(("would stamp" if dry_run else kind), ev,
                     "local-only (a never-sync rule)" if status == "local_only" else None)
    stamped, local_only, dups, problems = store.stamp(rules, tell, dry_run)
    return {"stamped": stamped, "local_only": local_only, "duplicates": dups,
            "problems": [{"unstamped_seq": s, "reason": r} for s, r in problems]}


# -- push ---------------------------------------------------------------------
def _send(store, client, ring, batch, counts, on_event, answer=None, resealed=False):
    """Push one batch (or settle the `answer` already fetched for it); on HTTP 413
    split it, and set a lone event aside; sealed anew under the next key epoch if
    the server asks for it (a device was revoked or rotated)."""
    try:
        if answer is None:
            answer = client.call("push", *push_body(batch, ring, known_out(store),
                                                    _queued(store)))
        elif isinstance(answer, BaseException):
            raise answer
        settle_push(store, batch, answer, counts, on_event)
    except Rekey:
        if resealed:
            raise IntegrityError("the server refused a batch sealed under the team's newest"
                                 " key epoch") from None
        ring.ensure(client)
        _send(store, client, ring, batch, counts, on_event, resealed=True)
    except ServerError as e:
        if e.status != 413:
            raise
        if len(batch) == 1:
            eid = batch[0][1].event_id
            if e.authenticated:   # the server said so, sealed: set it aside for good
                reason = f"server refused this event alone with HTTP 413 (too large): {e}"
                store.set_aside(eid, reason)
                counts["rejected"] += 1
                if on_event:
                    on_event("rejected", batch[0][1], reason)
                return
            # an unsealed 413 (a proxy's limit, or anyone on the way): nothing changes
            # here; the event stays queued, the rest flows, and the run says why
            counts["held"] = counts.get("held", 0) + 1
            counts.setdefault("held_reasons", []).append(
                f"event {eid} got HTTP 413 (too large) alone, unsealed (a proxy's limit?):"
                " kept queued")
            if on_event:
                on_event("held", batch[0][1], "HTTP 413 (too large) from the server or a proxy")
            return
        half = len(batch) // 2
        _send(store, client, ring, batch[:half], counts, on_event)
        _send(store, client, ring, batch[half:], counts, on_event)


def push(store, client, ring, max_n=wire.MAX_BATCH, all_batches=False, on_event=None,
         progress=None, counts=None):
    """Push one batch (or, with all_batches, every batch) of queued events, each
    sealed under the team key (ring: the device's Keyring, ensured). If the
    server's log turns out not to be the one this device saw, heal it: queue every
    event held here again and push (counts["healed"] says so). counts: a dict the
    counts are kept in as they move (what an interrupted run got done)."""
    return healing(store, lambda first: _push(store, client, ring, max_n, all_batches,
                                              on_event, progress, counts))


def _push(store, client, ring, max_n, all_batches, on_event, progress, counts=None):
    """Push one batch (or, with all_batches, every batch) of queued events.

    With all_batches the next batch is read from the queue and sealed while the
    server stores the previous one, and sent (on a connection of its own) while
    the previous answer is applied, so client and server work side by side; each
    answer is applied in its own transaction, in order."""
    if counts is None:
        counts = {}
    counts.update(accepted=0, duplicate=0, rejected=0, batches=0)
    max_n = max(1, min(int(max_n), wire.MAX_BATCH))
    moved = lambda: counts["accepted"] + counts["duplicate"] + counts["rejected"]  # noqa: E731
    if not all_batches:
        for batch in batches(store.queued(max_n)):
            _send(store, client, ring, batch, counts, on_event)
            counts["batches"] += 1
        if progress:
            progress(moved())
    else:
        from concurrent.futures import ThreadPoolExecutor
        inflight = None
        left = _queued(store)   # counted once, then less each batch (a count is a scan)
        sender = client.twin()
        pool, sealer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        cut = _Cut(store, max_n)
        try:
            ahead = _seal_next(sealer, cut, ring, known_out(store), left)
            while ahead is not None or inflight:
                if ahead is None:   # the queue looked empty: settle the last batch, look again
                    _settle(store, client, ring, inflight, counts, on_event, progress, moved,
                            inflight[0].result())
                    inflight = None
                    ahead = _seal_next(sealer, cut, ring, known_out(store), left)
                    continue
                batch, sealing, left = ahead
                body = sealing.result()
                # batch n+1 is sealed on a thread of its own (compression and AES work
                # without the GIL) while n is sent and n-1's answer is applied here
                ahead = _seal_next(sealer, cut, ring, known_out(store), left)
                done = inflight[0].result() if inflight else None  # wait for n-1
                future = pool.submit(_call_push, sender, body)      # send n
                if inflight:                                        # settle n-1
                    _settle(store, client, ring, inflight, counts, on_event, progress,
                            moved, done)
                inflight = (future, batch)
                counts["batches"] += 1
        except BaseException:   # Ctrl-C, a signal, an error: stop the call in flight now
            _abort(sender)
            raise
        finally:
            if inflight:
                inflight[0].cancel()
            sealer.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            sender.close()
        # what this run read and could not push (held): an event stamped after its
        # last look at the queue is the next run's, and no reason for this one to exit 1
        counts["queued"] = store.count_queued(upto=cut.after)
        return counts
    counts["queued"] = store.counts(totals=False)["queued"]
    return counts


class _Cut:
    """The queued events in batches (protocol.batches), read from the queue page by
    page from a cursor; next() is None when the queue holds nothing more after it
    (asked again, it looks again)."""

    def __init__(self, store, max_n):
        self.store, self.max_n, self.after, self.cut = store, max_n, 0, []

    def next(self):
        if not self.cut:
            rows = self.store.queued(self.max_n, self.after)
            if not rows:
                return None
            self.after = rows[-1][0]
            self.cut = list(batches(rows))[::-1]
        return self.cut.pop()


class _Sealing:
    """The team key a batch is sealed under, as it was when the batch was cut (what
    push_body reads from a Keyring), for the sealing thread."""

    def __init__(self, ring):
        self.team, self._current = ring.team, ring.current()

    def current(self):
        return self._current


def _seal_next(sealer, cut, ring, known, left):
    """The next batch of `cut`, its push body being sealed on the `sealer` thread,
    and what is left queued after it: (batch, future body, left), or None."""
    batch = cut.next()
    if batch is None:
        return None
    return batch, sealer.submit(push_body, batch, _Sealing(ring), known, left), max(
        0, left - len(batch))


def _abort(client):
    """End the request a client's connection has in flight (on another thread), so
    that thread is done at once instead of at its answer or its deadline."""
    import socket
    conn = getattr(getattr(client, "transport", None), "conn", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _call_push(client, body):
    try:
        return client.call("push", *body)
    except ServerError as e:
        return e  # a 413 is settled (split) in order, by the main thread


def _settle(store, client, ring, inflight, counts, on_event, progress, moved, answer):
    """Apply the answer to an earlier batch (a 413 is split and resent here, on
    the main thread's own connection)."""
    _, batch = inflight
    before = moved()
    _send(store, client, ring, batch, counts, on_event, answer=answer)
    if progress:
        progress(moved() - before)


def _queued(store):
    """How many events wait here to be pushed: told the server with each push and
    pull, for its admin (sk-admin status, sk_device_queue_events)."""
    return store.counts(totals=False)["queued"]


# -- pull ---------------------------------------------------------------------
def pull(store, client, ring, since=None, on_event=None, progress=None, page_size=wire.MAX_PAGE,
         counts=None, fold=None):
    """Fetch every page after the cursor (or `since`), open it with the team key
    (ring), store it and move the cursor. The cursor only moves when the pull
    started at or before it. If the server's log is not the one this device saw,
    queue every event held here to push again and pull the whole log
    (counts["healed"] says so). counts: a dict the counts are kept in as they move.
    fold: a sk.resolve.Folder, to fold each page into the state as it is stored
    (what `sk sync` does; sk-pull leaves that to sk-resolve)."""
    return healing(store, lambda first: _pull(store, client, ring, since if first else None,
                                              on_event, progress, page_size, counts, fold))


def _pull(store, client, ring, since, on_event, progress, page_size, counts=None, fold=None):
    stored = store.cursor()
    cursor = stored if since is None else int(since)
    moves_cursor = cursor <= stored
    chain = store.cursor_chain() if cursor == stored else None
    skip = store.own_events()
    if counts is None:
        counts = {}
    counts.update(received=0, new=0, pages=0, skipped=[])
    queued = _queued(store)
    ahead = _Ahead(client, page_size, skip, queued)
    try:
        page = client.pull(cursor, page_size, skip, known_out(store), queued)
        while True:
            if isinstance(page.get("diverged"), str) and not moves_cursor:
                raise UsageError(f"--since {since}: {page['diverged']}")
            ahead.fetch(page, cursor, known_out(store))   # page n+1 while n is stored
            try:
                got = accept_page(store, page, cursor, ring, moves_cursor, chain,
                                  counts["skipped"].append, fold=fold)
            except NeedKey as e:   # a batch of an epoch not held yet: a grant may be waiting
                ring.need(client, e.epoch, e.where)
                ahead.drop()
                page = client.pull(cursor, page_size, skip, known_out(store), queued)
                continue
            counts["new"] += got.new
            counts["received"] += len(got.events)
            counts["pages"] += 1
            if on_event:
                for ev in got.events:
                    on_event("pulled", ev)
            if progress:
                progress(len(got.events))
            cursor, chain = got.next, got.chain
            if not got.more:
                break
            page = ahead.take(cursor) or client.pull(cursor, page_size, skip, known_out(store),
                                                     queued)
    except BaseException:   # Ctrl-C, a signal, an error: stop the call in flight now
        ahead.abort()
        raise
    finally:
        ahead.close()
    if moves_cursor:   # at the head of the log: a "duplicate" not seen on it is looked for
        confirm_claims(store, client, ring)
    counts["cursor"] = store.cursor()
    return counts


def confirm_claims(store, client, ring, only=None):
    """Look for the events a server answered "duplicate" for that no pull has shown
    on its log (store.claims; with `only`, those of them): read the log from its
    start to the cursor, storing nothing, its hash chain checked against the one
    this device holds there, and queue again those it does not hold (IntegrityError,
    exit 5: the server said it held events it does not). Only a server that lost or
    lied about events makes this read the log; a log from before protocol 2 (no
    chain at the cursor), or one whose oldest events the server still holds
    unsealed, cannot be checked."""
    pending, want = set(store.claims()), store.cursor_chain()
    if only is not None:
        pending &= set(only)
    if not pending or want is None:
        return
    from .protocol import WaitingForSeal
    try:
        seen = _ids_on_log(store, client, ring, want)
    except WaitingForSeal:
        return   # the claims stay, to be looked for once the log is sealed
    missing = pending - seen
    n = store.settle_claims(pending, missing)
    if missing:
        raise IntegrityError(f"the server answered 'duplicate' for {len(missing)} events its"
                             f" log does not hold (one: {sorted(missing)[0]}): {n} queued again"
                             " to push; nothing was lost, but the server lost or hid them")


def _ids_on_log(store, client, ring, want):
    """Every event id of the team's log from its start to the cursor, the hash chain
    they make checked against `want`, the one this device holds at the cursor;
    nothing of it is stored."""
    from .sealed import GENESIS
    end = store.cursor()
    at, chain, seen = 0, GENESIS, set()
    skip = store.own_events()
    while at < end:
        page = client.pull(at, min(wire.MAX_PAGE, end - at), skip, known_out(store))
        try:
            got = check_page(store, page, at, ring, chain)
        except NeedKey as e:
            ring.need(client, e.epoch, e.where)
            continue
        if got.next <= at:
            break
        seen.update(ev.event_id for ev in got.events)
        seen.update(got.own)
        at, chain = got.next, got.chain
    if at != end or chain != want:
        raise IntegrityError(f"the server's log read from its start does not end on the hash"
                             f" chain this device checked at seq {end}: the log was altered")
    return seen


class _Ahead:
    """The next pull page, fetched on a connection and thread of its own while this
    one is checked and stored (the server builds it meanwhile)."""

    def __init__(self, client, page_size, skip, queued):
        self.client, self.args = client, (page_size, skip)
        self.queued, self.twin, self.pool, self.pending = queued, None, None, None

    def fetch(self, page, cursor, known):
        nxt = page.get("next")
        if page.get("more") is not True or type(nxt) is not int or nxt <= cursor or (
                "diverged" in page):
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self.pool, self.twin = ThreadPoolExecutor(1), self.client.twin()
        self.pending = (nxt, self.pool.submit(self.twin.pull, nxt, *self.args, known,
                                              self.queued))

    def take(self, cursor):
        """The page after `cursor` if it was fetched ahead (its error, if it failed)."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != cursor:
            self._wait(pending)
            return None
        return pending[1].result()

    def drop(self):
        pending, self.pending = self.pending, None
        self._wait(pending)

    @staticmethod
    def _wait(pending):
        if pending is not None:
            try:
                pending[1].result()
            except Exception:   # noqa: BLE001 - a page not wanted any more
                pass

    def abort(self):
        if self.twin is not None:
            _abort(self.twin)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.twin.close()


def reseal_legacy(store, client, ring, state):
    """Seal the team's events that the server still holds in plaintext (from before
    end-to-end encryption): a device that read them then reads them again from
    the server and sends them back sealed, run by run of seqs; the server deletes
    the plaintext. Returns how many were sealed."""
    if not state.get("legacy") or store.meta("legacy_trust") != "1":
        return 0
    from . import sealed
    epoch, key = ring.current()
    done, after = 0, 0
    while True:
        page = client.pull(after, wire.MAX_PAGE)
        runs, run = [], []
        for row in page.get("rows", []):
            if row[1] == "legacy":
                if run and run[-1][0] != row[0] - 1:
                    runs.append(run)
                    run = []
                run.append((row[0], row[2]))
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        for run in runs:
            for i in range(0, len(run), wire.MAX_BATCH):
                part = run[i:i + wire.MAX_BATCH]
                events = [check_stamped({"event_id": le[0], "node_id": le[1],
                                         "lamport_clock": le[2], "event_type": le[3],
                                         "aggregate_type": le[4], "aggregate_id": le[5],
                                         "payload": le[6], "timestamp": le[7]}, new=False)
                          for _, le in part]
                manifest, _, blob = sealed.seal_batch(ring.team, epoch, key, events)
                answer = client.call("reseal", {"first": part[0][0], "epoch": epoch,
                                                "writer": None, "events": manifest}, [blob])
                done += answer.get("sealed", 0)
        if not page.get("more"):
            return done
        after = page["next"]


# -- shallow devices --------------------------------------------------------------
def unshallow(store, client, ring, progress=None):
    """Fetch the history before the snapshot a shallow device began at (sk-pull
    --unshallow): every event from the log's start to the snapshot's point, stored
    as already folded (the snapshot holds them), the chain checked from the
    genesis to the snapshot's chain, so the state does not change. Returns how
    many events were fetched (0 on a device that holds its whole history)."""
    from . import snapshot
    info = snapshot.shallow_info(store)
    if info is None:
        return 0
    end_seq, want = info["seq"], snapshot.point(store)[1]
    at, chain, got_n = 0, bytes(32), 0
    skip = store.own_events()
    while at < end_seq:
        page = client.pull(at, min(wire.MAX_PAGE, end_seq - at), skip, known_out(store))
        try:
            got = accept_page(store, page, at, ring, False, chain, None, applied=True)
        except NeedKey as e:
            ring.need(client, e.epoch, e.where)
            continue
        if got.next <= at or (not got.more and got.next < end_seq):
            raise IntegrityError(f"the server's log ends at seq {got.next}, before the snapshot"
                                 f" this device began at (seq {end_seq})")
        at, chain = got.next, got.chain
        got_n += len(got.events)
        if progress:
            progress(len(got.events))
    if chain.hex() != want:
        raise IntegrityError(f"the history the server sent does not end on the chain of the"
                             f" snapshot at seq {end_seq}: the snapshot or the log was altered;"
                             " the device stays shallow")
    snapshot.end(store)
    return got_n


def offer_snapshot(store, client, ring, summary):
    """Build and give the server the snapshot it asked for in an answer of this run
    (a failure here only says so: the run's work is done)."""
    if "snapshot" not in client.asked:
        return
    client.asked.discard("snapshot")
    from . import snapshot
    try:
        summary["snapshot_offered"] = snapshot.offer(store, client, ring)
    except SkError as e:
        summary["snapshot_error"] = str(e)


# -- porcelain ----------------------------------------------------------------
def run(cfg, store, client, dry_run=False, on_event=None, progress_factory=None, shallow=False):
    """`sk sync`: stamp -> team key -> (a fresh device: the newest snapshot) -> push
    every batch -> pull every page -> seal what the server still holds in
    plaintext -> resolve -> (a fresh device, unless shallow: the history before
    the snapshot), under the device's lock, its outcome recorded for `sk sync
    status` (a dry run takes neither and changes nothing). A snapshot the server
    asked for is built and given at the end. on_event(kind, Event, reason) for
    each event stamped, pushed, pulled (or, in a dry run, that would be).

    Interrupted (Ctrl-C, SIGTERM, SIGHUP: a KeyboardInterrupt) it stops at once,
    every transaction begun rolled back, and the exception's `done` says what got
    done ("pushed 61,000 of 200,000; run 'sk sync' to go on")."""
    if dry_run:
        return _dry_run(cfg, store, client, on_event)
    from . import history, snapshot
    from .resolve import Folder, resolve
    bar = progress_factory or (lambda label, total: None)
    summary = {}
    live = {"push": {}, "pull": {}, "resolve": [0]}
    step = folder = None
    interrupted, early = False, 0

    def count_resolved(bar):
        def progress(n):
            live["resolve"][0] += n
            if bar:
                bar(n)
        return progress

    def resolve_all():
        total = store.counts(totals=False)["unapplied"]
        live["resolve_total"] = total
        b = bar("resolve", total)
        try:
            return resolve(store, cfg.path_map or None, progress=count_resolved(b))
        finally:
            if b:
                b.close()

    try:
        with device_lock(cfg), tracked(store):
            step = "stamp"
            summary["stamp"] = stamp(store, cfg, on_event)
            ring = Keyring(store, cfg.api_key)
            state = ring.ensure(client)
            summary["began_at"] = snapshot.begin(store, client, ring)
            before = history.open_ids(store)
            step = "push"
            live["push_total"] = store.counts(totals=False)["queued"]
            summary["push"] = _with_bar(bar("push", live["push_total"]), push, store, client,
                                        ring, all_batches=True, on_event=on_event,
                                        counts=live["push"])
            step = "resolve"   # this device's own first, in the order written (the pages
            # pulled fold after them), under this run's path map, any rebuild done
            if (cfg.path_map or store.meta("needs_rebuild") == "1"
                    or store.counts(totals=False)["unapplied"]):
                early = resolve(store, cfg.path_map or None, progress=count_resolved(None))
            folder = Folder(store)   # pulled pages are folded as they are stored
            step = "pull"
            pulled = (lambda k, ev: on_event(k, ev, None)) if on_event else None
            summary["pull"] = _with_bar(bar("pull", None), pull, store, client, ring,
                                        on_event=pulled, counts=live["pull"], fold=folder)
            step = "heal"
            healed = summary["push"].get("healed") or summary["pull"].get("healed")
            if "healed" in summary["pull"]:  # found by the pull: push back what it lost
                again = push(store, client, ring, all_batches=True, on_event=on_event)
                for k in ("accepted", "duplicate", "rejected"):
                    summary["push"][k] += again[k]
                summary["push"]["queued"] = again["queued"]
                more = pull(store, client, ring, on_event=pulled, fold=folder)
                for k in ("received", "new"):
                    summary["pull"][k] += more[k]
                summary["pull"]["cursor"] = more["cursor"]
            if healed:
                summary["healed"] = healed._replace(
                    resent=summary["push"]["accepted"] + summary["push"]["duplicate"],
                    restored=summary["push"]["accepted"])
            summary["resealed"] = reseal_legacy(store, client, ring, state)
            step = "resolve"
            summary["resolved"] = early + folder.folded + resolve_all()
            step = "history"
            summary["conflicts"] = len(history.open_ids(store) - before)
            if summary["began_at"] and not shallow:   # the rest of the history, not folded
                summary["unshallow"] = _with_bar(bar("history", summary["began_at"]["seq"]),
                                                 unshallow, store, client, ring)
            offer_snapshot(store, client, ring, summary)
    except KeyboardInterrupt as e:
        interrupted = True
        e.done = _done(step, live)
        raise
    finally:
        if "resolved" not in summary and not interrupted:
            # offline or not, this device's own edits show
            summary["resolved"] = early + (folder.folded if folder else 0) + resolve_all()
    return summary


def _done(step, live):
    """What an interrupted run got done, in a few words for its last line."""
    go_on = "run 'sk sync' to go on"
    if step == "push":
        p = live["push"]
        moved = p.get("accepted", 0) + p.get("duplicate", 0) + p.get("rejected", 0)
        return f"pushed {moved:,} of {live.get('push_total', 0):,}; {go_on}"
    if step == "pull":
        return f"pulled {live['pull'].get('received', 0):,} events; {go_on}"
    if step == "resolve":
        return (f"resolved {live['resolve'][0]:,} of {live.get('resolve_total', 0):,};"
                f" {go_on}")
    return go_on if step else None


def _with_bar(bar, step, *args, **kw):
    """Run step(*args, progress=bar, **kw) and close the bar, if there is one."""
    try:
        return step(*args, progress=bar, **kw)
    finally:
        if bar:
            bar.close()


def _dry_run(cfg, store, client, on_event=None):
    """What `sk sync` would do, counted as the run counts it (stamping included),
    changing nothing; on_event("would stamp" | "would push", Event, reason) for
    each event."""
    s = stamp(store, cfg, on_event, dry_run=True)
    counts = store.counts(totals=False)
    if on_event:
        after = 0
        while True:
            rows = store.queued(1000, after)
            if not rows:
                break
            for _, ev, _, _ in rows:
                on_event("would push", ev, None)
            after = rows[-1][0]
        if s["stamped"]:
            stamp(store, cfg, lambda kind, ev, reason: None if reason else
                  on_event("would push", ev, None), dry_run=True)
    unreachable = None
    try:
        hello = client.hello()
    except Unreachable as e:   # what is here is counted still; what is there is not
        hello, unreachable = {}, str(e)
    head = hello.get("head")
    return {"dry_run": True, "unreachable": unreachable, "would_stamp": s["stamped"],
            "would_push": counts["queued"] + s["stamped"] - s["local_only"],
            "would_keep_local": s["local_only"],
            "would_pull_at_most": max(0, head - store.cursor()) if isinstance(head, int) else None,
            "would_resolve": counts["unapplied"] + s["stamped"], "device": hello.get("device"),
            "team": hello.get("team"), "problems": s["problems"]}


def status(cfg, check=False):
    """Everything `sk sync status` shows, as a dict. Reads only: a home with no
    local log yet shows zeros, and nothing is created."""
    info = {"server": cfg.get("SK_SERVER"), "server_from": cfg.source("SK_SERVER"),
            "config": str(cfg.env_path), "config_exists": cfg.env_path.exists(),
            "home": str(cfg.home), "database": str(cfg.db_path)}
    if cfg.home.exists() and not cfg.home.is_dir():
        raise ConfigError(f"SK_HOME '{cfg.home}' is not a directory")
    store = open_store(cfg, create=False) if cfg.db_path.exists() else None
    info["log_exists"] = store is not None
    meta = store.meta if store else (lambda key, default=None: default)
    info["node_id"] = meta("node_id")
    info.update(store.counts(totals=False) if store else
                {"queued": 0, "rejected": 0, "local_only": 0, "unstamped": 0, "unapplied": 0,
                 "oldest_queued": None})
    info["unconfirmed"] = store.count_claims() if store else 0
    info["cursor"] = int(meta("cursor", "0"))
    info["clock"] = int(meta("clock", "0"))
    info["last_success"] = meta("last_success")
    info["failures_since"] = int(meta("failures_since", "0"))
    info["last_failure"] = meta("last_failure")
    info["last_error"] = meta("last_error") if info["failures_since"] else None
    info["watch"] = _watch_session(store) if store else None
    from . import history, snapshot
    info["shallow"] = snapshot.shallow_info(store) if store else None
    info["open_conflicts"] = history.open_count(store) if store else 0
    try:
        rules = never_sync(cfg)
        info["never_sync"] = (f"{len(rules.rules) + len(rules.type_rules)} rules"
                              f" ({len(cfg.never_sync_rules)} from SK_NEVER_SYNC)")
    except ConfigError as e:
        info["never_sync"] = f"error: {e}"
    if store:
        store.close()
    if check:
        info["connection"], info["connection_detail"], info["connection_exit"] = \
            check_connection(cfg)
    return info


def _watch_session(store):
    """The running `sk sync watch` session of this device, or None."""
    try:
        watch = json.loads(store.meta("watch", "null"))
        if not watch or watch.get("state") == "stopped":
            return None
        os.kill(int(watch["pid"]), 0)
    except (ValueError, TypeError, KeyError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return watch


def check_connection(cfg):
    """('Connected' | 'Reachable (auth required)' | 'Unreachable' | 'Error', detail,
    exit code)."""
    client = None
    try:
        client = open_client(cfg)
        t0 = time.monotonic()
        hello = client.hello()
        ms = (time.monotonic() - t0) * 1000
        return "Connected", (f"device '{hello.get('device')}', team '{hello.get('team')}',"
                             f" protocol {hello.get('protocol')}, {ms:.0f} ms"), 0
    except AuthError as e:
        return "Reachable (auth required)", str(e), e.exit_code
    except Unreachable as e:
        return "Unreachable", str(e), e.exit_code
    except SkError as e:
        return "Error", str(e), e.exit_code
    finally:
        if client is not None:
            client.close()


def setup(cfg, server, api_key):
    """Verify `server` and `api_key` against the server, then write $SK_HOME/.env."""
    from .client import Client
    from .config import Config
    trial = Config(cfg.home, {"SK_SERVER": server, "SK_API_KEY": api_key})
    client = Client(trial.server, trial.api_key, cfg.timeout)
    try:
        hello = client.hello()
    finally:
        client.close()
    cfg.write_env({"SK_SERVER": trial.server, "SK_API_KEY": trial.api_key})
    team = hello.get("team")
    store = open_store(cfg)
    store.node_id()   # a device set up has its node id
    if isinstance(team, str):   # set up with a key of another team: moved on purpose
        from .crypto import parse_api_key
        store.key_id = parse_api_key(trial.api_key)[0]
        store.switch_team(team, moved=True)
    store.close()
    return {"server": trial.server, "device": hello.get("device"), "team": team,
            "config": str(cfg.env_path)}
