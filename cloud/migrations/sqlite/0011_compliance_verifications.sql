-- compliance: each check of a slot's receipt against the DGA's GET endpoint. A slot's
-- verification is its latest row; earlier rows stay as the history. Times are INTEGER
-- microseconds since the Unix epoch, UTC.
CREATE TABLE compliance_verifications (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    point_id     INTEGER NOT NULL,
    slot_at      INTEGER NOT NULL,
    receipt      TEXT    NOT NULL,
    checked_at   INTEGER NOT NULL,
    -- ok: the DGA holds what was declared; mismatch: it holds something else (detail says
    -- what differs); unverified: the GET gave no usable answer (detail says why).
    outcome      TEXT    NOT NULL CHECK (outcome IN ('ok', 'mismatch', 'unverified')),
    detail       TEXT    NOT NULL DEFAULT '',
    http_status  INTEGER,
    response     TEXT,
    -- `sample` for the background check, else the account that asked.
    requested_by TEXT    NOT NULL
);

CREATE INDEX compliance_verifications_slot ON compliance_verifications (point_id, slot_at, id);
CREATE INDEX compliance_verifications_outcome ON compliance_verifications (outcome, checked_at);
