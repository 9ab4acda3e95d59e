-- compliance claims and pacing, shared by every process that sends for this database: an
-- in-flight slot has an owner and a lease; each obra's last POST and the Centro de Control's
-- request budget are rows, so a restart or a second process does not burst.
-- Times are INTEGER microseconds since the Unix epoch, UTC.

-- Who claimed an in-flight slot and until when; another process treats it as unanswered only
-- once claimed_until has passed. NULL outside in_flight (and on slots claimed before this).
ALTER TABLE compliance_slots ADD COLUMN claimed_by TEXT;
ALTER TABLE compliance_slots ADD COLUMN claimed_until INTEGER;

-- The last POST per código de obra: the next one waits compliance.obra_spacing_s after it.
CREATE TABLE compliance_obras (
    obra_code    TEXT    PRIMARY KEY,
    last_post_at INTEGER NOT NULL
);

-- The global token bucket (compliance.max_posts_per_minute, compliance.burst): one row, which
-- every claim updates first, so claims are serialised across processes.
CREATE TABLE compliance_budget (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    tokens    REAL    NOT NULL,
    tokens_at INTEGER NOT NULL
);

INSERT INTO compliance_budget (id, tokens, tokens_at) VALUES (1, 0, 0);
