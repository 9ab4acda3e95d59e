-- telemetry: records that arrived under a stored record's (site, seq) with other content. The
-- batch was refused and dead-lettered; this row is what the seq_conflict alert reads.
-- Times are INTEGER microseconds since the Unix epoch, UTC.
CREATE TABLE seq_conflicts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    site        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    batch       TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    received_at INTEGER NOT NULL
);

CREATE INDEX seq_conflicts_received ON seq_conflicts (received_at);
