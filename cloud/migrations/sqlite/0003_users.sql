-- users: accounts that use the API. Never deleted: deactivated, so what they did stays
-- attributable. `session_version` grows when the password, role or state changes; tokens carry
-- the version they were issued at and older ones are refused.
-- Times are INTEGER microseconds since the Unix epoch, UTC.
CREATE TABLE users (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Lower case; unique.
    email           TEXT    NOT NULL UNIQUE,
    name            TEXT    NOT NULL DEFAULT '',
    role            TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'technician', 'viewer')),
    -- Argon2id PHC string.
    password_hash   TEXT    NOT NULL,
    active          INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    session_version INTEGER NOT NULL DEFAULT 1,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
