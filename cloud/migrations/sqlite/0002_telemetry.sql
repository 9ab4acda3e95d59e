-- telemetry: what agents send, stored once per (site, seq), and what could not be stored.
-- Times are INTEGER microseconds since the Unix epoch, UTC. The site is checked against
-- `sites` once per batch inside the batch's transaction; rows carry no foreign key so bulk
-- inserts do not pay one lookup per row.

CREATE TABLE readings (
    site        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    device      TEXT    NOT NULL,
    ts          INTEGER NOT NULL,
    -- caudal_common::Quality bits; 0 is good.
    quality     INTEGER NOT NULL DEFAULT 0,
    flow_lps    REAL,
    total_m3    REAL,
    level_m     REAL,
    -- JSON object of extra channels, NULL when none.
    extra       TEXT,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (site, seq)
) WITHOUT ROWID;

CREATE INDEX readings_site_device_ts ON readings (site, device, ts);

CREATE TABLE events (
    site        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    device      TEXT,
    kind        TEXT    NOT NULL,
    message     TEXT    NOT NULL DEFAULT '',
    previous    REAL,
    current     REAL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (site, seq)
) WITHOUT ROWID;

CREATE INDEX events_site_ts ON events (site, ts);

CREATE TABLE gaps (
    site        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    device      TEXT,
    from_ts     INTEGER NOT NULL,
    to_ts       INTEGER NOT NULL,
    -- Sequence numbers covered (eviction); NULL when nothing was taken.
    seq_from    INTEGER,
    seq_to      INTEGER,
    count       INTEGER NOT NULL,
    cause       TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (site, seq)
) WITHOUT ROWID;

CREATE INDEX gaps_site_from ON gaps (site, from_ts);

-- Payloads that were refused, kept as received with the reason.
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT    NOT NULL,
    -- The site named by the topic, when it names one.
    site        TEXT,
    payload     BLOB    NOT NULL,
    reason      TEXT    NOT NULL,
    received_at INTEGER NOT NULL
);

CREATE INDEX dead_letters_site ON dead_letters (site, received_at);

-- The last status each agent reported (retained message and last will).
CREATE TABLE site_status (
    site                TEXT    NOT NULL PRIMARY KEY REFERENCES sites (id),
    online              INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    -- When the cloud last heard from the agent itself (status or batch).
    last_seen           INTEGER,
    -- `ts` of the last status the agent built.
    status_ts           INTEGER,
    backlog             INTEGER,
    oldest_unsent_age_s INTEGER,
    clock_synced        INTEGER,
    evicted             INTEGER,
    agent_version       TEXT,
    config_version      TEXT,
    -- JSON object: device id -> last poll state.
    devices             TEXT,
    updated_at          INTEGER NOT NULL
);
