-- users: accounts that use the API. Never deleted: deactivated, so what they did stays
-- attributable. `session_version` grows when the password, role or state changes; tokens carry
-- the version they were issued at and older ones are refused.
CREATE TABLE users (
    id              BIGSERIAL   PRIMARY KEY,
    -- Lower case; unique.
    email           TEXT        NOT NULL UNIQUE,
    name            TEXT        NOT NULL DEFAULT '',
    role            TEXT        NOT NULL CHECK (role IN ('admin', 'operator', 'technician', 'viewer')),
    -- Argon2id PHC string.
    password_hash   TEXT        NOT NULL,
    active          BOOLEAN     NOT NULL DEFAULT TRUE,
    session_version BIGINT      NOT NULL DEFAULT 1,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
