"""The server's schema, once, in words each dialect fills in ({blob}, {bigint},
{without_rowid}); and the column lists the SQL is built from."""

from sk.event import FIELDS as EVENT_COLUMNS

SCHEMA_VERSION = 3
STORED_COLUMNS = ("seq", *EVENT_COLUMNS, "chain", "device", "received")
DEVICE_COLUMNS = ("name", "team", "created", "last_seen", "revoked")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams (
    team    TEXT PRIMARY KEY,
    head    {bigint} NOT NULL DEFAULT 0,   -- last seq: dense, in commit order
    lamport {bigint} NOT NULL DEFAULT 0,   -- highest Lamport clock stored
    chain   {blob} NOT NULL,               -- hash chain value after event `head`
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    name      TEXT PRIMARY KEY,
    team      TEXT NOT NULL REFERENCES teams(team),
    created   TEXT NOT NULL,
    last_seen TEXT,
    revoked   TEXT
);
CREATE TABLE IF NOT EXISTS keys (
    key_id      TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices(name),
    master      {blob} NOT NULL,       -- HKDF output wrapped by the server secret
    created     TEXT NOT NULL,
    retired     TEXT,
    retired_why TEXT
);
CREATE TABLE IF NOT EXISTS events (
    team           TEXT NOT NULL,
    seq            {bigint} NOT NULL,
    event_id       TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    lamport_clock  {bigint} NOT NULL,
    node_id        TEXT NOT NULL,
    payload        TEXT NOT NULL,
    timestamp      TEXT NOT NULL,
    chain          {blob} NOT NULL,
    device         TEXT NOT NULL,
    received       TEXT NOT NULL,
    PRIMARY KEY (team, seq)
){without_rowid};
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events(team, event_id);
CREATE INDEX IF NOT EXISTS events_stamp ON events(team, node_id, lamport_clock);
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
