-- telemetry: the totalizer_backwards alert reads recent events of a few kinds across all sites;
-- events are rare next to readings, so this index costs the ingest next to nothing.
CREATE INDEX events_kind_ts ON events (kind, ts);
