-- compliance: each check of a slot's receipt against the DGA's GET endpoint. A slot's
-- verification is its latest row; earlier rows stay as the history.
CREATE TABLE compliance_verifications (
    id           BIGSERIAL   PRIMARY KEY,
    point_id     BIGINT      NOT NULL,
    slot_at      TIMESTAMPTZ NOT NULL,
    receipt      TEXT        NOT NULL,
    checked_at   TIMESTAMPTZ NOT NULL,
    -- ok: the DGA holds what was declared; mismatch: it holds something else (detail says
    -- what differs); unverified: the GET gave no usable answer (detail says why).
    outcome      TEXT        NOT NULL CHECK (outcome IN ('ok', 'mismatch', 'unverified')),
    detail       TEXT        NOT NULL DEFAULT '',
    http_status  BIGINT,
    response     TEXT,
    -- `sample` for the background check, else the account that asked.
    requested_by TEXT        NOT NULL
);

CREATE INDEX compliance_verifications_slot ON compliance_verifications (point_id, slot_at, id);
CREATE INDEX compliance_verifications_outcome ON compliance_verifications (outcome, checked_at);
