-- telemetry: alerts raised from stored telemetry. One row per occurrence: opened when its
-- condition is first seen, closed when it clears (condition alerts) or when a person closes it
-- (event alerts). Rows are never deleted, so the history stays.
CREATE TABLE alerts (
    id          BIGSERIAL        PRIMARY KEY,
    kind        TEXT             NOT NULL,
    -- What the alert is about, unique among open alerts of a kind: `site/<id>`,
    -- `device/<site>/<device>`, `point/<id>`.
    subject     TEXT             NOT NULL,
    site        TEXT,
    device      TEXT,
    point_id    BIGINT,
    state       TEXT             NOT NULL CHECK (state IN ('open', 'closed')),
    -- When the condition began (last heard, the event's time, ...).
    since       TIMESTAMPTZ      NOT NULL,
    opened_at   TIMESTAMPTZ      NOT NULL,
    -- Last evaluation that saw the condition.
    updated_at  TIMESTAMPTZ      NOT NULL,
    closed_at   TIMESTAMPTZ,
    -- `cleared` when the condition ended, else the account that closed it.
    closed_by   TEXT,
    close_note  TEXT             NOT NULL DEFAULT '',
    value       DOUBLE PRECISION,
    threshold   DOUBLE PRECISION,
    message     TEXT             NOT NULL
);

CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, subject) WHERE state = 'open';
CREATE INDEX alerts_subject ON alerts (kind, subject, since);
CREATE INDEX alerts_opened ON alerts (opened_at);
