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
from .store import LOG_COLUMNS, open_store

MAX_BATCH_BYTES = 4 * 1024 * 1024   # keep a push body well under the server's limit
PAGE = 1000


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
    except KeyboardInterrupt:
        store.record_outcome(False, "interrupted")
        raise
    store.record_outcome(True)


def stamp(store, cfg):
    try:
        rules = NeverSync(cfg.never_sync_rules)
    except EventError as e:
        raise ConfigError(f"SK_NEVER_SYNC: {e}") from None
    stamped, local_only, dups, problems = store.stamp(rules)
    return {"stamped": stamped, "local_only": local_only, "duplicates": dups,
            "problems": [{"unstamped_seq": s, "reason": r} for s, r in problems]}


# -- push ---------------------------------------------------------------------
def _to_wire(row):
    ev = dict(zip(LOG_COLUMNS, row))
    ev["payload"] = json.loads(ev["payload"])
    return ev


class Diverged(IntegrityError):
    """The server's log is not the one this device saw (reason), or the device's
    key now belongs to another team's log (reason None); handled by healing()."""

    def __init__(self, reason, team=None):
        super().__init__(reason or f"the key now belongs to team '{team}'")
        self.reason, self.team = reason, team


def check_answer(store, answer):
    """Raise Diverged if a push answer or pull page says the device's point is not
    on the server's log, or that its key is now another team's."""
    team = answer.get("team")
    if isinstance(team, str) and store.switch_team(team):
        raise Diverged(None, team)
    if isinstance(answer.get("diverged"), str):
        raise Diverged(answer["diverged"], team)


def healing(store, attempt):
    """attempt(first=True); if the device's key moved to another team, read that
    team's log from its start: attempt(first=False). If the server's log diverged
    from what this device saw, queue the events it holds again (LocalStore.heal)
    and attempt(first=False); its counts say so under "healed"."""
    try:
        return attempt(True)
    except Diverged as d:
        healed = None
        if d.reason is not None:
            healed = {"reason": d.reason, "requeued": store.heal()}
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


def encode_events(rows, known=None):
    """A push body as JSON text, built around each event's stored payload text
    (validated when it was appended) instead of parsing and re-encoding it."""
    from .event import dumps
    parts = []
    for _, r in rows:
        parts.append(f'{{"event_id":{dumps(r[0])},"event_type":{dumps(r[1])},'
                     f'"aggregate_type":{dumps(r[2])},"aggregate_id":{dumps(r[3])},'
                     f'"lamport_clock":{int(r[4])},"node_id":{dumps(r[5])},'
                     f'"payload":{r[6]},"timestamp":{dumps(r[7])}}}')
    tail = f',"known":{dumps(known)}' if known else ""
    return '{"events":[' + ",".join(parts) + "]" + tail + "}"


def _batches(rows, max_bytes=MAX_BATCH_BYTES):
    """Split queued rows so no batch's payload text exceeds max_bytes."""
    batch, size = [], 0
    for seq, row in rows:
        n = len(row[6]) + 300
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append((seq, row))
        size += n
    if batch:
        yield batch


def _send(store, client, batch, counts, on_event, answer=None):
    """Push one batch (or settle the `answer` already fetched for it); on HTTP 413
    split it, and set a lone event aside."""
    try:
        if answer is None:
            answer = client.call("push", encode_events(batch, known_out(store)))
        elif isinstance(answer, BaseException):
            raise answer
    except ServerError as e:
        if e.status != 413:
            raise
        if len(batch) == 1:
            eid = batch[0][1][0]
            reason = f"server refused this event alone with HTTP 413 (too large): {e}"
            store.set_aside(eid, reason)
            counts["rejected"] += 1
            if on_event:
                on_event("rejected", eid, reason)
            return
        half = len(batch) // 2
        _send(store, client, batch[:half], counts, on_event)
        _send(store, client, batch[half:], counts, on_event)
        return
    check_answer(store, answer)
    results = answer.get("results")
    ids = [row[0] for _, row in batch]
    if (not isinstance(results, list) or len(results) != len(ids)
            or any(not isinstance(r, dict) or r.get("event_id") != i for r, i in zip(results, ids))):
        raise IntegrityError("server's push answer does not match the events sent")
    out = []
    for r in results:
        status = r.get("status")
        if status not in ("accepted", "duplicate", "rejected"):
            raise IntegrityError(f"server answered unknown push status {status!r}")
        reason = r.get("reason") if status == "rejected" else None
        out.append((r["event_id"], status, reason))
        counts[status] += 1
        if on_event:
            on_event(status, r["event_id"], reason)
    store.mark_pushed(out, point_in(answer, "head"))


