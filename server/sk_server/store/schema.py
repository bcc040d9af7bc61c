"""The server's schema, once, in words each dialect fills in ({blob}, {bigint},
{without_rowid}); and the column lists the SQL is built from."""

SCHEMA_VERSION = 4
# an event as the server keeps it: no type, aggregate, payload or time, only what
# routes and de-duplicates it; its body is entry `idx` of a sealed batch
EVENT_COLUMNS = ("event_id", "node_id", "lamport_clock")
STORED_COLUMNS = ("seq", *EVENT_COLUMNS, "batch", "idx", "chain", "device", "received")
BATCH_COLUMNS = ("batch", "epoch", "manifest", "sealed", "size", "device", "received")
LEGACY_COLUMNS = ("seq", "event_type", "aggregate_type", "aggregate_id", "payload", "timestamp")
DEVICE_COLUMNS = ("name", "team", "created", "last_seen", "revoked", "identity", "approval")

EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    team          TEXT NOT NULL,
    seq           {bigint} NOT NULL,
    event_id      TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    lamport_clock {bigint} NOT NULL,
    batch         {bigint},           -- the sealed batch that holds it (NULL: in legacy)
    idx           {bigint},           -- its place in that batch's manifest
    chain         {blob} NOT NULL,
    device        TEXT NOT NULL,      -- the device that pushed it
    received      TEXT NOT NULL,
    PRIMARY KEY (team, seq)
){without_rowid}"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams (
    team     TEXT PRIMARY KEY,
    head     {bigint} NOT NULL DEFAULT 0,   -- last seq: dense, in commit order
    lamport  {bigint} NOT NULL DEFAULT 0,   -- highest Lamport clock stored
    chain    {blob} NOT NULL,               -- hash chain value after event `head`
    created  TEXT NOT NULL,
    epoch    {bigint} NOT NULL DEFAULT 0,   -- the team key's current epoch (0: none yet)
    rekey    {bigint} NOT NULL DEFAULT 0,   -- 1: a device was revoked or rotated, so nothing
                                            -- is written until a member starts an epoch
    approval {bigint} NOT NULL DEFAULT 0,   -- 1: members grant only approved devices
    asked    {bigint} NOT NULL DEFAULT 0    -- when a device was last asked for a snapshot (ms)
);
CREATE TABLE IF NOT EXISTS devices (
    name      TEXT PRIMARY KEY,
    team      TEXT NOT NULL REFERENCES teams(team),
    created   TEXT NOT NULL,
    last_seen TEXT,
    revoked   TEXT,
    identity  {blob},        -- its X25519 public key (the private half never leaves it)
    approval  {blob},        -- a member's approval of that key, MAC'd under the team key
    pulled    {bigint},      -- the point of its team's log its last pull reached
    queued    {bigint}       -- how many events it last said it had queued to push
);
CREATE TABLE IF NOT EXISTS keys (
    key_id      TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices(name),
    master      {blob} NOT NULL,       -- HKDF output wrapped by the server secret
    created     TEXT NOT NULL,
    retired     TEXT,
    retired_why TEXT
);"""+EVENTS_TABLE+""";
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events(team, event_id);
CREATE INDEX IF NOT EXISTS events_stamp ON events(team, node_id, lamport_clock);
CREATE TABLE IF NOT EXISTS batches (
    team     TEXT NOT NULL,
    batch    {bigint} NOT NULL,
    epoch    {bigint} NOT NULL,
    manifest {blob} NOT NULL,      -- the canonical manifest (sk.sealed), as the device sent it
    sealed   {blob} NOT NULL,      -- the sealed content: nothing the server can read
    size     {bigint} NOT NULL,
    device   TEXT NOT NULL,
    received TEXT NOT NULL,
    PRIMARY KEY (team, batch)
){without_rowid};
-- what a team's devices pushed before end-to-end encryption, until a member seals it
CREATE TABLE IF NOT EXISTS legacy (
    team           TEXT NOT NULL,
    seq            {bigint} NOT NULL,
    event_type     TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    payload        TEXT NOT NULL,
    timestamp      TEXT NOT NULL,
    PRIMARY KEY (team, seq)
){without_rowid};
CREATE TABLE IF NOT EXISTS epochs (
    team       TEXT NOT NULL,
    epoch      {bigint} NOT NULL,
    created_by TEXT NOT NULL,
    start_seq  {bigint} NOT NULL,     -- the team's head when the epoch began
    created    TEXT NOT NULL,
    PRIMARY KEY (team, epoch)
){without_rowid};
-- a team key sealed to one device's identity by a member (the server cannot open it)
CREATE TABLE IF NOT EXISTS grants (
    team       TEXT NOT NULL,
    epoch      {bigint} NOT NULL,
    device     TEXT NOT NULL,
    recipient  {blob} NOT NULL,      -- the identity it is sealed to
    sealed     {blob} NOT NULL,
    granted_by TEXT NOT NULL,
    granter    {blob} NOT NULL,      -- the identity of the device that sealed it
    created    TEXT NOT NULL,
    PRIMARY KEY (team, epoch, device, recipient)
){without_rowid};
-- the newest few snapshots of each team's state, sealed by a member (sk.snapshot)
CREATE TABLE IF NOT EXISTS snapshots (
    team     TEXT NOT NULL,
    seq      {bigint} NOT NULL,
    chain    {blob} NOT NULL,
    epoch    {bigint} NOT NULL,
    sealed   {blob} NOT NULL,
    size     {bigint} NOT NULL,
    device   TEXT NOT NULL,
    created  TEXT NOT NULL,
    PRIMARY KEY (team, seq)
){without_rowid};
-- each node id belongs to the device that first pushed events under it
CREATE TABLE IF NOT EXISTS nodes (
    team    TEXT NOT NULL,
    node_id TEXT NOT NULL,
    device  TEXT NOT NULL,
    PRIMARY KEY (team, node_id)
){without_rowid};
CREATE TABLE IF NOT EXISTS nonces (
    key_id  TEXT NOT NULL,
    nonce   {blob} NOT NULL,
    expires {bigint} NOT NULL,
    PRIMARY KEY (key_id, nonce)
){without_rowid};
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires);
CREATE TABLE IF NOT EXISTS auth_failures (
    addr         TEXT PRIMARY KEY,
    window_start {bigint} NOT NULL,
    count        {bigint} NOT NULL
){without_rowid};
CREATE TABLE IF NOT EXISTS ws_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    expires    {bigint} NOT NULL,
    used       {bigint}
){without_rowid};
"""


def statements(words):
    """The schema's statements in a dialect's words."""
    return [s.strip() for s in SCHEMA.format(**words).split(";") if s.strip()]


def upgrade(db, words, columns):
    """Bring a database of schema 2 or 3 (sk 0.3.0: events in plaintext) to 4 (the
    events keep their seq, id, node, clock and chain, and what the server can no
    longer keep moves to `legacy`, until a member device seals it: see
    SQLStore.reseal), and any database to the columns added since. `columns(table)`
    lists a table's columns; runs inside the schema transaction, before
    statements(). True if plaintext events were moved."""
    moved = "payload" in columns("events")
    if moved:
        _move_plaintext(db, words)
    # columns added since (what a device reports, for sk-admin status and metrics)
    for table, column, kind in (("teams", "epoch", "{bigint} NOT NULL DEFAULT 0"),
                                ("teams", "asked", "{bigint} NOT NULL DEFAULT 0"),
                                ("teams", "rekey", "{bigint} NOT NULL DEFAULT 0"),
                                ("teams", "approval", "{bigint} NOT NULL DEFAULT 0"),
                                ("devices", "identity", "{blob}"),
                                ("devices", "approval", "{blob}"),
                                ("devices", "pulled", "{bigint}"),
                                ("devices", "queued", "{bigint}")):
        if column not in columns(table):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind.format(**words)}")
    return moved


def _move_plaintext(db, words):
    db.execute("ALTER TABLE events RENAME TO events_plain")
    db.execute(EVENTS_TABLE.format(**words))
    db.execute("INSERT INTO events (team, seq, event_id, node_id, lamport_clock, chain, device,"
               " received) SELECT team, seq, event_id, node_id, lamport_clock, chain, device,"
               " received FROM events_plain")
    db.execute([s for s in statements(words) if "TABLE IF NOT EXISTS legacy" in s][0])
    db.execute("INSERT INTO legacy (team, " + ", ".join(LEGACY_COLUMNS) + ") SELECT team, "
               + ", ".join(LEGACY_COLUMNS) + " FROM events_plain")
    db.execute("DROP TABLE events_plain")
    # each node id is bound to the device that first pushed under it (schema 3 did this
    # as events came; an older log binds its nodes here, in the order it holds them)
    nodes = [s for s in statements(words) if "TABLE IF NOT EXISTS nodes" in s][0]
    db.execute(nodes)
    first = {}
    for team, node, device in db.execute("SELECT team, node_id, device FROM events"
                                         " ORDER BY team, seq").fetchall():
        first.setdefault((team, node), device)
    for (team, node), device in first.items():
        db.execute("INSERT INTO nodes (team, node_id, device) VALUES (?, ?, ?)"
                   " ON CONFLICT DO NOTHING", (team, node, device))
