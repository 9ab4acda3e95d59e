-- telemetry: dead letters kept bounded. A refused message is kept once per fingerprint (the
-- same payload on the same topic; for a site the cloud does not know or has deactivated, one
-- row per site and reason) with how many times it came, when first and last; its payload is
-- cut at ingest.dead_letter_max_payload_bytes (payload_bytes says how long it was). Rows older
-- than ingest.dead_letter_retention_days, and the oldest beyond ingest.dead_letter_max_rows,
-- are removed by the telemetry sweeper.
ALTER TABLE dead_letters ADD COLUMN fingerprint TEXT;
ALTER TABLE dead_letters ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
ALTER TABLE dead_letters ADD COLUMN last_received_at TIMESTAMPTZ;
ALTER TABLE dead_letters ADD COLUMN payload_bytes BIGINT;
UPDATE dead_letters SET last_received_at = received_at, payload_bytes = length(payload);
CREATE UNIQUE INDEX dead_letters_fingerprint ON dead_letters (fingerprint);
CREATE INDEX dead_letters_last ON dead_letters (last_received_at);
