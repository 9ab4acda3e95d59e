-- telemetry: what agents send, stored once per (site, seq), and what could not be stored.
-- The site is checked against `sites` once per batch inside the batch's transaction; rows
-- carry no foreign key so bulk inserts do not pay one lookup per row.

CREATE TABLE readings (
    site        TEXT             NOT NULL,
    seq         BIGINT           NOT NULL,
    device      TEXT             NOT NULL,
    ts          TIMESTAMPTZ      NOT NULL,
    -- caudal_common::Quality bits; 0 is good.
    quality     INTEGER          NOT NULL DEFAULT 0,
    flow_lps    DOUBLE PRECISION,
    total_m3    DOUBLE PRECISION,
    level_m     DOUBLE PRECISION,
    -- Extra channels, NULL when none.
    extra       JSONB,
    received_at TIMESTAMPTZ      NOT NULL,
    PRIMARY KEY (site, seq)
);

CREATE INDEX readings_site_device_ts ON readings (site, device, ts);

CREATE TABLE events (
    site        TEXT             NOT NULL,
    seq         BIGINT           NOT NULL,
    ts          TIMESTAMPTZ      NOT NULL,
    device      TEXT,
    kind        TEXT             NOT NULL,
    message     TEXT             NOT NULL DEFAULT '',
    previous    DOUBLE PRECISION,
    current     DOUBLE PRECISION,
    received_at TIMESTAMPTZ      NOT NULL,
    PRIMARY KEY (site, seq)
);

CREATE INDEX events_site_ts ON events (site, ts);

CREATE TABLE gaps (
    site        TEXT        NOT NULL,
    seq         BIGINT      NOT NULL,
    device      TEXT,
    from_ts     TIMESTAMPTZ NOT NULL,
    to_ts       TIMESTAMPTZ NOT NULL,
    -- Sequence numbers covered (eviction); NULL when nothing was taken.
    seq_from    BIGINT,
    seq_to      BIGINT,
    count       BIGINT      NOT NULL,
    cause       TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (site, seq)
);

CREATE INDEX gaps_site_from ON gaps (site, from_ts);

-- Payloads that were refused, kept as received with the reason.
CREATE TABLE dead_letters (
    id          BIGSERIAL   PRIMARY KEY,
    topic       TEXT        NOT NULL,
    -- The site named by the topic, when it names one.
    site        TEXT,
    payload     BYTEA       NOT NULL,
    reason      TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX dead_letters_site ON dead_letters (site, received_at);

-- The last status each agent reported (retained message and last will).
CREATE TABLE site_status (
    site                TEXT        NOT NULL PRIMARY KEY REFERENCES sites (id),
    online              BOOLEAN     NOT NULL DEFAULT FALSE,
    -- When the cloud last heard from the agent itself (status or batch).
    last_seen           TIMESTAMPTZ,
    -- `ts` of the last status the agent built.
    status_ts           TIMESTAMPTZ,
    backlog             BIGINT,
    oldest_unsent_age_s BIGINT,
    clock_synced        BOOLEAN,
    evicted             BIGINT,
    agent_version       TEXT,
    config_version      TEXT,
    -- Device id -> last poll state.
    devices             JSONB,
    updated_at          TIMESTAMPTZ NOT NULL
);
