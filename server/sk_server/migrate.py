"""sk-admin migrate: copy one server's database into another (SQLite into
PostgreSQL, usually), keeping every team's sequence numbers and hash chain, so
devices' cursors stay valid, and every device's key material, so their API keys
keep working.

Idempotent and resumable: a team whose log in the target is a prefix of the
source's goes on from the target's head; a run that was cut off is run again. The
source only ever grows, so running it again after the old server has stopped
copies what arrived during the first run.
"""

from .store import GENESIS, STORED_COLUMNS, StoreError

CHUNK = 5000


class MigrateError(StoreError):
    pass


def chain_at(store, team, seq):
    """The chain value after event `seq` of `team` in `store`."""
    if seq == 0:
        return GENESIS
    rows = store.export_events(team, seq - 1, 1)["events"]
    if not rows or rows[0][0] != seq:
        return None
    return bytes(rows[0][STORED_COLUMNS.index("chain")])


def plan(source, target, force=False):
    """Check that target can take source. Returns the source's export_meta() and
    the work: [(team, target head, source head)]."""
    src, tgt = source.export_meta(), target.export_meta()
    src_teams = {t[0]: t for t in src["teams"]}
    tgt_teams = {t[0]: t for t in tgt["teams"]}
    src_devices = {d[0]: d for d in src["devices"]}
    other_teams = sorted(t for t in tgt_teams if t not in src_teams)
    other_devices = sorted(d[0] for d in tgt["devices"] if d[0] not in src_devices)
    if (other_teams or other_devices) and not force:
        what = ([f"team(s) {', '.join(other_teams[:5])}"] if other_teams else []) + \
               ([f"device(s) {', '.join(other_devices[:5])}"] if other_devices else [])
        raise MigrateError(f"the target holds data the source does not ({'; '.join(what)});"
                           " give --force to add the source's alongside it")
    for d in tgt["devices"]:
        mine = src_devices.get(d[0])
        if mine and mine[1] != d[1]:
            raise MigrateError(f"device '{d[0]}' is in team '{d[1]}' in the target but in"
                               f" '{mine[1]}' in the source")
    work = []
    for team, head, *_ in src["teams"]:
        there = tgt_teams.get(team)
        done = there[1] if there else 0
        if there and (done > head or chain_at(source, team, done) != bytes(there[3])):
            raise MigrateError(f"team '{team}' in the target has a log that is not the start"
                               " of the source's; refusing to mix them")
        work.append((team, done, head))
    return src, work


def migrate(source, target, meta, work, progress=None, chunk=CHUNK):
    """Copy source into target, as plan() found it can. Returns {"teams",
    "devices", "keys", "events" (copied now), "already" (there before)}."""
    target.import_meta(meta)
    copied = 0
    for team, after, head in work:
        while after < head:
            part = source.export_events(team, after, chunk)   # events, their batches, legacy
            rows = part["events"]
            if not rows:
                break
            target.import_events(team, part)
            after = rows[-1][0]
            copied += len(rows)
            if progress:
                progress(len(rows))
    return {"teams": len(meta["teams"]), "devices": len(meta["devices"]),
            "keys": len(meta["keys"]), "events": copied,
            "already": sum(done for _, done, _ in work)}


def total(work):
    return sum(head - done for _, done, head in work)