def push(store, client, max_n=wire.MAX_BATCH, all_batches=False, on_event=None, progress=None):
    """Push one batch (or, with all_batches, every batch) of queued events. If the
    server's log turns out not to be the one this device saw, heal it: queue every
    event held here again and push (counts["healed"] says so)."""
    return healing(store, lambda first: _push(store, client, max_n, all_batches, on_event,
                                              progress))


def _push(store, client, max_n, all_batches, on_event, progress):
    """Push one batch (or, with all_batches, every batch) of queued events.

    With all_batches the next batch is read from the queue and encoded while the
    server stores the previous one, and sent (on a connection of its own) while
    the previous answer is applied, so client and server work side by side; each
    answer is applied in its own transaction, in order."""
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "batches": 0}
    max_n = max(1, min(int(max_n), wire.MAX_BATCH))
    moved = lambda: counts["accepted"] + counts["duplicate"] + counts["rejected"]  # noqa: E731
    if not all_batches:
        for batch in _batches(store.queued(max_n)):
            _send(store, client, batch, counts, on_event)
            counts["batches"] += 1
        if progress:
            progress(moved())
    else:
        from concurrent.futures import ThreadPoolExecutor
        inflight, after = None, 0
        sender = client.twin()
        with ThreadPoolExecutor(1) as pool:
            try:
                while True:
                    rows = store.queued(max_n, after)
                    if not rows:
                        break
                    for batch in _batches(rows):
                        after = batch[-1][0]
                        body = encode_events(batch, known_out(store))
                        done = inflight[0].result() if inflight else None  # wait for n-1
                        future = pool.submit(_call_push, sender, body)      # send n
                        if inflight:                                        # settle n-1
                            _settle(store, client, inflight, counts, on_event, progress,
                                    moved, done)
                        inflight = (future, batch)
                        counts["batches"] += 1
                if inflight:
                    _settle(store, client, inflight, counts, on_event, progress, moved,
                            inflight[0].result())
                    inflight = None
            finally:
                if inflight:
                    inflight[0].cancel()
                sender.close()
    counts["queued"] = store.counts(totals=False)["queued"]
    return counts


def _call_push(client, body):
    try:
        return client.call("push", body)
    except ServerError as e:
        return e  # a 413 is settled (split) in order, by the main thread


def _settle(store, client, inflight, counts, on_event, progress, moved, answer):
    """Apply the answer to an earlier batch (a 413 is split and resent here, on
    the main thread's own connection)."""
    _, batch = inflight
    before = moved()
    _send(store, client, batch, counts, on_event, answer=answer)
    if progress:
        progress(moved() - before)


# -- pull ---------------------------------------------------------------------
def pull(store, client, since=None, on_event=None, progress=None, page_size=PAGE):
    """Fetch every page after the cursor (or `since`), store it and move the cursor.
    The cursor only moves when the pull started at or before it. If the server's
    log is not the one this device saw, queue every event held here to push again
    and pull the whole log (counts["healed"] says so)."""
    return healing(store, lambda first: _pull(store, client, since if first else None,
                                              on_event, progress, page_size))


def _pull(store, client, since, on_event, progress, page_size):
    stored = store.cursor()
    cursor = stored if since is None else int(since)
    moves_cursor = cursor <= stored
    skip = store.own_events()
    counts = {"received": 0, "new": 0, "pages": 0}
    while True:
        page = client.pull(cursor, page_size, skip, known_out(store))
        if isinstance(page.get("diverged"), str) and not moves_cursor:
            raise UsageError(f"--since {since}: {page['diverged']}")
        check_answer(store, page)
        events, nxt, more = page.get("events"), page.get("next"), page.get("more")
        if (not isinstance(events, list) or type(nxt) is not int or nxt < cursor
                or not isinstance(more, bool) or (more and nxt == cursor)):
            raise IntegrityError("malformed pull page from server")
        try:
            rows = [check_stamped(ev, new=False) for ev in events]
        except EventError as e:
            raise IntegrityError(f"server sent an invalid event: {e}") from None
        counts["new"] += store.receive(rows, nxt if moves_cursor else 0, point_in(page, "next"))
        counts["received"] += len(rows)
        counts["pages"] += 1
        if on_event:
            for ev in events:
                on_event("pulled", ev)
        if progress:
            progress(len(rows))
        cursor = nxt
        if not more:
            break
    counts["cursor"] = store.cursor()
    return counts


