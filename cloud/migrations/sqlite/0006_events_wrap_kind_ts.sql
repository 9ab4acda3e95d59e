-- telemetry: the wrap value of a totalizer_rollover event, from the event's own `wrap` field
-- (agents before it named the value only in the message text, which the volume still reads
-- when this is NULL).
ALTER TABLE events ADD COLUMN wrap DOUBLE PRECISION;

-- The totalizer_backwards alert reads recent events of a few kinds across all sites; events are
-- rare next to readings, so this index costs the ingest next to nothing.
CREATE INDEX events_kind_ts ON events (kind, ts);
