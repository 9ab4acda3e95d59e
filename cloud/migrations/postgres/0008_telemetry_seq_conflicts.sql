-- telemetry: records that arrived under a stored record's (site, seq) with other content. The
-- batch was refused and dead-lettered; this row is what the seq_conflict alert reads.
CREATE TABLE seq_conflicts (
    id          BIGSERIAL   PRIMARY KEY,
    site        TEXT        NOT NULL,
    seq         BIGINT      NOT NULL,
    batch       TEXT        NOT NULL,
    detail      TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX seq_conflicts_received ON seq_conflicts (received_at);