# -- porcelain ----------------------------------------------------------------
def run(cfg, dry_run=False, on_event=None, progress_factory=None):
    """`sk sync`: stamp -> push every batch -> pull every page -> resolve."""
    from .resolve import resolve
    store = open_store(cfg)
    if dry_run:
        return _dry_run(store, cfg)
    summary = {}
    try:
        with device_lock(cfg), tracked(store):
            client = open_client(cfg)
            summary["stamp"] = stamp(store, cfg)
            queued = store.counts(totals=False)["queued"]
            bar = progress_factory("push", queued) if progress_factory else None
            summary["push"] = push(store, client, all_batches=True, on_event=on_event,
                                   progress=bar)
            if bar:
                bar.close()
            pulled = (lambda k, ev: on_event(k, ev["event_id"], None)) if on_event else None
            bar = progress_factory("pull", None) if progress_factory else None
            summary["pull"] = pull(store, client, on_event=pulled, progress=bar)
            if bar:
                bar.close()
            healed = summary["push"].get("healed") or summary["pull"].get("healed")
            if "healed" in summary["pull"]:  # found by the pull: push back what it lost
                again = push(store, client, all_batches=True, on_event=on_event)
                for k in ("accepted", "duplicate", "rejected"):
                    summary["push"][k] += again[k]
                summary["push"]["queued"] = again["queued"]
                more = pull(store, client, on_event=pulled)
                for k in ("received", "new"):
                    summary["pull"][k] += more[k]
                summary["pull"]["cursor"] = more["cursor"]
            if healed:
                summary["healed"] = {**healed, "resent": summary["push"]["accepted"]
                                     + summary["push"]["duplicate"],
                                     "restored": summary["push"]["accepted"]}
            client.close()
    finally:
        # offline or not, this device's own edits show in its state
        unapplied = store.counts(totals=False)["unapplied"]
        bar = progress_factory("resolve", unapplied) if progress_factory else None
        summary["resolved"] = resolve(store, cfg.path_map or None, progress=bar)
        if bar:
            bar.close()
    return summary


def _dry_run(store, cfg):
    counts = store.counts(totals=False)
    hello = open_client(cfg).hello()
    head = hello.get("head")
    return {"dry_run": True, "would_stamp": counts["unstamped"], "would_push": counts["queued"],
            "would_pull_at_most": max(0, head - store.cursor()) if isinstance(head, int) else None,
            "would_resolve": counts["unapplied"], "device": hello.get("device"),
            "team": hello.get("team")}


def status(cfg, check=False):
    """Everything `sk sync status` shows, as a dict."""
    info = {"server": cfg.get("SK_SERVER"), "server_from": cfg.source("SK_SERVER"),
            "config": str(cfg.env_path), "config_exists": cfg.env_path.exists(),
            "home": str(cfg.home), "database": str(cfg.db_path)}
    store = open_store(cfg)
    info["node_id"] = store.node_id()
    info.update(store.counts(totals=False))
    info["cursor"] = store.cursor()
    info["clock"] = store.clock()
    info["last_success"] = store.meta("last_success")
    info["failures_since"] = int(store.meta("failures_since", "0"))
    info["last_failure"] = store.meta("last_failure")
    info["last_error"] = store.meta("last_error") if info["failures_since"] else None
    info["watch"] = _watch_session(store)
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


def setup(cfg, server, api_key):
    """Verify `server` and `api_key` against the server, then write $SK_HOME/.env."""
    from .client import Client
    from .config import Config
    trial = Config(cfg.home, {"SK_SERVER": server, "SK_API_KEY": api_key})
    client = Client(trial.server, trial.api_key, cfg.timeout)
    hello = client.hello()
    cfg.write_env({"SK_SERVER": trial.server, "SK_API_KEY": trial.api_key})
    team = hello.get("team")
    if isinstance(team, str):
        open_store(cfg).switch_team(team)
    return {"server": trial.server, "device": hello.get("device"), "team": team,
            "config": str(cfg.env_path)}
